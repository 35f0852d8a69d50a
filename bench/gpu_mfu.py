"""Full fine-tuning throughput and model FLOPs utilisation (MFU) of a gpt2-large-sized model on a GPU.

A random-initialised GPT-2 of gpt2-large's shape (36 layers, width 1280, 20 heads, vocab 50257,
774M parameters) is fine-tuned in full by the project's own loop: ``w2s.models.Classifier``
(last-token pooling, the zero-initialised two-class head) trained by ``w2s.train.fit`` with AdamW
and bf16 autocast (float32 master weights, as every ``full``-mode stage trains), on rows of
exactly ``--seq`` tokens (no padding, so every token is real work).

Timing: ``fit``'s progress callback fires after every optimizer step; it synchronises the GPU and
records the time. The first ``--warmup`` steps (allocator and kernel selection) are left out; the
rest give seconds per step, hence tokens/s.

FLOPs per token (PaLM, appendix B): 6 x N for the weight matmuls, forward and backward, where N is
the parameter count without the embedding tables (a lookup, not a matmul; this classifier has no
vocabulary projection), plus 12 x layers x width x seq for attention scores and values (full
attention counted, as is the convention, although causal kernels skip half). MFU = achieved FLOP/s
over the GPU's dense bf16 peak, looked up from the device name (or ``--peak-tflops``).

    python bench/gpu_mfu.py [--seq 1024] [--batch-size 32] [--minibatch-size 8] [--steps 20] [--json PATH]
    python bench/gpu_mfu.py --smoke        # a tiny config on the CPU: tests the code path only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from w2s.losses import build_loss
from w2s.models import Classifier
from w2s.spec import ModelSpec, resolve_training
from w2s.train import Progress, TokenData, fit, one_hot

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, matched against
# torch.cuda.get_device_name in order: the first substring found wins (PCIe before the SXM default).
DENSE_BF16_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H200 NVL", 835.0),  # the PCIe card: lower clocks and power than the SXM part
    ("H200", 989.0),  # SXM, also GH200
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5: the "NVIDIA H100 80GB HBM3" name
    ("A100", 312.0),
]


@dataclass(frozen=True)
class Shape:
    """The model's shape and the sequence length it trains on."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    seq: int


GPT2_LARGE = Shape(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257, seq=1024)
SMOKE = Shape(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, seq=32)


def peak_tflops(device_name: str) -> tuple[float, str] | None:
    """The dense bf16 peak of a GPU and the table entry that matched, or None if unknown."""
    for needle, peak in DENSE_BF16_PEAK_TFLOPS:
        if needle.lower() in device_name.lower():
            return peak, needle
    return None


def build_classifier(shape: Shape, device: torch.device, seed: int) -> Classifier:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=shape.vocab_size,
        n_positions=max(1024, shape.seq),
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        bos_token_id=shape.vocab_size - 1,  # GPT-2's 50256 would lie outside the smoke vocabulary
        eos_token_id=shape.vocab_size - 1,
    )
    # Built directly on the device: initialising 774M parameters on the CPU takes longer than the run.
    with device:
        backbone = GPT2Model(config)
        return Classifier(backbone, hidden_size=shape.n_embd, pooling="last", causal=True)


def flops_per_token(model: Classifier, shape: Shape) -> tuple[float, int]:
    """Training FLOPs per token (forward + backward) and the non-embedding parameter count."""
    embeddings = {id(p) for module in (model.backbone.wte, model.backbone.wpe) for p in module.parameters()}
    n_params = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    attention = 12 * shape.n_layer * shape.n_embd * shape.seq
    return 6.0 * n_params + attention, n_params


class StepClock:
    """``fit``'s progress callback: the time after each optimizer step, with the GPU drained."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []
        self.losses: list[float] = []

    def __call__(self, progress: Progress) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        self.losses.append(progress.loss)
        return True


def measure(
    shape: Shape,
    *,
    device: torch.device,
    batch_size: int,
    minibatch_size: int,
    steps: int,
    warmup: int,
    gradient_checkpointing: bool,
    seed: int = 0,
) -> dict[str, Any]:
    model = build_classifier(shape, device, seed)
    if gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable()
    per_token, n_params = flops_per_token(model, shape)
    total_steps = warmup + steps
    rng = np.random.default_rng(seed)
    n_rows = batch_size * total_steps  # one epoch of exactly total_steps steps
    ids = rng.integers(0, shape.vocab_size, size=(n_rows, shape.seq))
    data = TokenData(ids.tolist(), pad_id=0)
    labels = one_hot(rng.integers(0, 2, size=n_rows).tolist())
    config = resolve_training(
        ModelSpec(
            model="gpt2",  # only the training options are read; the model is built above
            mode="full",
            batch_size=batch_size,
            minibatch_size=minibatch_size,
            epochs=1,
            lr=1e-5,
            warmup_frac=0.0,
            lr_schedule="constant",
            dtype="bfloat16",
            max_length=shape.seq,
            gradient_checkpointing=gradient_checkpointing,
        )
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = StepClock(device)
    started = time.perf_counter()
    outcome = fit(model, data, labels, config, build_loss("xent"), device=device, seed=seed, callback=clock)
    if outcome.steps != total_steps or len(clock.times) != total_steps:
        raise RuntimeError(f"fit ran {outcome.steps} steps, expected {total_steps}")
    # Steps after the warm-up: from the end of step `warmup` to the end of the last step.
    timed_s = clock.times[-1] - clock.times[warmup - 1] if warmup else clock.times[-1] - started
    step_s = timed_s / steps
    tokens_per_s = batch_size * shape.seq / step_s
    return {
        "shape": asdict(shape),
        "params_non_embedding": n_params,
        "params_total": sum(p.numel() for p in model.parameters()),
        "flops_per_token": per_token,
        "batch_size": batch_size,
        "minibatch_size": minibatch_size,
        "gradient_checkpointing": gradient_checkpointing,
        "dtype": "bf16 autocast, float32 master weights, AdamW",
        "warmup_steps": warmup,
        "timed_steps": steps,
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "achieved_tflops": tokens_per_s * per_token / 1e12,
        "final_loss": clock.losses[-1],
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def write_json(path: Path | None, figures: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU; checks the code path")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps (5 after 2 warm-up)")
    parser.add_argument("--seq", type=int, default=GPT2_LARGE.seq, help="tokens per row (1024)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per optimizer step")
    parser.add_argument("--minibatch-size", type=int, default=8, help="rows per forward pass (accumulation)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the looked-up bf16 peak")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 5, 2

    if args.smoke:
        shape, device = SMOKE, torch.device("cpu")
        args.batch_size, args.minibatch_size, args.steps, args.warmup = 4, 2, 3, 1
        device_name = "cpu (smoke)"
    elif not torch.cuda.is_available():
        print("no GPU: skipped")
        write_json(args.json, {"skipped": "no GPU"})
        return
    else:
        shape = Shape(**{**asdict(GPT2_LARGE), "seq": args.seq})
        device = torch.device("cuda", 0)
        device_name = torch.cuda.get_device_name(device)  # probed here, never at import

    figures = measure(
        shape,
        device=device,
        batch_size=args.batch_size,
        minibatch_size=args.minibatch_size,
        steps=args.steps,
        warmup=args.warmup,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    if args.peak_tflops is not None:
        peak: tuple[float, str] | None = (args.peak_tflops, "--peak-tflops")
    else:
        peak = None if args.smoke else peak_tflops(device_name)
    figures.update(
        device=device_name,
        torch=torch.__version__,
        smoke=args.smoke,
        peak_tflops=peak[0] if peak else None,
        peak_source=peak[1] if peak else None,
        mfu=figures["achieved_tflops"] / peak[0] if peak else None,
    )
    print(
        f"{device_name}, torch {torch.__version__}: GPT-2 {shape.n_layer} layers x {shape.n_embd}, "
        f"{figures['params_total'] / 1e6:.1f}M parameters ({figures['params_non_embedding'] / 1e6:.1f}M "
        f"without embeddings), seq {shape.seq}, batch {args.batch_size} (minibatch {args.minibatch_size}), "
        f"bf16 autocast, w2s.train.fit"
    )
    print(f"{args.steps} timed steps after {args.warmup} warm-up: {figures['step_s']:.3f} s/step")
    print(f"tokens/s: {figures['tokens_per_s']:,.0f}")
    print(
        f"achieved: {figures['achieved_tflops']:.1f} TFLOP/s "
        f"({figures['flops_per_token'] / 1e9:.2f} GFLOP/token)"
    )
    if figures["peak_memory_gib"] is not None:
        print(f"peak GPU memory: {figures['peak_memory_gib']:.1f} GiB")
    if peak:
        print(f"MFU: {figures['mfu']:.1%} of {peak[0]:.0f} TFLOP/s dense bf16 (peak from {peak[1]!r})")
    else:
        reason = "smoke run on the CPU" if args.smoke else f"unknown GPU {device_name!r}; pass --peak-tflops"
        print(f"MFU: not computed ({reason})", file=sys.stderr)
    write_json(args.json, figures)


if __name__ == "__main__":
    main()

"""The real model ladder on this machine: size, inference and training throughput, float32 and bf16.

For each model of the ladder present under models/ (``w2s models prepare-offline models --decoders``):
all-MiniLM-L6-v2, all-mpnet-base-v2, SmolLM2-135M-Instruct, gemma-3-270m, Qwen2.5-Coder-0.5B-Instruct.
Sequences are 64 random token ids (no padding), batches of 16. Inference is ``w2s.train.predict_proba``;
training is full fine-tuning through ``w2s.train.fit`` (AdamW), timed per optimizer step: the first
step (optimizer state, allocator warm-up) is left out when a later one was timed.

bf16 means the trainer's bf16 autocast over float32 weights. A CPU without avx512_bf16 / AMX emulates
bf16 matmuls: about ten times slower than float32 at batch 16 on this machine (one bf16 training step
of Qwen2.5-0.5B would take over ten minutes), so bf16 is measured briefly, one inference batch and one
training step, and by default only on the smallest encoder and decoder (``--bf16 all`` for every model).
A smaller bf16 batch would be quicker but misleading: at batch 1-2 fixed costs hide most of the gap.

The machine may be shared: each figure comes with the share of the threads' time this process got.

    python bench/decoder_ladder.py [--threads 2] [--seconds 20] [--bf16 smallest|all|none] [--quick]
                                   [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from w2s.losses import build_loss
from w2s.models import LoadedModel, load_classifier
from w2s.spec import ModelSpec, resolve_training
from w2s.train import TokenData, fit, one_hot, predict_proba

ROOT = Path(__file__).resolve().parents[1]
LADDER = [
    "all-MiniLM-L6-v2",
    "all-mpnet-base-v2",
    "SmolLM2-135M-Instruct",
    "gemma-3-270m",
    "Qwen2.5-Coder-0.5B-Instruct",
]
SMALLEST = ["all-MiniLM-L6-v2", "SmolLM2-135M-Instruct"]  # the smallest encoder and decoder
TOKENS = 64
BATCH = 16
MAX_TRAIN_STEPS = 6
DEVICE = torch.device("cpu")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def random_rows(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=(n, TOKENS)).tolist()


def load(path: Path) -> tuple[LoadedModel, int]:
    spec = ModelSpec(model=str(path))
    loaded = load_classifier(spec, resolve_training(spec))
    vocab = min(len(loaded.tokenizer), loaded.model.backbone.get_input_embeddings().num_embeddings)
    return loaded, vocab


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _span(begin: tuple[float, float], end: tuple[float, float], sequences: int) -> dict[str, Any]:
    """Sequences per second over a span, and the share of the threads' time this process got: the
    machine is shared, and a share well under 1 means other work slowed the figure."""
    wall, cpu = end[0] - begin[0], end[1] - begin[1]
    return {"seq_per_s": sequences / wall, "cpu_share": cpu / (wall * torch.get_num_threads())}


def measure_inference(
    loaded: LoadedModel, vocab: int, dtype: str, batch: int, seconds: float
) -> dict[str, Any]:
    """Sequences per second of predict_proba: batches until ``seconds`` have passed (at least one),
    after a two-row warm-up."""
    pad_id = loaded.tokenizer.pad_token_id
    warm = TokenData(random_rows(2, vocab, seed=1), pad_id=pad_id)
    predict_proba(loaded.model, warm, batch_size=2, device=DEVICE, dtype=dtype)
    batches, begin = 0, _clock()
    while True:
        data = TokenData(random_rows(batch, vocab, seed=2 + batches), pad_id=pad_id)
        predict_proba(loaded.model, data, batch_size=batch, device=DEVICE, dtype=dtype)
        batches += 1
        now = _clock()
        if now[0] - begin[0] >= seconds:
            return {**_span(begin, now, batches * batch), "batch": batch, "batches": batches}


def measure_training(
    loaded: LoadedModel, path: Path, vocab: int, dtype: str, batch: int, seconds: float
) -> dict[str, Any]:
    """Sequences per second of fit's optimizer steps. Steps run until the ones after the first have
    taken ``seconds`` (or the first alone has); the first step counts only when it is all there is."""
    steps = 1 if seconds <= 0 else MAX_TRAIN_STEPS
    data = TokenData(random_rows(batch * steps, vocab, seed=3), pad_id=loaded.tokenizer.pad_token_id)
    labels = one_hot(np.random.default_rng(4).integers(0, 2, size=batch * steps).tolist())
    spec = ModelSpec(model=str(path), batch_size=batch, epochs=1, warmup_frac=0.0, lr=1e-5, dtype=dtype)
    stamps = [_clock()]

    def on_step(_: object) -> bool:
        stamps.append(_clock())
        first, timed = stamps[1][0] - stamps[0][0], stamps[-1][0] - stamps[1][0]
        return not (first >= seconds if len(stamps) == 2 else timed >= seconds)

    loss = build_loss("xent")
    fit(loaded.model, data, labels, resolve_training(spec), loss, device=DEVICE, seed=0, callback=on_step)
    done = len(stamps) - 1
    if done >= 2:
        return {**_span(stamps[1], stamps[-1], (done - 1) * batch), "batch": batch, "timed_steps": done - 1}
    return {**_span(stamps[0], stamps[1], batch), "batch": batch, "timed_steps": 1, "first_step": True}


def measure_model(path: Path, seconds: float, bf16: bool) -> dict[str, Any]:
    started = time.perf_counter()
    loaded, vocab = load(path)
    load_s = time.perf_counter() - started
    params = sum(p.numel() for p in loaded.model.parameters())
    embedding = loaded.model.backbone.get_input_embeddings().weight.numel()
    figures: dict[str, Any] = {
        "path": str(path),
        "kind": "decoder" if loaded.model.causal else "encoder",
        "params": params,
        "params_without_embeddings": params - embedding,
        "load_s": load_s,
    }
    figures["inference_float32"] = measure_inference(loaded, vocab, "float32", BATCH, seconds / 2)
    figures["train_float32"] = measure_training(loaded, path, vocab, "float32", BATCH, seconds)
    if bf16:  # one batch, one step: see the module's docstring
        figures["inference_bfloat16"] = measure_inference(loaded, vocab, "bfloat16", BATCH, 0.0)
        figures["train_bfloat16"] = measure_training(loaded, path, vocab, "bfloat16", BATCH, 0.0)
    figures["seconds"] = time.perf_counter() - started
    del loaded
    gc.collect()
    return figures


def _rate(cell: dict[str, Any] | None) -> str:
    return f"{cell['seq_per_s']:10.2f}" if cell else f"{'-':>10}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--seconds", type=float, default=20.0, help="float32 training time per model")
    parser.add_argument(
        "--bf16", choices=["smallest", "all", "none"], default="smallest", help="which models to time in bf16"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smallest encoder and decoder, 1 step each, bf16 on MiniLM only"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    ladder = SMALLEST if args.quick else LADDER
    bf16_models = {"smallest": SMALLEST[:1] if args.quick else SMALLEST, "all": ladder, "none": []}[args.bf16]
    if args.quick:
        args.seconds = 0.0
    torch.set_num_threads(args.threads)
    native_bf16 = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    load_before = os.getloadavg()[0]
    present = {
        name: args.models_dir / name for name in ladder if (args.models_dir / name / "config.json").is_file()
    }
    missing = [name for name in ladder if name not in present]
    print(f"torch {torch.__version__}, {args.threads} threads, {TOKENS} tokens per sequence, batch {BATCH}")
    print(
        "bf16 = bf16 autocast over float32 weights; this CPU "
        + (
            "has native bf16"
            if native_bf16
            else "has no avx512_bf16/AMX, so bf16 matmuls are emulated (slow)"
        )
        + "; bf16 timed on 1 inference batch and 1 training step (first-step overhead included)"
        + (f", on {', '.join(bf16_models)} only" if set(bf16_models) < set(ladder) else "")
    )
    print(f"load average at start {load_before:.1f} on {os.cpu_count()} CPUs (other work slows every figure)")
    if missing:
        hint = "w2s models prepare-offline models --decoders"
        print(f"not under {args.models_dir}: {', '.join(missing)} ({hint})")
    columns = ("infer f32", "train f32", "infer bf16", "train bf16")
    print(
        f"{'model':<28} {'params':>8} {'no-emb':>8}  " + " ".join(f"{c:>10}" for c in columns) + "  (seq/s)"
    )
    results: dict[str, Any] = {}
    for name, path in present.items():
        figures = results[name] = measure_model(path, args.seconds, bf16=name in bf16_models)
        print(
            f"{name:<28} {figures['params'] / 1e6:7.1f}M {figures['params_without_embeddings'] / 1e6:7.1f}M  "
            + " ".join(
                _rate(figures.get(key))
                for key in ("inference_float32", "train_float32", "inference_bfloat16", "train_bfloat16")
            )
            + f"   ({figures['seconds']:.0f}s)",
            flush=True,
        )
    for name, figures in results.items():
        shares = [f["cpu_share"] for f in figures.values() if isinstance(f, dict)]
        line = f"{name}: this process had {min(shares):.0%}-{max(shares):.0%} of {args.threads} threads' time"
        if "train_bfloat16" in figures:
            train = figures["train_float32"]["seq_per_s"] / figures["train_bfloat16"]["seq_per_s"]
            infer = figures["inference_float32"]["seq_per_s"] / figures["inference_bfloat16"]["seq_per_s"]
            line += f"; bf16 {infer:.1f}x slower than float32 for inference, {train:.1f}x for training"
        print(line)
    load_after = os.getloadavg()[0]
    print(f"load average at end {load_after:.1f}")
    summary = {
        name: {key: f["seq_per_s"] for key, f in figures.items() if isinstance(f, dict)}
        for name, figures in results.items()
    }
    print(json.dumps(summary))
    if args.json:
        payload = {
            "models": results,
            "missing": missing,
            "tokens": TOKENS,
            "batch": BATCH,
            "seconds": args.seconds,
            "bf16_models": bf16_models,
            "threads": args.threads,
            "quick": args.quick,
            "native_bf16": native_bf16,
            "load_average": [load_before, load_after],
            "torch": torch.__version__,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()

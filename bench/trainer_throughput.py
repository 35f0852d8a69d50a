"""Trainer throughput against its packed bound.

A random-initialised GPT-2 (4 layers, width 256, vocab 30522) is fine-tuned in full for one epoch
on 512 examples of random length 20-120 tokens, batch 32, with ``w2s.train.fit`` (length-bucketed
batches, dynamic padding, attention masks). The bound is the same model and optimizer in a bare
loop over packed batches of 32 x 70 tokens (70 = the mean length): no padding, no collation.

    python bench/trainer_throughput.py [--threads 2] [--repeats 5] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from w2s.losses import build_loss
from w2s.models import Classifier
from w2s.spec import ModelSpec, resolve_training
from w2s.train import TokenData, fit, one_hot, set_train_mode


def build_model(seed: int) -> Classifier:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=30522, n_layer=4, n_embd=256, n_head=4, n_positions=128)
    return Classifier(GPT2Model(config), hidden_size=256, pooling="last", causal=True)


def measure_fit(n_examples: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 121, size=n_examples)
    data = TokenData([rng.integers(0, 30522, size=n).tolist() for n in lengths], pad_id=0)
    labels = one_hot(rng.integers(0, 2, size=n_examples).tolist())
    config = resolve_training(ModelSpec(model="gpt2", batch_size=32, epochs=1, warmup_frac=0.0))
    model = build_model(seed)
    loss = build_loss("xent")
    device = torch.device("cpu")
    # One untimed epoch first: kernels and the allocator warm up for every batch shape, as the
    # bound's warm-up does for its single shape. Both then report steady-state speed.
    fit(model, data, labels, config, loss, device=device, seed=seed)
    started = time.perf_counter()
    outcome = fit(model, data, labels, config, loss, device=device, seed=seed)
    elapsed = time.perf_counter() - started
    return outcome.examples / elapsed


def measure_packed_bound(n_examples: int, seed: int, length: int = 70, batch: int = 32) -> float:
    model = build_model(seed)
    set_train_mode(model, dropout=False)  # as fit trains by default: no dropout
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    rng = np.random.default_rng(seed)
    ids = torch.as_tensor(rng.integers(0, 30522, size=(batch, length)))
    mask = torch.ones_like(ids)
    labels = one_hot(rng.integers(0, 2, size=batch).tolist())
    loss_fn = build_loss("xent")

    def step() -> None:
        loss = loss_fn(model(ids, mask), labels, 0.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = n_examples // batch
    for _ in range(steps):  # warm-up, as for fit
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="report the median of this many runs")
    parser.add_argument("--quick", action="store_true", help="2 repeats instead of 5")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 2
    torch.set_num_threads(args.threads)
    fit_rates, bound_rates = [], []
    for _ in range(args.repeats):  # interleaved, so a noisy moment on the machine hits both
        fit_rates.append(measure_fit(args.examples, seed=0))
        bound_rates.append(measure_packed_bound(args.examples, seed=0))
    fit_best, bound_best = float(np.median(fit_rates)), float(np.median(bound_rates))
    print(f"torch {torch.__version__}, {args.threads} threads, {args.examples} examples, batch 32, 1 epoch")
    print(f"w2s.train.fit, lengths 20-120: {fit_best:7.1f} examples/s  runs {np.round(fit_rates, 1)}")
    print(f"packed bound, 32 x 70 tokens:  {bound_best:7.1f} examples/s  runs {np.round(bound_rates, 1)}")
    print(f"fit / bound: {fit_best / bound_best:.1%} (target >= 85%)")
    print(
        json.dumps(
            {
                "fit_examples_per_s": fit_best,
                "bound_examples_per_s": bound_best,
                "ratio": fit_best / bound_best,
            }
        )
    )
    if args.json:
        figures = {
            "fit_examples_per_s": fit_best,
            "bound_examples_per_s": bound_best,
            "ratio": fit_best / bound_best,
            "target_ratio": 0.85,
            "fit_runs": fit_rates,
            "bound_runs": bound_rates,
            "threads": args.threads,
            "examples": args.examples,
            "repeats": args.repeats,
            "torch": torch.__version__,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

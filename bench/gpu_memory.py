"""The memory estimator against a real GPU: estimate versus ``torch.cuda.max_memory_allocated``.

A random-initialised model of a real model's shape (default: Qwen2.5-1.5B, the "1.5B class";
``--shape gpt2-large`` for the GPT-2 ladder's top) is fine-tuned in full for a few steps by
``w2s.train.fit`` exactly as a stage trains it (float32 master weights, bf16 autocast, AdamW), on
rows of exactly ``--seq`` tokens. The peak the CUDA caching allocator reports is set beside
``w2s.memory.estimate`` for the same configuration, part by part; the CUDA context is outside
``max_memory_allocated``, so it is compared without it.

    python bench/gpu_memory.py [--shape qwen2.5-1.5b|gpt2-large] [--seq 512] [--minibatch-size 8]
                               [--gradient-checkpointing] [--json PATH]
    python bench/gpu_memory.py --smoke     # a tiny shape on the CPU: tests the code path only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from w2s.losses import build_loss
from w2s.memory import estimate, shape_of
from w2s.models import Classifier
from w2s.spec import ModelSpec, resolve_training
from w2s.train import TokenData, fit, one_hot

# Configs of real models (no weights: the shape is all that matters here).
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
    },
    "gpt2-large": {
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_embd": 1280,
        "n_layer": 36,
        "n_head": 20,
        "n_positions": 1024,
    },
    "smoke": {
        "model_type": "qwen2",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    },
}


def build(name: str, device: torch.device) -> Classifier:
    from transformers import AutoConfig, AutoModel

    options = dict(SHAPES[name])
    config = AutoConfig.for_model(options.pop("model_type"), **options)
    config.use_cache = False
    torch.manual_seed(0)
    with device:
        backbone = AutoModel.from_config(config, dtype=torch.float32)
    hidden = int(getattr(config, "hidden_size", None) or config.n_embd)
    return Classifier(backbone, hidden, "last", causal=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=[s for s in SHAPES if s != "smoke"], default="qwen2.5-1.5b")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--minibatch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.smoke:
        name, device, args.seq, args.minibatch_size, args.steps = "smoke", torch.device("cpu"), 32, 2, 2
    elif not torch.cuda.is_available():
        print("no GPU: skipped (use --smoke for the code path)")
        return
    else:
        name, device = args.shape, torch.device("cuda", 0)

    model = build(name, device)
    if args.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable()
    config = dataclasses.replace(
        resolve_training(
            ModelSpec(
                model="x",
                mode="full",
                batch_size=args.minibatch_size,
                minibatch_size=args.minibatch_size,
                max_length=args.seq,
                epochs=1,
                gradient_checkpointing=args.gradient_checkpointing,
            )
        ),
        dtype="bfloat16",
    )
    predicted = estimate(shape_of(model.backbone.config, model.backbone), config)
    rng = np.random.default_rng(0)
    rows = args.minibatch_size * args.steps
    vocab = model.backbone.config.vocab_size
    data = TokenData(rng.integers(0, vocab, size=(rows, args.seq)).tolist(), pad_id=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fit(model, data, one_hot([i % 2 for i in range(rows)]), config, build_loss("xent"), device=device, seed=0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    without_context = predicted.total - predicted.context
    figures = {
        "shape": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "seq": args.seq,
        "minibatch_size": args.minibatch_size,
        "gradient_checkpointing": args.gradient_checkpointing,
        "estimate_gib": dataclasses.asdict(predicted) | {"total": predicted.total},
        "estimate_without_context_gib": round(without_context, 2),
        "max_memory_allocated_gib": round(peak, 2) if peak is not None else None,
        "estimate_over_measured": round(without_context / peak, 3) if peak else None,
    }
    print(f"{name}, minibatch {args.minibatch_size} x {args.seq}, bf16 autocast, full fine-tuning")
    print(f"estimate: {predicted.describe()}")
    if peak is not None:
        print(
            f"max_memory_allocated: {peak:.1f} GiB; estimate without the CUDA context "
            f"{without_context:.1f} GiB ({without_context / peak:.0%} of measured)"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Measuring what training keeps in memory, to calibrate :mod:`w2s.memory`'s estimator.

Autograd saves, during the forward pass, every tensor the backward pass will need: that is the
activation memory of a training step. :func:`saved_bytes` counts it exactly, with
``torch.autograd.graph.saved_tensors_hooks``, for a real :class:`w2s.models.Classifier` run the way
:func:`w2s.train.fit` runs it (eval mode, bf16 autocast or float32). Storages are counted once,
however many ops save them, and the parameters themselves are left out (they are counted as weights).

Two batch sizes separate what grows with tokens (activations) from what does not (under autocast,
the bf16 copies of the trainable weights that autocast caches for the step). Random-initialised
models of GPT-2, Llama and Gemma shape (and BERT, MPNet for encoders) are built from a config, so
this runs on any CPU in seconds: ``python bench/activation_memory.py`` refits the coefficients in
:data:`w2s.memory.ACTIVATION_COEFFICIENTS` and prints how well they hold on shapes it did not fit.

What the CPU cannot show, and the estimator adds on top: the CUDA caching allocator's
fragmentation, cuBLAS workspaces and the CUDA context (see :mod:`w2s.memory`). Attention is
measured through PyTorch's fused SDPA kernels, as on a GPU (flash or memory-efficient attention
save O(sequence) per head, never the sequence x sequence matrix).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from w2s.models import Classifier, is_decoder_lm

# The calibration's model families and the transformers model type each is built as.
FAMILY_MODEL_TYPE = {
    "gpt2": "gpt2",
    "llama": "llama",
    "gemma": "gemma3_text",
    "bert": "bert",
    "mpnet": "mpnet",
}


@dataclass(frozen=True)
class CalibrationShape:
    """A model shape to build and measure: width, depth, heads, key/value heads, MLP width."""

    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def build_config(shape: CalibrationShape) -> Any:
    """A transformers config of ``shape`` (a small vocabulary: embeddings are not activations)."""
    from transformers import AutoConfig

    common: dict[str, Any] = {"vocab_size": 128}
    family = shape.family
    if family == "gpt2":
        kwargs = {
            "n_embd": shape.hidden,
            "n_layer": shape.layers,
            "n_head": shape.heads,
            "n_inner": shape.intermediate,
            "n_positions": 2048,
            "bos_token_id": 0,
            "eos_token_id": 0,
        }
    elif family in ("bert", "mpnet"):
        kwargs = {
            "hidden_size": shape.hidden,
            "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads,
            "intermediate_size": shape.intermediate,
            "max_position_embeddings": 2048,
        }
    else:
        kwargs = {
            "hidden_size": shape.hidden,
            "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads,
            "intermediate_size": shape.intermediate,
            "head_dim": shape.head_dim,
            "max_position_embeddings": 2048,
        }
        if family == "gemma":
            kwargs["sliding_window"] = 4096  # longer than any calibration row: one mask kind
    return AutoConfig.for_model(FAMILY_MODEL_TYPE[family], **common, **kwargs)


def build_classifier(shape: CalibrationShape, mode: str = "full", seed: int = 0) -> Classifier:
    """A random-initialised classifier of ``shape``, float32, as a stage would train it."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    config = build_config(shape)
    config.use_cache = False
    backbone = AutoModel.from_config(config, dtype=torch.float32)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        backbone = get_peft_model(backbone, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    elif mode == "probe":
        backbone.requires_grad_(False)
    causal = is_decoder_lm(config)
    return Classifier(backbone, shape.hidden, "last" if causal else "mean", causal=causal).eval()


@contextlib.contextmanager
def _counting(model: torch.nn.Module) -> Iterator[dict[int, int]]:
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer and pointer not in parameters:
            storages[pointer] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield storages


def saved_bytes(model: Classifier, batch: int, seq: int, precision: str) -> int:
    """Bytes autograd saves for backward in one forward pass of ``batch`` rows of ``seq`` tokens,
    under ``precision`` ("bfloat16": autocast, as a GPU stage; "float32": none)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 128, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    amp = precision in ("bfloat16", "float16")
    with (
        _counting(model) as storages,
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp),
    ):
        logits = model(input_ids=input_ids, attention_mask=attention_mask)
    del logits
    return sum(storages.values())


@dataclass(frozen=True)
class Measurement:
    shape: CalibrationShape
    precision: str
    mode: str
    seq: int
    per_token: float  # activation bytes per token (all layers)
    fixed: float  # bytes that do not grow with tokens (autocast's weight copies)


def measure(
    shape: CalibrationShape,
    precision: str,
    mode: str = "full",
    seq: int = 64,
    model: Classifier | None = None,
) -> Measurement:
    """Activation bytes per token and the fixed part, from batches of 2 and 4 rows of ``seq`` tokens."""
    model = model if model is not None else build_classifier(shape, mode)
    small, large = (saved_bytes(model, rows, seq, precision) for rows in (2, 4))
    per_token = (large - small) / (2 * seq)
    return Measurement(shape, precision, mode, seq, per_token, small - per_token * 2 * seq)


def features(shape: CalibrationShape, seq: int) -> np.ndarray:
    """The terms activation bytes per token are linear in (see w2s.memory.activation_terms)."""
    from w2s.memory import activation_terms

    return activation_terms(
        hidden=shape.hidden,
        layers=shape.layers,
        intermediate=shape.intermediate,
        attention_width=(shape.heads + 2 * shape.kv_heads) * shape.head_dim,
        heads=shape.heads,
        seq=seq,
    )


def fit(measurements: list[Measurement]) -> tuple[float, ...]:
    """Least-squares coefficients (bytes per unit of each term of :func:`features`), none negative."""
    x = np.stack([features(m.shape, m.seq) for m in measurements])
    y = np.array([m.per_token for m in measurements])
    coefficients, *_ = np.linalg.lstsq(x, y, rcond=None)
    clipped = np.clip(coefficients, 0.0, None)
    return tuple(round(float(c), 2) for c in clipped)  # type: ignore[return-value]

"""How much GPU memory a stage needs, to route it to a GPU class (or refuse it) before it runs.

The model is built on the meta device from its config (no weights are read), which gives its shape
and parameter count. The estimate is the sum of:

- weights, gradients and optimizer state, by mode (full: float32 weights, gradients and AdamW's two
  moments; LoRA: frozen weights in the stage's precision plus float32 adapters; probe: frozen
  weights only);
- under bf16/fp16 autocast, the half-precision copies of the trainable weights that autocast keeps
  for the step;
- activations: the bytes autograd saves for backward per token, a linear function of the model's
  shape whose coefficients were *measured* (w2s/memory_calibration.py counts the saved tensors of
  real GPT-2-, Llama-, Gemma-, BERT- and MPNet-shaped models; ``python bench/activation_memory.py``
  refits them and prints the error on shapes it did not fit), times ``minibatch_size x max_length``;
- a working set for the backward pass (two layers' activations), 10% for the CUDA caching
  allocator's fragmentation, and the CUDA context.

The activation part is what the CPU can measure exactly. The allowances on top are what only a
GPU can show: docs/benchmarks.md records the estimate against ``torch.cuda.max_memory_allocated``
where a GPU was available.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from w2s.model_store import is_store_model
from w2s.spec import ModelSpec, TrainConfig

logger = logging.getLogger(__name__)

GiB = 1024**3
CUDA_CONTEXT_GIB = 1.5  # context, cuBLAS/cuDNN handles and workspaces
ALLOCATOR_OVERHEAD = 0.10  # fragmentation of the caching allocator, on everything that comes and goes
BACKWARD_WORKING_LAYERS = 2  # activation gradients in flight during backward, in layers' worth

# Measured bytes per token of what autograd saves, per coefficient of ``activation_terms``:
# (per layer and unit of width, per layer and unit of MLP width, per layer and unit of attention
# projection width, per unit of width once, per layer, head and token of context (attention that
# keeps the sequence x sequence matrix)). By family, precision ("half": bf16 or fp16 autocast) and
# mode. Refit with `python bench/activation_memory.py --fit`.
Coefficients = tuple[float, float, float, float, float]
ACTIVATION_COEFFICIENTS: dict[str, dict[tuple[str, str], Coefficients]] = {
    "gpt2": {
        ("half", "full"): (2.02, 10.04, 6.07, 4.19, 0.0),
        ("half", "lora"): (2.37, 9.96, 7.11, 0.0, 0.02),
        ("float32", "full"): (3.22, 20.04, 9.67, 4.19, 0.0),
        ("float32", "lora"): (3.52, 19.87, 10.56, 0.0, 0.04),
    },
    "llama": {
        ("half", "full"): (28.92, 7.96, 1.73, 8.62, 0.0),
        ("half", "lora"): (28.59, 7.5, 0.78, 0.0, 0.0),
        ("float32", "full"): (28.92, 15.96, 3.73, 8.62, 0.0),
        ("float32", "lora"): (32.45, 15.02, 1.78, 0.0, 0.0),
    },
    "gemma": {
        ("half", "full"): (49.66, 7.93, 5.53, 9.11, 0.0),
        ("half", "lora"): (39.32, 7.47, 2.59, 0.0, 0.0),
        ("float32", "full"): (49.66, 15.93, 7.53, 9.11, 0.0),
        ("float32", "lora"): (43.19, 14.99, 3.58, 0.0, 0.0),
    },
    "bert": {
        ("half", "full"): (2.42, 4.04, 7.27, 4.34, 0.0),
        ("half", "lora"): (2.84, 3.92, 8.53, 0.0, 0.02),
        ("float32", "full"): (3.22, 8.04, 9.67, 8.34, 0.0),
        ("float32", "lora"): (3.67, 7.79, 11.0, 0.26, 0.05),
    },
    "mpnet": {
        ("half", "full"): (2.44, 3.99, 7.31, 4.13, 1.99),
        ("half", "lora"): (2.66, 3.87, 7.97, 0.0, 2.02),
        ("float32", "full"): (3.24, 7.99, 9.71, 8.13, 3.99),
        ("float32", "lora"): (3.68, 7.74, 11.05, 0.0, 4.05),
    },
}
# transformers model types measured as each family (same block structure).
FAMILY_OF_MODEL_TYPE: dict[str, str] = {
    **dict.fromkeys(("gpt2", "gpt_bigcode"), "gpt2"),
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo", "olmo2", "granite", "phi3"), "llama"
    ),
    **dict.fromkeys(("gemma", "gemma2", "gemma3", "gemma3_text"), "gemma"),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), "bert"),
    "mpnet": "mpnet",
}


def activation_terms(
    *, hidden: int, layers: int, intermediate: int, attention_width: int, heads: int, seq: int
) -> np.ndarray:
    """The quantities activation bytes per token are linear in: ``layers x hidden``, ``layers x
    intermediate``, ``layers x attention_width`` (query, key and value projections together),
    ``hidden`` (embeddings and pooling, once), and ``layers x heads x seq`` (what attention without a
    fused kernel keeps: the score matrix grows with the context)."""
    return np.array(
        [layers * hidden, layers * intermediate, layers * attention_width, hidden, layers * heads * seq],
        dtype=np.float64,
    )


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a model, read from its config on the meta device."""

    model_type: str
    parameters: int
    linear_parameters: int  # weights of Linear layers: those autocast copies to half precision
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    fused_attention: bool  # SDPA or flash: attention saves O(seq) per head

    @property
    def attention_width(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim


def _first(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def shape_of(config: Any, backbone: Any) -> ModelShape:
    """The shape of ``backbone`` (built from ``config``, on any device, meta included)."""
    from torch import nn

    hidden = int(_first(config, "hidden_size", "n_embd", "d_model"))
    heads = int(_first(config, "num_attention_heads", "n_head", default=1))
    return ModelShape(
        model_type=str(getattr(config, "model_type", "")),
        parameters=sum(p.numel() for p in backbone.parameters()),
        linear_parameters=sum(
            module.weight.numel()
            for module in backbone.modules()
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's linear
        ),
        hidden=hidden,
        layers=int(_first(config, "num_hidden_layers", "n_layer", default=12)),
        intermediate=int(_first(config, "intermediate_size", "n_inner", default=None) or 4 * hidden),
        heads=heads,
        kv_heads=int(_first(config, "num_key_value_heads", default=heads)),
        head_dim=int(_first(config, "head_dim", default=None) or hidden // heads),
        fused_attention=getattr(config, "_attn_implementation", "eager") != "eager",
    )


@functools.lru_cache(maxsize=256)
def _model_shape(model: str, revision: str | None, trust_remote_code: bool) -> ModelShape | None:
    try:
        import torch
        from transformers import AutoConfig, AutoModel

        source = model
        if is_store_model(model):  # its config from this host's copy, fetched without weights
            from w2s.models import stored_model_dir

            source = str(stored_model_dir(model, weights=False))
        config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            backbone = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
        return shape_of(backbone.config, backbone)
    except Exception as error:  # offline hub id, odd config: routing falls back to the largest class
        logger.info("no memory estimate for %s: %s", model, error)
        return None


def model_shape(spec: ModelSpec) -> ModelShape | None:
    """The model's shape from its config alone; None if the config is unreachable or unusual."""
    return _model_shape(spec.model, spec.revision, spec.trust_remote_code)


def parameter_count(spec: ModelSpec) -> int | None:
    """The backbone's number of parameters, from its config alone; None if the config is unreachable."""
    shape = model_shape(spec)
    return shape.parameters if shape is not None else None


def coefficients(shape: ModelShape, precision: str, mode: str) -> Coefficients:
    """The measured coefficients of the model's family; for a family never measured, the largest
    of every measured family (an estimate that errs high), with the sequence term only for
    attention without a fused kernel."""
    half = "half" if precision in ("bfloat16", "float16") else "float32"
    kind = "lora" if mode == "lora" else "full"
    family = FAMILY_OF_MODEL_TYPE.get(shape.model_type)
    if family is not None:
        return ACTIVATION_COEFFICIENTS[family][half, kind]
    measured = [table[half, kind] for table in ACTIVATION_COEFFICIENTS.values()]
    largest = tuple(max(values) for values in zip(*measured, strict=True))
    return (*largest[:4], largest[4] if not shape.fused_attention else 0.0)  # type: ignore[return-value]


def activation_bytes_per_token(shape: ModelShape, precision: str, mode: str, seq: int) -> tuple[float, float]:
    """(bytes saved for backward per token of the whole model, the same for one layer)."""
    terms = activation_terms(
        hidden=shape.hidden,
        layers=shape.layers,
        intermediate=shape.intermediate,
        attention_width=shape.attention_width,
        heads=shape.heads,
        seq=seq,
    )
    weights = np.array(coefficients(shape, precision, mode))
    whole = float(terms @ weights)
    per_layer = float((terms[[0, 1, 2, 4]] @ weights[[0, 1, 2, 4]]) / max(shape.layers, 1))
    return whole, per_layer


@dataclass(frozen=True)
class MemoryEstimate:
    """The parts of a stage's peak GPU memory, in GiB."""

    weights: float
    gradients: float
    optimizer: float
    autocast_copies: float
    activations: float
    working_set: float
    allocator: float
    context: float = CUDA_CONTEXT_GIB

    @property
    def total(self) -> float:
        return round(
            self.weights
            + self.gradients
            + self.optimizer
            + self.autocast_copies
            + self.activations
            + self.working_set
            + self.allocator
            + self.context,
            2,
        )

    def describe(self) -> str:
        """'weights 5.7 + gradients 5.7 + ... = 83.1 GiB', for messages."""
        parts = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
            ("autocast copies", self.autocast_copies),
            ("activations", self.activations),
            ("backward working set", self.working_set),
            ("allocator", self.allocator),
            ("CUDA context", self.context),
        ]
        return (
            " + ".join(f"{name} {value:.1f}" for name, value in parts if value) + f" = {self.total:.1f} GiB"
        )


def storage_bytes(precision: str) -> int:
    """Bytes per element of frozen weights (see w2s.models.weight_dtype)."""
    return 2 if precision in ("bfloat16", "float16") else 4


def estimate(shape: ModelShape, config: TrainConfig) -> MemoryEstimate:
    """The peak GPU memory of a stage of ``config`` (its dtype concrete) on a model of ``shape``."""
    precision = config.dtype
    half = precision in ("bfloat16", "float16")
    params = shape.parameters
    tokens = config.minibatch_size * config.max_length
    whole, per_layer = activation_bytes_per_token(shape, precision, config.mode, config.max_length)
    if config.mode == "probe":
        # Features under no_grad: nothing is saved; one layer's outputs live at a time.
        weights, trainable, copies = params * storage_bytes(precision), 0, 0.0
        activations, working = 0.0, tokens * per_layer * BACKWARD_WORKING_LAYERS
    else:
        if config.mode == "lora":
            # rank r on every Linear (in x out): r x (in + out) each, about 2r/width of its weights.
            trainable = int(shape.linear_parameters * 2 * config.lora_rank / max(shape.hidden, 1))
            weights = params * storage_bytes(precision) + trainable * 4
            copies = trainable * 2 if half else 0.0
        else:
            trainable, weights = params, params * 4
            copies = shape.linear_parameters * 2 if half else 0.0
        if config.gradient_checkpointing:
            # Each layer keeps its input (the float32 residual stream); backward recomputes one
            # layer at a time.
            activations = tokens * (shape.layers * shape.hidden * 4 + per_layer)
        else:
            activations = tokens * whole
        working = tokens * per_layer * BACKWARD_WORKING_LAYERS
    optimizer_bytes = 4 if config.optimizer == "adafactor" else 8
    gradients, optimizer = trainable * 4, trainable * optimizer_bytes
    allocator = ALLOCATOR_OVERHEAD * (activations + working)
    return MemoryEstimate(
        weights=round(weights / GiB, 3),
        gradients=round(gradients / GiB, 3),
        optimizer=round(optimizer / GiB, 3),
        autocast_copies=round(copies / GiB, 3),
        activations=round(activations / GiB, 3),
        working_set=round(working / GiB, 3),
        allocator=round(allocator / GiB, 3),
    )


def estimate_memory(spec: ModelSpec, config: TrainConfig) -> MemoryEstimate | None:
    """The stage's memory estimate; None when the model's config cannot be read."""
    shape = model_shape(spec)
    return estimate(shape, config) if shape is not None else None


def estimate_memory_gb(spec: ModelSpec, config: TrainConfig) -> float | None:
    """The total of :func:`estimate_memory`, in GiB."""
    found = estimate_memory(spec, config)
    return found.total if found is not None else None

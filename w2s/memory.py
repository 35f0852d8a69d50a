"""A rough GPU-memory estimate for one stage, used to route it to a GPU class.

Parameters are counted on the meta device (no weights are loaded). The estimate is deliberately
simple and errs high: weights, gradients and optimizer state by mode, plus activations for one
minibatch, plus a fixed allowance for the CUDA context.
"""

from __future__ import annotations

import functools
import logging

from w2s.spec import ModelSpec, TrainConfig

logger = logging.getLogger(__name__)

CUDA_CONTEXT_GB = 1.5
GB = 1024**3


@functools.lru_cache(maxsize=256)
def _config_shape(model: str, revision: str | None, trust_remote_code: bool) -> tuple[int, int, int] | None:
    """(parameters, hidden size, layers) from the model config alone, or None if unreachable."""
    try:
        import torch
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            backbone = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
        params = sum(p.numel() for p in backbone.parameters())
        layers = int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 12))
        return params, int(config.hidden_size), layers
    except Exception as error:  # offline hub id, odd config: routing falls back to the largest class
        logger.info("no memory estimate for %s: %s", model, error)
        return None


def parameter_count(spec: ModelSpec) -> int | None:
    """The backbone's number of parameters, from its config alone; None if the config is unreachable."""
    shape = _config_shape(spec.model, spec.revision, spec.trust_remote_code)
    return shape[0] if shape is not None else None


def estimate_memory_gb(spec: ModelSpec, config: TrainConfig) -> float | None:
    shape = _config_shape(spec.model, spec.revision, spec.trust_remote_code)
    if shape is None:
        return None
    params, hidden, layers = shape
    half = config.dtype in ("bfloat16", "float16", "auto")
    if config.mode == "probe":
        state_bytes = params * (2 if half else 4)  # inference only
        activation_layers = 1  # no activations kept for backward
    elif config.mode == "lora":
        state_bytes = params * 4 + params * 0.02 * 16  # frozen weights + small trainable share
        activation_layers = layers
    else:
        optimizer = 4 if config.optimizer == "adafactor" else 8
        state_bytes = params * (4 + 4 + optimizer)  # weights, gradients, optimizer state
        activation_layers = max(1, int(layers**0.5)) if config.gradient_checkpointing else layers
    tokens = config.minibatch_size * config.max_length
    # ~34 bytes of saved activations per token, hidden unit and layer in half precision.
    activation_bytes = tokens * hidden * activation_layers * (34 if half else 68)
    return round((state_bytes + activation_bytes) / GB + CUDA_CONTEXT_GB, 2)

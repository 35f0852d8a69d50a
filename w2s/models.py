"""Backbones, pooling and the classification head.

Any ``transformers.AutoModel`` works. Decoder LMs are pooled at the last *real* token, found through
the attention mask so it works with left or right padding and never mistakes a real token id 0
(GPT-2's "!") for padding; encoders are mean-pooled over real tokens.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from w2s.model_store import is_store_model, store_digest
from w2s.spec import ModelSpec, TrainConfig, is_local_model_name

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def is_decoder_lm(config: Any) -> bool:
    """True for causal LMs (GPT-2, Llama, ...). BERT-likes also have a causal-LM class, so a model
    counts as a decoder only if it has no masked-LM class."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", "")
    return (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state of each row's last real token, for either padding side.

    hidden: (batch, seq, dim); attention_mask: (batch, seq) of 0/1. Returns (batch, dim).
    """
    seq_len = attention_mask.shape[1]
    # Position of the last 1: flip, find the first 1, map back.
    last = seq_len - 1 - attention_mask.flip(dims=[1]).to(torch.int64).argmax(dim=1)  # (batch,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states of real tokens. hidden: (batch, seq, dim) -> (batch, dim)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


POOLERS = {"last": last_token_pool, "mean": mean_pool}


def float32_head(head: nn.Linear, features: torch.Tensor) -> torch.Tensor:
    """The head in float32 even inside an autocast region (which would run a Linear in bf16), so
    logits and soft labels keep full precision (bf16 keeps ~3 digits and makes ties in AUROC)."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        return head(features.float())


def zero_head(hidden_size: int, bias: bool) -> nn.Linear:
    head = nn.Linear(hidden_size, 2, bias=bias)
    nn.init.zeros_(head.weight)
    if head.bias is not None:
        nn.init.zeros_(head.bias)
    return head


class Classifier(nn.Module):
    """A backbone, a pooling rule and a two-class linear head initialised at zero.

    The zero head makes every run start from the same uninformative 50/50 prediction, as in the
    reference code (whose head has no bias: ``head_bias=False``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        hidden_size: int,
        pooling: str,
        causal: bool = False,
        head_bias: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.causal = causal
        self.head = zero_head(hidden_size, head_bias)

    def features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, left_padded: bool | None = None
    ) -> torch.Tensor:
        """Pooled features (batch, hidden). ``left_padded``: whether any row starts with padding, as
        the batch's collation knows on the host; None looks at the mask (which waits for the device)."""
        if not self.causal:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            if left_padded is None:
                left_padded = not bool(attention_mask[:, 0].all())
            if not left_padded:
                # Right padding (or none): causal attention already keeps every real token from
                # seeing the pads after it, so the mask is redundant; without it attention takes its
                # fast unmasked path (about 15% of a training step on CPU).
                hidden = self.backbone(input_ids=input_ids).last_hidden_state
            else:
                # Left padding: positions must count real tokens only, as if the pads were absent.
                position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
                hidden = self.backbone(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
                ).last_hidden_state
        return POOLERS[self.pooling](hidden, attention_mask)  # (batch, hidden)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, left_padded: bool | None = None
    ) -> torch.Tensor:
        return float32_head(self.head, self.features(input_ids, attention_mask, left_padded))  # (batch, 2)


class ProbeHead(nn.Module):
    """A linear head on cached features. Features are standardised with the training set's
    statistics so one learning rate suits every backbone's feature scale."""

    def __init__(self, train_features: torch.Tensor, bias: bool = True):
        super().__init__()
        self.register_buffer("mean", train_features.mean(dim=0))
        self.register_buffer("std", train_features.std(dim=0).clamp(min=1e-6))
        self.head = zero_head(train_features.shape[1], bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return float32_head(self.head, (features.float() - self.mean) / self.std)


@dataclass
class LoadedModel:
    model: Classifier
    tokenizer: Any
    pooling: str


def stored_model_dir(name: str, *, weights: bool = True) -> Path:
    """This host's copy of a model pushed into the artifact store (w2s/model_store.py), fetched
    the first time (without weight files unless ``weights``)."""
    from w2s.model_store import fetch_model
    from w2s.settings import LibrarySettings
    from w2s.store import ArtifactStore

    settings = LibrarySettings()
    return fetch_model(
        name,
        ArtifactStore(settings.artifact_store),
        settings.model_cache_dir,
        weights=weights,
        cache_bytes=int(settings.model_cache_gb * 2**30),
    )


def resolve_model_source(spec: ModelSpec, *, weights: bool = True) -> str:
    """A local directory when the name has a path's shape (absolute, or starting with ``.`` or ``~``),
    which must exist; ``store:<hash>``: this host's copy of a model pushed into the artifact store
    (``weights=False``: config and tokenizer only); anything else is a hub id. transformers would
    load a directory that happens to sit under a hub id's name in the working directory in the hub
    model's place, so a hub id whose name is such a directory is refused: name a local model
    ``./like/this``."""
    if is_store_model(spec.model):
        return str(stored_model_dir(spec.model, weights=weights))
    if is_local_model_name(spec.model):
        path = Path(spec.model).expanduser()
        if not path.is_dir():
            raise ValueError(f"model: local directory {spec.model!r} does not exist")
        return str(path.resolve())
    if Path(spec.model).exists():
        raise ValueError(
            f"model: {spec.model!r} is read as a hub id, and is never loaded from the disk; for a local "
            f"directory write './{spec.model}' or an absolute path"
        )
    return spec.model


def load_tokenizer(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    source = resolve_model_source(spec, weights=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise ValueError(f"model: cannot load tokenizer for {spec.model!r}: {error}") from None
    if tokenizer.pad_token_id is None:
        # Decoder LMs often ship without a pad token; padding is masked out, so eos is safe.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def weight_dtype(mode: str, precision: str) -> torch.dtype:
    """The dtype the backbone's weights are stored in, whatever the checkpoint's config declares.

    Full fine-tuning keeps float32 master weights (and so float32 gradients and AdamW state): under
    bf16 autocast every matmul still runs in bf16, but updates of lr x gradient far below a bf16
    weight's rounding step are kept instead of lost. Frozen weights (a probe's backbone, LoRA's
    base) are stored in the precision the stage computes in, which autocast casts them to for every
    matmul anyway: float32 storage would only double their memory. ``precision`` is the stage's
    concrete one (w2s.stages.resolve_precision); "auto" counts as float32."""
    if mode == "full":
        return torch.float32
    return HALF_DTYPES.get(precision, torch.float32)


def load_classifier(spec: ModelSpec, config: TrainConfig) -> LoadedModel:
    """Build the classifier for ``spec``; LoRA adapters are added in lora mode. Weights are loaded in
    :func:`weight_dtype`; what a stage trains (the head, LoRA's adapters, every weight in full mode)
    is float32."""
    from transformers import AutoConfig, AutoModel

    source = resolve_model_source(spec)
    try:
        model_config = AutoConfig.from_pretrained(
            source, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise ValueError(f"model: cannot load {spec.model!r}: {error}") from None
    if getattr(model_config, "is_encoder_decoder", False):
        raise ValueError(f"model: {spec.model!r} is an encoder-decoder model; use an encoder or a decoder LM")
    tokenizer = load_tokenizer(spec)
    pooling = spec.pooling if spec.pooling != "auto" else ("last" if is_decoder_lm(model_config) else "mean")
    # A classifier reads each text once: a decoder's key/value cache would only hold memory.
    model_config.use_cache = False
    backbone = AutoModel.from_pretrained(
        source,
        revision=spec.revision,
        trust_remote_code=spec.trust_remote_code,
        config=model_config,
        dtype=weight_dtype(config.mode, config.dtype),
    )
    backbone.config.pad_token_id = tokenizer.pad_token_id
    if config.mode == "probe":
        backbone.requires_grad_(False)
    if config.gradient_checkpointing:
        backbone.gradient_checkpointing_enable()
    if config.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules="all-linear"
        )
        # autocast_adapter_dtype: adapters are float32 even on a bf16 base.
        backbone = get_peft_model(backbone, lora, autocast_adapter_dtype=True)
    hidden_size = int(model_config.hidden_size)
    classifier = Classifier(
        backbone, hidden_size, pooling, causal=is_decoder_lm(model_config), head_bias=config.head_bias
    )
    return LoadedModel(classifier, tokenizer, pooling)


def model_fingerprint(spec: ModelSpec) -> dict[str, Any]:
    """What identifies a model's weights, for stage keys: a content hash for local directories,
    the hub id and revision otherwise."""
    if is_store_model(spec.model):  # the manifest's hash names every byte of it
        return {"store": store_digest(spec.model)}
    path = Path(spec.model).expanduser()
    if is_local_model_name(spec.model) and path.is_dir():
        return {"local_sha256": _directory_sha256(str(path.resolve()), _directory_stamp(path))}
    return {"hub": spec.model, "revision": spec.revision or "main"}


def _directory_stamp(path: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple(
        (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    )


@functools.lru_cache(maxsize=64)
def _directory_sha256(path: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    # Hash config, tokenizer and weight files; the stamp makes the cache notice changed files.
    digest = hashlib.sha256()
    for relative, size, _ in stamp:
        digest.update(json.dumps([relative, size]).encode())
        with open(os.path.join(path, relative), "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()

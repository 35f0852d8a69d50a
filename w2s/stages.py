"""The three stages of a weak-to-strong experiment and their stage keys.

A stage is planned first (:func:`plan_weak`, :func:`plan_ceiling`, :func:`plan_student`): the plan
holds everything that determines the result and hashes it into the stage key. :func:`run_stage`
then returns the stored result for that key, or trains, evaluates and stores it. Stages hand
results to each other by key (the student reads the weak stage's soft labels through the weak
key), never through file names or row order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
import torch

from w2s import metrics
from w2s.datasets import DatasetSplits, LabeledTexts
from w2s.losses import build_loss
from w2s.models import ProbeHead, load_classifier, load_tokenizer, model_fingerprint
from w2s.spec import JobSpec, LossSpec, ModelSpec, TrainConfig, resolve_training
from w2s.store import ArtifactStore
from w2s.train import (
    FeatureData,
    ProgressCallback,
    TokenData,
    extract_features,
    fit,
    one_hot,
    predict_proba,
    set_seed,
    soft,
    tokenize,
)

logger = logging.getLogger(__name__)

STAGES = "stages"
FEATURES = "features"
# Bump when a change to this library changes what a stage computes, to invalidate old results.
STAGE_FORMAT = 1


class StageCancelled(Exception):
    """Training was stopped by the progress callback; nothing was stored."""


def library_versions() -> dict[str, str]:
    versions = {"stage_format": str(STAGE_FORMAT)}
    for package in ("w2s-service", "torch", "transformers", "peft"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


def hash_payload(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class StagePlan:
    """Everything that determines one stage's result."""

    kind: str  # "weak" | "ceiling" | "student:<loss label>"
    seed: int
    model: ModelSpec
    config: TrainConfig
    train: LabeledTexts  # texts to train on (labels used only for ground-truth stages)
    test: LabeledTexts
    loss: LossSpec
    predict: LabeledTexts | None = None  # weak stage: half B, to label for the students
    weak_key: str | None = None  # student stages: the weak stage whose soft labels they learn

    @property
    def key(self) -> str:
        return hash_payload(
            {
                "kind": self.kind,
                "seed": self.seed,
                "model": model_fingerprint(self.model),
                "pooling": self.model.pooling,
                "trust_remote_code": self.model.trust_remote_code,
                "config": dataclasses.asdict(self.config),
                "train": self.train.content_hash(),
                "test": self.test.content_hash(),
                "predict": self.predict.content_hash() if self.predict is not None else None,
                "loss": {"name": self.loss.name, "params": self.loss.params},
                "weak_key": self.weak_key,
                "versions": library_versions(),
            }
        )


@dataclass(frozen=True)
class StageResult:
    kind: str
    seed: int
    key: str
    accuracy: float
    auroc: float | None
    test_probs: str  # blob: P(label = 1) on the test set, in test order
    soft_labels: str | None  # weak stage only, blob: P(label = 1) on half B
    checkpoint: str | None
    seconds: float
    train_seconds: float
    steps: int
    cached: bool = False

    def to_record(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record.pop("cached")
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any], *, cached: bool) -> StageResult:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in fields}, cached=cached)


XENT = LossSpec(name="xent")


def plan_weak(spec: JobSpec, seed: int, splits: DatasetSplits) -> StagePlan:
    """The weak supervisor: ground truth on half A; predicts soft labels on half B."""
    return StagePlan(
        kind="weak",
        seed=seed,
        model=spec.weak,
        config=resolve_training(spec.weak),
        train=splits.train_a,
        test=splits.test,
        loss=XENT,
        predict=splits.train_b,
    )


def plan_ceiling(spec: JobSpec, seed: int, splits: DatasetSplits) -> StagePlan:
    """The strong ceiling: ground truth on half B."""
    return StagePlan(
        kind="ceiling",
        seed=seed,
        model=spec.strong,
        config=resolve_training(spec.strong),
        train=splits.train_b,
        test=splits.test,
        loss=XENT,
    )


def plan_student(spec: JobSpec, loss: LossSpec, seed: int, splits: DatasetSplits) -> StagePlan:
    """A strong student: the weak model's soft labels on half B, with ``loss``."""
    student = spec.student_options()
    return StagePlan(
        kind=f"student:{loss.label}",
        seed=seed,
        model=student,
        config=resolve_training(student),
        train=splits.train_b,
        test=splits.test,
        loss=loss,
        weak_key=plan_weak(spec, seed, splits).key,
    )


def pick_device() -> torch.device:
    # Called when a stage runs, never at import: probing CUDA in a parent process breaks forking.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Backbone:
    """Loads the model on first use, so a probe stage whose features are all cached loads nothing."""

    def __init__(self, plan: StagePlan, device: torch.device):
        self.plan = plan
        self.device = device
        self._loaded: Any = None
        self._tokenizer: Any = None

    @property
    def loaded(self) -> Any:
        if self._loaded is None:
            self._loaded = load_classifier(self.plan.model, self.plan.config)
            self._loaded.model.to(self.device)
        return self._loaded

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.plan.model)
        return self._tokenizer

    def tokens(self, texts: LabeledTexts) -> TokenData:
        tokenizer = self.tokenizer
        ids = tokenize(tokenizer, texts.texts, self.plan.config.max_length)
        return TokenData(ids, tokenizer.pad_token_id, tokenizer.padding_side)


def cached_features(backbone: _Backbone, texts: LabeledTexts, store: ArtifactStore) -> torch.Tensor:
    """Probe features of ``texts``: computed once per model and text set, then read from the store."""
    plan = backbone.plan
    key = hash_payload(
        {
            "model": model_fingerprint(plan.model),
            "pooling": plan.model.pooling,
            "max_length": plan.config.max_length,
            "dtype": plan.config.dtype,
            "texts": texts.content_hash(),
            "versions": library_versions(),
        }
    )
    record = store.get_record(FEATURES, key)
    if record is not None:
        return torch.from_numpy(store.get_array(record["blob"]))
    started = time.perf_counter()
    features = extract_features(
        backbone.loaded.model,
        backbone.tokens(texts),
        batch_size=plan.config.minibatch_size,
        device=backbone.device,
        dtype=plan.config.dtype,
    )
    store.put_record(
        FEATURES, key, {"blob": store.put_array(features.numpy()), "shape": list(features.shape)}
    )
    logger.info("features of %d texts in %.1fs", len(texts), time.perf_counter() - started)
    return features


def _training_labels(plan: StagePlan, store: ArtifactStore) -> torch.Tensor:
    if plan.weak_key is None:
        return one_hot(plan.train.labels)
    weak = store.get_record(STAGES, plan.weak_key)
    if weak is None or not weak.get("soft_labels"):
        raise RuntimeError(f"{plan.kind}: the weak stage {plan.weak_key[:12]} has no stored soft labels")
    return soft(store.get_array(weak["soft_labels"]))


def run_stage(
    plan: StagePlan,
    store: ArtifactStore,
    *,
    device: torch.device | None = None,
    callback: ProgressCallback | None = None,
) -> StageResult:
    """Return the stored result for ``plan.key``, or train, evaluate and store it."""
    key = plan.key
    record = store.get_record(STAGES, key)
    if record is not None:
        logger.info("%s seed %d: cached (%s)", plan.kind, plan.seed, key[:12])
        return StageResult.from_record(record, cached=True)

    started = time.perf_counter()
    device = device or pick_device()
    config = plan.config
    labels = _training_labels(plan, store)
    set_seed(plan.seed)
    backbone = _Backbone(plan, device)
    if config.mode == "probe":
        train_features = cached_features(backbone, plan.train, store)
        model: torch.nn.Module = ProbeHead(train_features).to(device)
        train_data: Any = FeatureData(train_features)
        test_data: Any = FeatureData(cached_features(backbone, plan.test, store))
        predict_data: Any = (
            FeatureData(cached_features(backbone, plan.predict, store)) if plan.predict else None
        )
    else:
        model = backbone.loaded.model
        train_data = backbone.tokens(plan.train)
        test_data = backbone.tokens(plan.test)
        predict_data = backbone.tokens(plan.predict) if plan.predict else None

    def probabilities(data: Any) -> np.ndarray:
        return predict_proba(model, data, batch_size=config.minibatch_size, device=device, dtype=config.dtype)

    def evaluate() -> float:
        return metrics.accuracy(probabilities(test_data), np.asarray(plan.test.labels))

    outcome = fit(
        model,
        train_data,
        labels,
        config,
        build_loss(plan.loss.name, plan.loss.params),
        device=device,
        seed=plan.seed,
        evaluate=evaluate,
        callback=callback,
    )
    if outcome.stopped:
        raise StageCancelled(f"{plan.kind} seed {plan.seed} stopped at step {outcome.steps}")

    test_probs = probabilities(test_data)
    test_labels = np.asarray(plan.test.labels)
    result = StageResult(
        kind=plan.kind,
        seed=plan.seed,
        key=key,
        accuracy=metrics.accuracy(test_probs, test_labels),
        auroc=metrics.auroc(test_probs, test_labels),
        test_probs=store.put_array(test_probs),
        soft_labels=store.put_array(probabilities(predict_data)) if predict_data is not None else None,
        checkpoint=_save_checkpoint(model, store) if config.save_checkpoint else None,
        seconds=time.perf_counter() - started,
        train_seconds=outcome.seconds,
        steps=outcome.steps,
    )
    store.put_record(STAGES, key, result.to_record())
    logger.info("%s seed %d: accuracy %.4f in %.1fs", plan.kind, plan.seed, result.accuracy, result.seconds)
    return result


def _save_checkpoint(model: torch.nn.Module, store: ArtifactStore) -> str:
    """The trained tensors (everything in full mode; the head and adapters otherwise) and buffers."""
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    state = {name: t.detach().cpu() for name, t in model.state_dict().items() if name not in frozen}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return store.put_bytes(buffer.getvalue())

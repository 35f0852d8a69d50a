"""The stages of a weak-to-strong experiment (weak, ceiling, students; and a chain's, when
bootstrapping) and their stage keys.

A stage is planned first (:func:`stage_layout` lays out a seed's stages, :func:`plan_seed` plans
them): the plan holds everything that determines the result and hashes it into the stage key.
:func:`run_stage` then returns the stored result for that key, or trains, evaluates and stores it. Stages hand
results to each other by key (the student reads the weak stage's soft labels through the weak
key), never through file names or row order.

What the key hashes, so that a stored result is never served for a different computation: the
model's weights (a content hash, or hub id and revision), the resolved training config (with the
concrete precision the stage runs in), the device kind, the exact rows (texts and labels), the loss
and its parameters, library versions, and the source code that produces the numbers: the w2s modules
a stage runs and, for a plug-in loss, the source of the module defining it. Editing any of them
recomputes instead of reusing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import logging
import socket
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
import torch

from w2s import metrics
from w2s.datasets import LabeledTexts
from w2s.losses import PLUGIN_HOW_TO, UnknownLoss, build_loss, loss_names, loss_source
from w2s.models import ProbeHead, load_classifier, load_tokenizer, model_fingerprint
from w2s.resume import CheckpointPolicy, StoreCheckpoints
from w2s.spec import JobSpec, LossSpec, ModelSpec, TrainConfig, chain_role, resolved_models
from w2s.splits import SeedData
from w2s.store import ArtifactStore
from w2s.train import (
    FeatureData,
    Holdout,
    ProgressCallback,
    Rows,
    StageError,
    Stopped,
    TokenData,
    extract_features,
    fit,
    holdout_split,
    native_bf16,
    numerics,
    one_hot,
    predict_proba,
    set_seed,
    soft,
    tokenize,
)

logger = logging.getLogger(__name__)

STAGES = "stages"
FEATURES = "features"
# The layout of stage keys and records; the code hash below covers changes to what stages compute.
KEY_FORMAT = 3
# The modules whose code decides a stage's numbers: data selection and cleaning, tokenisation,
# the model and head, the training loop, the losses, the metrics and the stage itself.
CODE_MODULES = (
    "w2s.datasets",
    "w2s.splits",
    "w2s.overlap",
    "w2s.spec",
    "w2s.models",
    "w2s.train",
    "w2s.losses",
    "w2s.metrics",
    "w2s.stages",
)


class StageCancelled(Exception):
    """Training was stopped by the progress callback; nothing was stored."""


@functools.cache
def library_versions() -> dict[str, str]:
    """The key format and the versions of the packages that compute a stage (read once per process:
    reading package metadata costs milliseconds, and a sweep computes thousands of keys).

    Public versions only: a local build label (torch ``2.13.0+cpu`` or ``+cu128``) names how a wheel
    was built for a machine, not what it computes, and hosts of one cluster differ in it; the device
    kind, which does change results, is part of every key by itself."""
    versions = {"key_format": str(KEY_FORMAT)}
    for package in ("w2s-service", "torch", "transformers", "peft"):
        try:
            versions[package] = public_version(metadata.version(package))
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


def runtime_fingerprint() -> dict[str, str]:
    """What a host computes stage keys with: its library versions and the hash of the w2s code. Two
    hosts with the same fingerprint compute the same key for the same plan."""
    return {**library_versions(), "code": library_code_hash()[:16]}


def runtime_id() -> str:
    return hashlib.sha256(json.dumps(runtime_fingerprint(), sort_keys=True).encode()).hexdigest()[:16]


def public_version(version: str) -> str:
    """``2.13.0+cu128`` -> ``2.13.0``; a version packaging cannot parse is kept up to any ``+``."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).public
    except InvalidVersion:
        return version.split("+", 1)[0]


def hash_payload(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def module_source(name: str) -> bytes:
    """The source file of an importable module, as bytes."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"cannot find the source of module {name!r}")
    with open(spec.origin, "rb") as handle:
        return handle.read()


@functools.cache
def library_code_hash() -> str:
    """SHA-256 of the source of every module in CODE_MODULES (read once per process)."""
    digest = hashlib.sha256()
    for name in CODE_MODULES:
        digest.update(name.encode() + b"\n")
        digest.update(module_source(name))
    return digest.hexdigest()


def loss_code_hash(loss: LossSpec) -> str | None:
    """A plug-in loss's source hash (the module defining it, as this process imported it:
    w2s.losses.loss_source); None for the built-in losses, which the library hash covers."""
    source = loss_source(loss.name)
    return None if source is None else hashlib.sha256(source).hexdigest()


def resolve_precision(dtype: str, device_kind: str) -> str:
    """The precision a stage computes in: "auto" is bf16 autocast on CUDA and float32 elsewhere;
    float16 on a CPU runs as bf16 (CPU autocast has no float16), and tf32 as float32 (it is a GPU
    matmul mode)."""
    if dtype == "auto":
        return "bfloat16" if device_kind == "cuda" else "float32"
    if device_kind != "cuda":
        return {"float16": "bfloat16", "tf32": "float32"}.get(dtype, dtype)
    return dtype


@dataclass(frozen=True)
class StagePlan:
    """Everything that determines one stage's result."""

    kind: str  # "weak" | "ceiling" | "student:<loss label>" | "ceiling@<i>" | "chain@<i>:<loss label>"
    seed: int
    model: ModelSpec
    config: TrainConfig  # its dtype is the concrete precision the stage runs in (never "auto")
    train: LabeledTexts  # texts to train on (labels used only for ground-truth stages)
    test: LabeledTexts
    loss: LossSpec
    device_kind: str = "cpu"  # "cpu" | "cuda": the stage runs on this kind of device
    predict: LabeledTexts | None = None  # weak stage: half B, to label for the students
    weak_key: str | None = None  # student stages: the stage whose soft labels they learn
    # Probe stages whose head trains on another kind of device than the features were computed on
    # (features on a GPU, the head on a CPU worker): the features' device kind. None: the same.
    feature_device_kind: str | None = None
    features_from: str | None = None  # then: the kind of the stage that computes those features
    # Who may reuse this result: None, anyone with the same inputs; else an opaque owner (a service
    # team whose private data or model it was computed from). Part of the key, so a result computed
    # from one owner's private inputs is never served to another, nor is its existence revealed.
    scope: str | None = None

    @property
    def features_device_kind(self) -> str:
        return self.feature_device_kind or self.device_kind

    @property
    def key(self) -> str:
        # Not the kind: what a stage computes is fixed by the fields below, so a chain's ceiling of
        # model 2 and an ordinary job's ceiling of the same model share one result.
        return hash_payload(
            {
                "seed": self.seed,
                "model": model_fingerprint(self.model),
                "pooling": self.model.pooling,
                "trust_remote_code": self.model.trust_remote_code,
                "config": dataclasses.asdict(self.config),
                "device_kind": self.device_kind,
                "feature_device_kind": self.feature_device_kind,
                "train": self.train.content_hash(),
                "test": self.test.content_hash(),
                "predict": self.predict.content_hash() if self.predict is not None else None,
                "loss": {
                    "name": self.loss.name,
                    "params": self.loss.params,
                    "code": loss_code_hash(self.loss),
                },
                "weak_key": self.weak_key,
                "versions": library_versions(),
                "code": library_code_hash(),
            }
            | scoped(self.scope)
        )


def scoped(scope: str | None) -> dict[str, str]:
    """The key's part for a scope: nothing for a public result (its keys stay as they were)."""
    return {"scope": scope} if scope else {}


def put_rows(store: ArtifactStore, rows: LabeledTexts, memo: dict[str, Any] | None = None) -> dict[str, Any]:
    """Store a split's rows (content-addressed: the same rows are stored once); a reference to them.
    ``memo`` remembers references by content hash across calls (a job's stages share their splits)."""
    content = rows.content_hash()
    if memo is not None and content in memo:
        return dict(memo[content])
    blob = store.put_bytes(json.dumps({"texts": rows.texts, "labels": rows.labels}).encode())
    ref = {"blob": blob, "content": content, "n": len(rows)}
    if memo is not None:
        memo[content] = ref
    return dict(ref)


def get_rows(store: ArtifactStore, ref: dict[str, Any]) -> LabeledTexts:
    """The rows a :func:`put_rows` reference names, checked against their content hash."""
    data = json.loads(store.get_bytes(ref["blob"]))
    rows = LabeledTexts(data["texts"], data["labels"])
    if rows.content_hash() != ref["content"]:
        raise StageError(f"stored rows {ref['blob'][:12]} do not match their content hash")
    return rows


def plan_record(plan: StagePlan, store: ArtifactStore, memo: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a worker needs to run ``plan`` exactly as planned, as JSON: the rows are stored in
    ``store`` and referenced; ``key`` is the planner's stage key, which the worker must reproduce."""
    return {
        "kind": plan.kind,
        "seed": plan.seed,
        "model": plan.model.model_dump(mode="json"),
        "config": dataclasses.asdict(plan.config),
        "train": put_rows(store, plan.train, memo),
        "test": put_rows(store, plan.test, memo),
        "predict": put_rows(store, plan.predict, memo) if plan.predict is not None else None,
        "loss": {"name": plan.loss.name, "params": plan.loss.params},
        "device_kind": plan.device_kind,
        "weak_key": plan.weak_key,
        "feature_device_kind": plan.feature_device_kind,
        "features_from": plan.features_from,
        "scope": plan.scope,
        "key": plan.key,
    }


class PlanMismatch(StageError):
    """This worker computes another stage key for a stored plan than the planner did."""


def plan_from_record(record: dict[str, Any], store: ArtifactStore) -> StagePlan:
    """The stored plan as the planner made it. A worker whose code, library versions or model files
    differ from the planner's computes another key: it refuses to run, naming both keys. A worker
    without the plan's plug-in loss fails it, naming the loss and how to install it."""
    require_loss(record["loss"]["name"], f"{record['kind']} seed {record['seed']}")
    plan = StagePlan(
        kind=record["kind"],
        seed=record["seed"],
        model=ModelSpec.model_validate(record["model"]),
        config=TrainConfig(**record["config"]),
        train=get_rows(store, record["train"]),
        test=get_rows(store, record["test"]),
        loss=LossSpec(name=record["loss"]["name"], params=record["loss"]["params"]),
        device_kind=record["device_kind"],
        predict=get_rows(store, record["predict"]) if record.get("predict") else None,
        weak_key=record.get("weak_key"),
        feature_device_kind=record.get("feature_device_kind"),
        features_from=record.get("features_from"),
        scope=record.get("scope"),
    )
    if plan.key != record["key"]:
        raise PlanMismatch(
            f"{plan.kind} seed {plan.seed}: this worker computes stage key {plan.key[:16]} for the stored "
            f"plan, the planner computed {record['key'][:16]}: its w2s code, library versions "
            f"({', '.join(f'{k} {v}' for k, v in library_versions().items())}), model files or the "
            "source of its plug-in loss differ from the planner's; run the same version everywhere"
        )
    return plan


def require_loss(name: str, where: str) -> None:
    """Raise StageError unless loss ``name`` is registered here. A job the API accepted names losses
    the API has: a worker without one lacks a plug-in the API's host has installed."""
    try:
        loss_source(name)
    except UnknownLoss:
        raise StageError(
            f"{where}: loss {name!r} is not installed on this worker's host ({socket.gethostname()}), "
            f"though the API accepted the job with it; {PLUGIN_HOW_TO}. Then restart the workers and "
            f"retry the job. Losses here: {', '.join(loss_names())}"
        ) from None


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
    best_step: int | None = None  # early stopping: the step whose weights were kept
    holdout_loss: float | None = None  # early stopping: the held-out loss at best_step
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
Models = dict[str, tuple[ModelSpec, TrainConfig]]


def _concrete(config: TrainConfig, device_kind: str) -> TrainConfig:
    return dataclasses.replace(config, dtype=resolve_precision(config.dtype, device_kind))


@dataclass(frozen=True)
class StageSlot:
    """One stage of a seed, before its data is known: its kind, the model role it trains (see
    w2s.spec.resolved_models), its loss, the stage whose soft labels it learns (None: ground truth)
    and whether it labels half B for a later stage."""

    kind: str
    role: str
    loss: LossSpec = XENT
    supervisor: str | None = None
    labels_half_b: bool = False
    # The stage that computes the same probe features (the same model on half B and the test
    # set): a probe student's head can train on a CPU once that stage has run on a GPU.
    features_from: str | None = None


def student_kind(loss: LossSpec) -> str:
    """The kind of the (direct) weak -> strong student stage trained with ``loss``."""
    return f"student:{loss.label}"


def chain_kind(position: int, loss: LossSpec) -> str:
    """The kind of a chain's student stage: the model at ``position`` (2 .. k) trained with ``loss``
    on the labels of the model before it."""
    return f"chain@{position}:{loss.label}"


def stages_per_seed(n_losses: int, chain_length: int = 0) -> int:
    """How many stages ``stage_layout`` lays out per seed, by arithmetic alone: the service refuses an
    oversized job or sweep with this before it resolves a single model (tests check it against the
    layout)."""
    chain_ceilings = chain_length
    chain_students = n_losses * (chain_length + 1) if chain_length else 0
    return 2 + n_losses + chain_ceilings + chain_students


def stage_layout(spec: JobSpec) -> list[StageSlot]:
    """A seed's stages in run order: the weak supervisor (ground truth on half A; labels half B), the
    strong ceiling (ground truth on half B), one student per loss (the weak labels of half B). With a
    chain (weak = model 1 -> chain -> strong = model k): the ceiling of each intermediate model, and
    per loss the chain's students, model 2 on the weak labels, each next model on the labels its
    predecessor gives half B. The library and the service both lay out stages here."""
    slots = [
        StageSlot("weak", "weak", labels_half_b=True),
        StageSlot("ceiling", "ceiling"),
        *(
            StageSlot(student_kind(loss), "student", loss, supervisor="weak", features_from="ceiling")
            for loss in spec.losses
        ),
    ]
    last = len(spec.chain) + 2
    if spec.chain:
        slots += [StageSlot(f"ceiling@{p}", chain_role("ceiling", p)) for p in range(2, last)]
    for loss in spec.losses if spec.chain else []:
        for position in range(2, last + 1):
            slots.append(
                StageSlot(
                    chain_kind(position, loss),
                    "student" if position == last else chain_role("student", position),
                    loss,
                    supervisor="weak" if position == 2 else chain_kind(position - 1, loss),
                    labels_half_b=position < last,
                    features_from="ceiling" if position == last else f"ceiling@{position}",
                )
            )
    return slots


def plan_seed(
    spec: JobSpec,
    data: SeedData,
    *,
    device_kind: str,
    models: Models | None = None,
    probe_head_device_kind: str | None = None,
    scope: str | None = None,
) -> list[StagePlan]:
    """One seed's stage plans, in :func:`stage_layout`'s order. ``probe_head_device_kind``: where
    probe heads train when their features come from an earlier stage (a CPU worker in a deployment
    whose GPUs compute features), if not on ``device_kind``. ``scope``: see StagePlan.scope."""
    models = models or resolved_models(spec)
    roles = {slot.kind: slot.role for slot in stage_layout(spec)}
    plans: dict[str, StagePlan] = {}
    # The weak supervisor learns on half A, students on half B; ceilings on the half the spec says.
    ceiling_rows = data.train_a if spec.ceiling_half == "a" else data.train_b
    for slot in stage_layout(spec):
        model, config = models[slot.role]
        head_elsewhere = (
            probe_head_device_kind not in (None, device_kind)
            and slot.features_from is not None
            # A ceiling on half A never computes half B's features, which a student's head needs.
            and not (spec.ceiling_half == "a" and slot.features_from.startswith("ceiling"))
            and same_features(models[slot.role], models[roles[slot.features_from]])
        )
        plans[slot.kind] = StagePlan(
            kind=slot.kind,
            seed=data.seed,
            model=model,
            # The precision of the features' device: the features are computed in it.
            config=_concrete(config, device_kind),
            train=(
                data.train_a
                if slot.kind == "weak"
                else ceiling_rows
                if slot.kind.startswith("ceiling")
                else data.train_b
            ),
            test=data.test,
            loss=slot.loss,
            device_kind=probe_head_device_kind if head_elsewhere else device_kind,  # type: ignore[arg-type]
            predict=data.train_b if slot.labels_half_b else None,
            weak_key=plans[slot.supervisor].key if slot.supervisor else None,
            feature_device_kind=device_kind if head_elsewhere else None,
            features_from=slot.features_from if head_elsewhere else None,
            scope=scope,
        )
    return list(plans.values())


def same_features(a: tuple[ModelSpec, TrainConfig], b: tuple[ModelSpec, TrainConfig]) -> bool:
    """Whether two probe-mode roles read the same features (model, pooling, tokenisation and
    precision): then one computes what the other trains its head on."""
    (model_a, config_a), (model_b, config_b) = a, b
    return (
        config_a.mode == config_b.mode == "probe"
        and (model_a.model, model_a.revision, model_a.pooling, model_a.trust_remote_code)
        == (model_b.model, model_b.revision, model_b.pooling, model_b.trust_remote_code)
        and (config_a.max_length, config_a.truncation, config_a.dtype)
        == (config_b.max_length, config_b.truncation, config_b.dtype)
    )


def plan_weak(
    spec: JobSpec, seed: int, data: SeedData, *, device_kind: str, models: Models | None = None
) -> StagePlan:
    """The weak supervisor's plan alone."""
    assert data.seed == seed
    return plan_seed(spec, data, device_kind=device_kind, models=models)[0]


def pick_device() -> torch.device:
    # Called when a stage runs, never at import: probing CUDA in a parent process breaks forking.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_for(plan: StagePlan) -> torch.device:
    """The device the plan was made for; a StageError if this machine cannot provide it as planned."""
    if plan.device_kind == "cuda":
        if not torch.cuda.is_available():
            raise StageError(f"{plan.kind}: planned for a CUDA GPU, but this worker has none")
        device = torch.device("cuda")
        if plan.config.dtype == "bfloat16" and not native_bf16(device):
            raise StageError(
                f"{plan.kind}: planned in bfloat16 (dtype auto on a GPU), which this GPU has no "
                "hardware for (emulated bf16 runs many times slower); set dtype to float16 or float32"
            )
        return device
    return torch.device(plan.device_kind)


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

    def tokens(self, texts: LabeledTexts | tuple[str, ...]) -> TokenData:
        tokenizer = self.tokenizer
        rows = texts.texts if isinstance(texts, LabeledTexts) else texts
        ids = tokenize(tokenizer, rows, self.plan.config.max_length, self.plan.config.truncation)
        return TokenData(ids, tokenizer.pad_token_id, tokenizer.padding_side)


def text_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def feature_space_key(plan: StagePlan) -> str:
    """What decides a text's probe features: the model, pooling, tokenisation, precision, device
    kind and code. Features are stored per text under this key, so any split or seed reuses them."""
    return hash_payload(
        {
            "model": model_fingerprint(plan.model),
            "pooling": plan.model.pooling,
            "trust_remote_code": plan.model.trust_remote_code,
            "max_length": plan.config.max_length,
            "truncation": plan.config.truncation,
            "precision": plan.config.dtype,
            "device_kind": plan.features_device_kind,
            "versions": library_versions(),
            "code": library_code_hash(),
        }
        | scoped(plan.scope)  # private texts' features are neither shared nor found by another owner
    )


def cached_features(
    backbone: _Backbone,
    texts: LabeledTexts,
    store: ArtifactStore,
    *,
    callback: ProgressCallback | None = None,
    split: str = "",
) -> torch.Tensor:
    """Probe features (n, hidden) of ``texts``: each distinct text is computed once per feature space
    and stored in shards (one per computation), then gathered from the store."""
    namespace = f"{FEATURES}/{feature_space_key(backbone.plan)}"
    ids = [text_id(text) for text in texts.texts]
    where: dict[str, tuple[str, int]] = {}  # text id -> (blob, row)
    for shard_key in store.record_keys(namespace):
        shard = store.get_record(namespace, shard_key)
        if shard is not None:
            for row, shard_text in enumerate(shard["texts"]):
                where.setdefault(shard_text, (shard["blob"], row))
    first_missing: dict[str, int] = {}  # each missing text once, at its first row
    for i, text_hash in enumerate(ids):
        if text_hash not in where:
            first_missing.setdefault(text_hash, i)
    if first_missing and backbone.plan.feature_device_kind not in (None, backbone.plan.device_kind):
        plan = backbone.plan
        raise StageError(
            f"{plan.kind} seed {plan.seed}: {len(first_missing)} text(s) of {split or 'the data'} have no "
            f"stored probe features from a {plan.feature_device_kind} worker (stage {plan.features_from} "
            f"computes them); this {plan.device_kind} worker does not compute them itself, so that "
            "every feature of a stage comes from one kind of device"
        )
    if first_missing:
        todo = list(first_missing.values())
        started = time.perf_counter()
        computed = extract_features(
            backbone.loaded.model,
            backbone.tokens(tuple(texts.texts[i] for i in todo)),
            batch_size=backbone.plan.config.minibatch_size,
            device=backbone.device,
            dtype=backbone.plan.config.dtype,
            callback=callback,
            split=split,
        )
        shard_ids = [ids[i] for i in todo]
        blob = store.put_array(computed.numpy())
        store.put_record(namespace, hash_payload({"texts": shard_ids}), {"texts": shard_ids, "blob": blob})
        for row, text_hash in enumerate(shard_ids):
            where[text_hash] = (blob, row)
        logger.info("features of %d new texts in %.1fs", len(todo), time.perf_counter() - started)
    arrays: dict[str, np.ndarray] = {}
    rows = []
    for text_hash in ids:
        blob, row = where[text_hash]
        if blob not in arrays:
            arrays[blob] = store.get_array(blob)
        rows.append(arrays[blob][row])
    return torch.from_numpy(np.stack(rows).astype(np.float32))


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
    callback: ProgressCallback | None = None,
    checkpoint_policy: CheckpointPolicy | None = None,
) -> StageResult:
    """Return the stored result for ``plan.key``, or train, evaluate and store it on the device
    kind the plan was made for. Training goes on from the stage key's resume checkpoint if an
    earlier attempt left one (w2s.resume), and writes them per ``checkpoint_policy`` (default: the
    W2S_CHECKPOINT_EVERY_* settings); w2s.resume.Yielded when the callback asked to yield."""
    key = plan.key
    record = store.get_record(STAGES, key)
    if record is not None:
        logger.info("%s seed %d: cached (%s)", plan.kind, plan.seed, key[:12])
        # The record may come from a stage of another kind that computed the same thing.
        return dataclasses.replace(StageResult.from_record(record, cached=True), kind=plan.kind)
    policy = checkpoint_policy or CheckpointPolicy.from_settings()
    with numerics(plan.config.dtype, plan.config.deterministic):
        return _compute(plan, store, key, callback, policy)


def _compute(
    plan: StagePlan,
    store: ArtifactStore,
    key: str,
    callback: ProgressCallback | None,
    policy: CheckpointPolicy,
) -> StageResult:
    """Train, evaluate and store the stage ``plan`` (whose key is ``key``)."""
    started = time.perf_counter()
    device = device_for(plan)
    config = plan.config
    labels = _training_labels(plan, store)
    # Early stopping watches rows of the training split that the stage then does not train on.
    train_rows, holdout_rows = holdout_split(len(plan.train), config.holdout_frac, plan.seed)
    set_seed(plan.seed)
    backbone = _Backbone(plan, device)
    if config.mode == "probe":
        try:
            train_split = "half A" if plan.kind == "weak" else "half B"
            train_features = cached_features(
                backbone, plan.train, store, callback=callback, split=train_split
            )
            test_data: Any = FeatureData(
                cached_features(backbone, plan.test, store, callback=callback, split="test")
            )
            predict_data: Any = (
                FeatureData(cached_features(backbone, plan.predict, store, callback=callback, split="half B"))
                if plan.predict
                else None
            )
        except Stopped as stop:
            raise StageCancelled(f"{plan.kind} seed {plan.seed}: {stop}") from None
        # Standardised with the rows it trains on, not the held-out ones.
        model: torch.nn.Module = ProbeHead(train_features[train_rows], bias=config.head_bias).to(device)
        train_data: Any = FeatureData(train_features)
    else:
        model = backbone.loaded.model
        train_data = backbone.tokens(plan.train)
        test_data = backbone.tokens(plan.test)
        predict_data = backbone.tokens(plan.predict) if plan.predict else None

    def probabilities(data: Any) -> np.ndarray:
        return predict_proba(model, data, batch_size=config.minibatch_size, device=device, dtype=config.dtype)

    holdout = (
        Holdout(Rows(train_data, holdout_rows), labels[holdout_rows], config.early_stopping_patience)
        if holdout_rows
        else None
    )
    if holdout is not None:
        train_data, labels = Rows(train_data, train_rows), labels[train_rows]

    def evaluate() -> float:
        return metrics.accuracy(probabilities(test_data), np.asarray(plan.test.labels))

    checkpoints = StoreCheckpoints(store, key)
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
        holdout=holdout,
        checkpoints=checkpoints,
        checkpoint_policy=policy,
    )
    if outcome.stopped:
        raise StageCancelled(f"{plan.kind} seed {plan.seed} stopped at step {outcome.steps}")

    test_probs = probabilities(test_data)
    test_labels = np.asarray(plan.test.labels)
    with store.patient():  # a trained result waits out any store outage, never thrown away
        result = StageResult(
            kind=plan.kind,
            seed=plan.seed,
            key=key,
            accuracy=metrics.accuracy(test_probs, test_labels),
            auroc=metrics.auroc(test_probs, test_labels),
            test_probs=store.put_array(test_probs),
            soft_labels=store.put_array(probabilities(predict_data)) if predict_data is not None else None,
            checkpoint=_save_checkpoint(model, store, key) if config.save_checkpoint else None,
            seconds=time.perf_counter() - started,
            train_seconds=outcome.seconds,
            steps=outcome.steps,
            best_step=outcome.best_step,
            holdout_loss=outcome.holdout_loss,
        )
        store.put_record(STAGES, key, result.to_record())
    checkpoints.clear()  # the result is stored: nothing is left to resume
    logger.info("%s seed %d: accuracy %.4f in %.1fs", plan.kind, plan.seed, result.accuracy, result.seconds)
    return result


def _save_checkpoint(model: torch.nn.Module, store: ArtifactStore, key: str) -> str:
    """The trained tensors (everything in full mode; the head and adapters otherwise) and buffers,
    as a file of their own (``ArtifactStore.put_checkpoint``); its reference."""
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    state = {name: t.detach().cpu() for name, t in model.state_dict().items() if name not in frozen}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return store.put_checkpoint(key, buffer.getvalue())

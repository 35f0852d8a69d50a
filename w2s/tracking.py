"""One job's results as an experiment tracker shows them, for MLflow and Weights & Biases alike.

:func:`build_export` turns what the service and the library both have, as JSON-like data (the
resolved spec, the results document, the stages, their curves as ``GET /v1/jobs/{id}/metrics``
serves them, and the figures) into a :class:`JobExport`: the job's params, tags and metrics, its
files, and one :class:`StageExport` per stage with the stage's own curves by step. The exporters
(``w2s.export_mlflow``, ``w2s.export_wandb``) only map that onto their tracker; nothing here imports
either.

Names are chosen to be valid in both trackers: metric and param names use only letters, digits,
``_``, ``-`` and ``.`` (MLflow refuses most punctuation, and ``/`` would make path-like names), e.g.
``student.logconf.pgr`` or ``weak.lr``; a loss label such as ``logconf(aux_coef=0.5)`` becomes
``logconf_aux_coef_0.5``. Param values are strings of at most :data:`MAX_PARAM_CHARS` characters
(MLflow's historical limit, so older servers accept them too).

A stage whose result was reused from an earlier run (status ``cached``, or ``reused``) carries no
curves of its own: its curves belong to the run that computed it, and the exporters link to that run
instead of logging them twice.

:class:`CurveRecorder` collects the same stages and curves from the library's progress callbacks,
so ``w2s run --mlflow`` exports what the service would.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from w2s.curves import CurveSampler

# MLflow's limit on a param value before 2.x raised it: servers still running old versions refuse longer.
MAX_PARAM_CHARS = 500
# MLflow's limit on a metric, param or tag name.
MAX_NAME_CHARS = 250
# Points kept per curve by the recorder: the same bound as the service's stored curves.
RECORDED_POINTS = 2_000

# Figures of a model in the results document, and of a student on top (w2s.results).
MODEL_FIGURES = ("accuracy", "auroc")
STUDENT_FIGURES = (*MODEL_FIGURES, "pgr", "agreement_with_weak")
# The model spec fields that say which model a role trains, not how it is trained.
MODEL_IDENTITY = ("model", "revision", "pooling", "trust_remote_code")

Curve = list[tuple[int, float]]  # (step, value), steps increasing


@dataclass(frozen=True)
class StageExport:
    """One stage (weak, ceiling, a student, ...) of one seed, as a run of its own."""

    stage_id: str
    name: str  # "student:xent seed 0"
    kind: str
    seed: int
    status: str
    key: str | None  # the stage key: equal keys mean the same computation
    reused: bool  # the result came from an earlier run: no curves of its own
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]  # final test metrics
    curves: dict[str, Curve]  # metric name -> points by step; empty for a reused stage
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None


@dataclass(frozen=True)
class JobExport:
    """A whole job: what the parent run (MLflow) or the results run (W&B) shows, and its stages."""

    name: str
    group: str  # the sweep, or the job itself: what W&B groups the stage runs by
    job_id: str | None  # the service's job id; None for a library run (every export is then new)
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]
    artifacts: dict[str, bytes]  # file name -> contents: results.json, manifest.json, figures
    stages: list[StageExport]
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None


@dataclass(frozen=True)
class ExportedRun:
    """Where an export went: the job's run and a link to it, and each stage's run."""

    run_id: str  # MLflow: the parent run; W&B: the group's results run
    url: str | None  # a link a browser opens; None where the tracker has none (files, offline)
    stage_runs: dict[str, str] = field(default_factory=dict)  # stage id -> run id
    experiment_id: str | None = None  # MLflow's experiment
    run_dirs: list[Path] = field(default_factory=list)  # W&B: the folders `wandb sync` uploads
    updated_existing: bool = False  # an earlier export of this job was brought up to date, not copied


def build_export(
    spec: Mapping[str, Any],
    results: Mapping[str, Any],
    stages: Sequence[Mapping[str, Any]],
    series: Sequence[Mapping[str, Any]],
    figures: Mapping[str, bytes],
    *,
    name: str,
    group: str | None,
    job_id: str | None,
    manifest: Mapping[str, Any] | None = None,
) -> JobExport:
    """Describe one finished job for a tracker.

    ``spec`` is the job's spec as stored (``JobSpec.model_dump(mode="json")``); ``results`` the
    results document (w2s.results); ``stages`` dicts with ``id``, ``kind``, ``seed``, ``status``,
    ``key``, ``reused`` (or status ``cached``), ``metrics`` (final test metrics) and optionally
    ``started_at``/``finished_at`` (ISO 8601); ``series`` the curves as ``GET /v1/jobs/{id}/metrics``
    serves them (``stage_id``, ``name``, ``steps``, ``values``, ``reused``); ``figures`` file name ->
    bytes. The manifest (``manifest=``, or a ``manifest.json`` among ``figures``) gives the training
    options every default resolved, so params say e.g. ``strong.lr`` even where the spec left it out.
    """
    artifacts = {_file_name(file): bytes(data) for file, data in figures.items()}
    if manifest is None and "manifest.json" in artifacts:
        manifest = _json_object(artifacts["manifest.json"])
    if manifest and "manifest.json" not in artifacts:
        artifacts["manifest.json"] = json.dumps(manifest, indent=2, default=str).encode()
    artifacts = {"results.json": json.dumps(results, indent=2, default=str).encode(), **artifacts}

    training = _resolved_training(spec, manifest)
    params = job_params(spec, results, training)
    tags = {
        "job_id": job_id or "",
        "weak": _model_name(spec.get("weak")),
        "strong": _model_name(spec.get("strong")),
        "dataset": dataset_label(spec),
        "losses": ",".join(loss_labels(spec)),
        "preset": str(spec.get("preset") or "none"),
        "w2s_version": w2s_version(),
    }
    tags = {key: value for key, value in tags.items() if value}
    stage_exports = [_stage_export(stage, series, spec, training) for stage in stages]
    started = [s.started_at for s in stage_exports if s.started_at]
    finished = [s.finished_at for s in stage_exports if s.finished_at]
    return JobExport(
        name=name,
        group=group or (f"{name} {job_id}" if job_id and job_id not in name else name),
        job_id=job_id,
        params=params,
        tags=tags,
        metrics=job_metrics(results),
        artifacts=artifacts,
        stages=stage_exports,
        started_at=_time((manifest or {}).get("started_at")) or (min(started) if started else None),
        finished_at=_time((manifest or {}).get("finished_at")) or (max(finished) if finished else None),
    )


# -- names ------------------------------------------------------------------------------------------


def safe_name(text: str) -> str:
    """One part of a metric or param name: letters, digits, ``_``, ``-`` and ``.`` only
    (``logconf(aux_coef=0.5)`` -> ``logconf_aux_coef_0.5``)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]+", "_", text)
    cleaned = re.sub(r"\.{2,}", ".", cleaned).strip("._-")
    return cleaned or "_"


def metric_name(*parts: str) -> str:
    return ".".join(safe_name(part) for part in parts)[:MAX_NAME_CHARS]


def param_value(value: Any) -> str:
    """A param as a string, cut to :data:`MAX_PARAM_CHARS` (with an ellipsis saying so)."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 1] + "…"


def stage_name(kind: str, seed: int) -> str:
    return f"{kind} seed {seed}"


def w2s_version() -> str:
    try:
        return metadata.version("w2s-service")
    except metadata.PackageNotFoundError:
        return "unknown"


# -- the spec ---------------------------------------------------------------------------------------


def loss_labels(spec: Mapping[str, Any]) -> list[str]:
    """The students' loss labels as results name them (``logconf(aux_coef=0.5)``)."""
    from w2s.spec import LossSpec

    labels = []
    for loss in spec.get("losses") or [{"name": "xent"}]:
        if isinstance(loss, str):
            labels.append(loss)
            continue
        params = loss.get("params")
        if params is None:  # the shorthand {"name": "logconf", "aux_coef": 0.5}
            params = {k: v for k, v in loss.items() if k != "name"}
        # model_construct: the label only, without building the loss (a plug-in may not be registered here)
        labels.append(LossSpec.model_construct(name=str(loss["name"]), params=dict(params)).label)
    return labels


def dataset_label(spec: Mapping[str, Any]) -> str:
    """The dataset's registry name, or a custom file's name (never a full server path)."""
    dataset = spec.get("dataset") or {}
    name = dataset.get("name") if isinstance(dataset, Mapping) else None
    if isinstance(name, Mapping):
        return Path(str(name.get("path", "custom"))).name
    return str(name or "")


def _model_name(model: Any) -> str:
    return str(model.get("model", "")) if isinstance(model, Mapping) else ""


def _role_of(kind: str) -> str:
    """The training role of a stage kind: weak, ceiling, student, ceiling@i, student@i."""
    if kind.startswith("student:"):
        return "student"
    if kind.startswith("chain@"):
        return "student@" + kind.removeprefix("chain@").partition(":")[0]
    return kind


def _spec_field_of(role: str) -> str:
    """The spec field whose model a role trains: weak, strong, chain.<i>."""
    position = role.partition("@")[2]
    if position.isdigit():
        return f"chain.{int(position) - 2}"
    return "weak" if role == "weak" else "strong"


def _resolved_training(
    spec: Mapping[str, Any], manifest: Mapping[str, Any] | None
) -> dict[str, dict[str, Any]]:
    """Each role's training options with every default filled: the manifest's record of the run, or
    else resolved here from the spec (without a model size: the reference preset's size-based learning
    rate stays unresolved then)."""
    recorded = (manifest or {}).get("training")
    if isinstance(recorded, Mapping) and recorded:
        return {
            str(role): dict(options) for role, options in recorded.items() if isinstance(options, Mapping)
        }
    from w2s.spec import ModelSpec, chain_role, resolve_training

    def model(options: Any) -> ModelSpec | None:
        if not isinstance(options, Mapping):
            return None
        fields = {k: v for k, v in options.items() if k in ModelSpec.model_fields and v is not None}
        return ModelSpec.model_construct(**fields)

    preset = spec.get("preset")
    transfer = {k: v for k, v in (spec.get("transfer") or {}).items() if v is not None}
    roles: dict[str, ModelSpec | None] = {
        "weak": model(spec.get("weak")),
        "ceiling": model(spec.get("strong")),
        "student": model({**(spec.get("strong") or {}), **transfer}),
    }
    for position, options in enumerate(spec.get("chain") or [], start=2):
        roles[chain_role("ceiling", position)] = model(options)
        roles[chain_role("student", position)] = model({**options, **transfer})
    training: dict[str, dict[str, Any]] = {}
    for role, options in roles.items():
        if options is None:
            continue
        try:
            training[role] = vars(resolve_training(options, preset))  # type: ignore[arg-type]
        except (ValueError, TypeError, AttributeError):
            continue  # the reference preset's lr needs the model's size: the spec's values stand
    return training


def _flatten(prefix: str, value: Any, into: dict[str, str]) -> None:
    if value is None:
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{safe_name(str(key))}" if prefix else safe_name(str(key)), item, into)
    elif isinstance(value, list) and any(isinstance(item, Mapping) for item in value):
        for index, item in enumerate(value):
            _flatten(f"{prefix}.{index}", item, into)
    elif isinstance(value, list):
        if value:
            into[prefix[:MAX_NAME_CHARS]] = param_value(",".join(str(item) for item in value))
    else:
        into[prefix[:MAX_NAME_CHARS]] = param_value(value)


def job_params(
    spec: Mapping[str, Any],
    results: Mapping[str, Any],
    training: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, str]:
    """The spec flattened (``weak.model``, ``strong.lr``, ``dataset.name``, ``losses``, ``seeds``,
    ``preset``), each model's training options with defaults resolved, and the data options the run
    used. Leaves only: no name is both a value and a prefix of others, so W&B can nest them again."""
    training = training if training is not None else _resolved_training(spec, None)
    params: dict[str, str] = {}
    rest = {k: v for k, v in spec.items() if k not in ("losses", "seeds", "chain")}
    _flatten("", rest, params)
    for index, model in enumerate(spec.get("chain") or []):
        _flatten(f"chain.{index}", model, params)
    # The roles' resolved options: the weak model's under weak.*, the strong ceiling's under strong.*
    # (students add the transfer.* overrides, given as set), each chain model's under chain.<i>.*.
    for role, options in training.items():
        if role.startswith("student"):
            continue
        prefix = _spec_field_of(role)
        for option, value in options.items():
            if value is not None and not isinstance(value, (Mapping, list)):
                params[f"{prefix}.{safe_name(option)}"] = param_value(value)
    params["losses"] = param_value(",".join(loss_labels(spec)))
    params["seeds"] = param_value(",".join(str(seed) for seed in spec.get("seeds") or [0]))
    params["preset"] = param_value(spec.get("preset") or "none")
    data = results.get("data")
    if isinstance(data, Mapping):
        for option in ("sampling", "resample_per_seed", "remove_overlap", "max_dropped_fraction"):
            if data.get(option) is not None:
                params[f"dataset.{option}"] = param_value(data[option])
    return dict(sorted(params.items()))


# -- the results ------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _figures(
    block: Mapping[str, Any], names: Sequence[str], prefix: Sequence[str]
) -> Iterator[tuple[str, float]]:
    """A model's figures with their spread and interval: accuracy, accuracy_std, accuracy_ci_low, ..."""
    for figure in names:
        value = _number(block.get(figure))
        if value is not None:
            yield metric_name(*prefix, figure), value
        std = _number(block.get(f"{figure}_std"))
        if std is not None:
            yield metric_name(*prefix, f"{figure}_std"), std
        interval = block.get(f"{figure}_ci")
        if isinstance(interval, Sequence) and len(interval) == 2:
            for end, bound in zip(("low", "high"), interval, strict=True):
                number = _number(bound)
                if number is not None:
                    yield metric_name(*prefix, f"{figure}_ci_{end}"), number


def job_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """The results' figures as flat metrics: ``weak.accuracy``, ``ceiling.auroc_ci_low``,
    ``student.<loss>.pgr``, ``student.<loss>.pgr_std``, ``gap.ceiling_minus_weak``, the chain's end to
    end figures, ``timings.<stage kind>`` (seconds). Undefined figures (a PGR without a gap) are left
    out, never logged as 0."""
    metrics: dict[str, float] = {}
    for model in ("weak", "ceiling"):
        if isinstance(results.get(model), Mapping):
            metrics.update(_figures(results[model], MODEL_FIGURES, (model,)))
    for loss, block in _unique_names(results.get("students") or {}):
        metrics.update(_figures(block, STUDENT_FIGURES, ("student", loss)))
        share = _number(block.get("pgr_undefined_share"))
        if share is not None:
            metrics[metric_name("student", loss, "pgr_undefined_share")] = share
    gap = results.get("gap")
    if isinstance(gap, Mapping):
        metrics.update(_figures(gap, ("ceiling_minus_weak",), ("gap",)))
    chain = results.get("chain")
    if isinstance(chain, Mapping):
        for loss, block in _unique_names(chain.get("losses") or {}):
            for end in ("chain", "direct"):
                figures = (block.get("end_to_end") or {}).get(end)
                if isinstance(figures, Mapping):
                    metrics.update(_figures(figures, ("accuracy", "pgr"), ("chain", loss, end)))
    for kind, seconds in (results.get("timings") or {}).items():
        number = _number(seconds)
        if number is not None:
            metrics[metric_name("timings", kind)] = number
    return metrics


def _unique_names(blocks: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(safe name, block) per loss label; two labels that clean to one name keep apart (``_2``)."""
    seen: set[str] = set()
    for label, block in blocks.items():
        if not isinstance(block, Mapping):
            continue
        name, count = safe_name(label), 1
        while name in seen:
            count += 1
            name = f"{safe_name(label)}_{count}"
        seen.add(name)
        yield name, block


# -- the stages -------------------------------------------------------------------------------------


def _stage_export(
    stage: Mapping[str, Any],
    series: Sequence[Mapping[str, Any]],
    spec: Mapping[str, Any],
    training: Mapping[str, Mapping[str, Any]],
) -> StageExport:
    kind, seed = str(stage["kind"]), int(stage["seed"])
    stage_id = str(stage.get("id") or stage_name(kind, seed))
    status = str(stage.get("status") or "succeeded")
    reused = bool(stage.get("reused")) or status == "cached"
    key = stage.get("key")
    role = _role_of(kind)
    model_options = _lookup(spec, _spec_field_of(role))
    params = {"kind": kind, "seed": str(seed), "stage_key": str(key or "")}
    if isinstance(model_options, Mapping) and model_options.get("model"):
        params["model"] = param_value(model_options["model"])
    if kind.startswith(("student:", "chain@")):
        params["loss"] = param_value(kind.partition(":")[2])
    for option, value in (training.get(role) or {}).items():
        if value is not None and not isinstance(value, (Mapping, list)):
            params[f"train.{safe_name(option)}"] = param_value(value)
    tags = {
        "kind": kind,
        "seed": str(seed),
        "status": status,
        "stage_id": stage_id,
        "reused": str(reused).lower(),
    }
    if key:
        tags["stage_key"] = str(key)
    metrics = {
        safe_name(str(metric)): number
        for metric, value in (stage.get("metrics") or {}).items()
        if (number := _number(value)) is not None
    }
    curves: dict[str, Curve] = {}
    if not reused:  # a reused stage's curves are the computing run's, linked rather than copied
        for entry in series:
            if str(entry.get("stage_id")) != stage_id or entry.get("reused"):
                continue
            points: dict[int, float] = {}
            for step, value in zip(entry.get("steps") or [], entry.get("values") or [], strict=False):
                number = _number(value)
                if number is not None:
                    points[int(step)] = number  # a repeated step keeps its last value
            if points:
                curves[safe_name(str(entry["name"]))] = sorted(points.items())
    return StageExport(
        stage_id=stage_id,
        name=stage_name(kind, seed),
        kind=kind,
        seed=seed,
        status=status,
        key=str(key) if key else None,
        reused=reused,
        params=params,
        tags=tags,
        metrics=metrics,
        curves=curves,
        started_at=_time(stage.get("started_at")),
        finished_at=_time(stage.get("finished_at")),
    )


def _lookup(spec: Mapping[str, Any], dotted: str) -> Any:
    value: Any = spec
    for part in dotted.split("."):
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _time(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, str) and value:
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _file_name(name: str) -> str:
    """A figure's file name, flat: never a path into or out of the run's folder."""
    base = Path(name).name
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]+", "_", base).lstrip(".")
    if not cleaned:
        raise ValueError(f"not a file name: {name!r}")
    return cleaned


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# -- the library's own runs -------------------------------------------------------------------------


class CurveRecorder:
    """A pipeline reporter (w2s.pipeline.Reporter) that keeps each stage's curves and final figures,
    as the service's workers do, for :func:`build_export` after a ``w2s run``. ``forward`` also gets
    every event (the progress bars), so one reporter can do both."""

    def __init__(self, forward: Any | None = None, max_points: int = RECORDED_POINTS) -> None:
        self.forward = forward
        self.max_points = max_points
        self._stages: dict[str, dict[str, Any]] = {}
        self._samplers: dict[str, dict[str, CurveSampler]] = {}
        self._points: dict[str, dict[str, Curve]] = {}

    @staticmethod
    def _id(plan: Any) -> str:
        return stage_name(plan.kind, plan.seed)

    def stage_started(self, plan: Any) -> None:
        stage_id = self._id(plan)
        self._stages[stage_id] = {
            "id": stage_id,
            "kind": plan.kind,
            "seed": plan.seed,
            "status": "running",
            "key": None,  # from the result: the plan's key is a hash of the rows, computed once there
            "started_at": dt.datetime.now(dt.UTC).isoformat(),
        }
        self._samplers[stage_id], self._points[stage_id] = {}, {}
        if self.forward is not None:
            self.forward.stage_started(plan)

    def stage_progress(self, plan: Any, progress: Any) -> bool | None:
        if getattr(progress, "phase", "train") == "train":
            stage_id = self._id(plan)
            values = {"loss": progress.loss, "train_accuracy": progress.train_accuracy, "lr": progress.lr}
            if progress.eval_accuracy is not None:
                values["eval_accuracy"] = progress.eval_accuracy
            for metric, value in values.items():
                if value is None or not math.isfinite(value):
                    continue
                sampler = self._samplers[stage_id].get(metric)
                if sampler is None:
                    sampler = self._samplers[stage_id][metric] = CurveSampler(
                        progress.total_steps, self.max_points
                    )
                self._points[stage_id].setdefault(metric, []).extend(sampler.add(progress.step, float(value)))
        if self.forward is not None:
            return self.forward.stage_progress(plan, progress)
        return None

    def stage_finished(self, plan: Any, result: Any) -> None:
        stage_id = self._id(plan)
        for metric, sampler in self._samplers.pop(stage_id, {}).items():
            self._points[stage_id].setdefault(metric, []).extend(sampler.finish())
        stage = self._stages[stage_id]
        stage["status"] = "cached" if result.cached else "succeeded"
        stage["reused"] = bool(result.cached)
        stage["key"] = result.key
        stage["finished_at"] = dt.datetime.now(dt.UTC).isoformat()
        stage["metrics"] = {
            "accuracy": result.accuracy,
            "auroc": result.auroc,
            "seconds": result.seconds,
            "train_seconds": result.train_seconds,
            "steps": result.steps,
            "best_step": result.best_step,
            "holdout_loss": result.holdout_loss,
        }
        if self.forward is not None:
            self.forward.stage_finished(plan, result)

    def stages(self) -> list[dict[str, Any]]:
        return [dict(stage) for stage in self._stages.values()]

    def series(self) -> list[dict[str, Any]]:
        """The curves in the shape ``GET /v1/jobs/{id}/metrics`` serves."""
        return [
            {
                "stage_id": stage_id,
                "kind": self._stages[stage_id]["kind"],
                "seed": self._stages[stage_id]["seed"],
                "name": metric,
                "steps": [step for step, _ in points],
                "values": [value for _, value in points],
                "reused": False,
            }
            for stage_id, curves in self._points.items()
            for metric, points in curves.items()
        ]


@contextlib.contextmanager
def environment(
    values: Mapping[str, str | None], defaults: Mapping[str, str] | None = None
) -> Iterator[None]:
    """Set ``values`` (None: remove the variable) and ``defaults`` where the variable is unset in the
    process environment for the block, restored after as the caller had them: trackers' clients read
    their switches and credentials from the environment at each call."""
    defaults = defaults or {}
    saved = {name: os.environ.get(name) for name in [*defaults, *values]}
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    for name, given in values.items():
        if given is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = given
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

"""Planning and finishing a job: the service's calls into the w2s library.

These run in control tasks (worker/control.py), never in the dispatch round: they load datasets and
tokenizers, hash model files, estimate memory and compute bootstrap statistics, which can take
seconds or minutes. A stored job spec names uploads as ``upload:<id>``; :func:`library_spec` turns
that into the file the library reads, for the team that owns it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.data_files import data_dir_for
from service.exports import schedule_exports
from service.lifecycle import PlannedStage, job_succeeded, mark_planned
from service.models import Dataset, Job, Stage, utcnow
from service.scheduler import ROUTING_FILL, gpu_queues, route_queue
from service.settings import Settings
from service.states import JOB_OPEN, StageStatus
from service.upload_files import local_copy
from w2s.model_store import is_store_model
from w2s.spec import is_local_model_name

logger = logging.getLogger(__name__)

UPLOAD_PREFIX = "upload:"


class PlanningError(ValueError):
    """A job that cannot be planned as asked; the message is shown on the job."""


def library_spec(
    session: Session,
    *,
    spec: dict[str, Any],
    team_id: str,
    settings: Settings,
    store: Any = None,
    read_data: bool = True,
) -> Any:
    """The job spec as the library reads it: an ``upload:<id>`` dataset becomes the team's file, in
    this host's cache of the artifact store (service/upload_files.py); without ``read_data`` (work
    that reads no rows, like finishing) it is not fetched and the path stays ``upload:<id>``."""
    from w2s.spec import JobSpec

    raw = json.loads(json.dumps(spec))
    dataset = raw.get("dataset") or {}
    name = dataset.get("name")
    if isinstance(name, str) and name.startswith(UPLOAD_PREFIX):
        upload = session.get(Dataset, name.removeprefix(UPLOAD_PREFIX))
        if upload is None or upload.team_id != team_id:
            raise PlanningError(f"dataset.name: the uploaded dataset {name!r} no longer exists")
        path = local_copy(upload, settings, store) if read_data else name
        dataset["name"] = {
            "path": str(path),
            "text": upload.text_column,
            "label": upload.label_column,
            "format": upload.format,
        }
    require_losses(raw)
    return JobSpec.model_validate(raw)


def require_losses(raw: dict[str, Any]) -> None:
    """Fail, naming the loss, this host and the fix, if the job names a loss of your own that this
    host lacks: the API had it (it accepted the job), so its plug-in is missing here."""
    from w2s.stages import StageError, require_loss

    for index, loss in enumerate(raw.get("losses") or []):
        name = loss.get("name") if isinstance(loss, dict) else loss
        if isinstance(name, str):
            try:
                require_loss(name, f"losses[{index}]")
            except StageError as missing:
                raise PlanningError(str(missing)) from None


@functools.lru_cache(maxsize=64)
def _seed_data(spec_json: str, seed: int, data_dir: str | None) -> Any:
    from w2s.spec import JobSpec
    from w2s.splits import prepare_seed_data

    spec = JobSpec.model_validate_json(spec_json)
    return prepare_seed_data(spec, seed, Path(data_dir) if data_dir else None)


def experiment_data(spec: Any, settings: Settings, seeds: list[int] | None = None) -> dict[int, Any]:
    """Each seed's clean data (w2s.splits), cached in this process: planning and finishing read it."""
    spec_json = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    where = data_dir_for(spec.dataset.name, settings)  # W2S_DATA_DIR, or this host's copy of W2S_DATA_URL's
    data_dir = str(where) if where else None
    return {seed: _seed_data(spec_json, seed, data_dir) for seed in (seeds or spec.seeds)}


def result_scope(spec: dict[str, Any], team_id: str) -> str | None:
    """Who may reuse the results of a job's stages (w2s.stages.StagePlan.scope). The sharing rule:
    results computed from a team's private inputs (an uploaded dataset, a custom data file, a model
    pushed to the store) are reused only by that team; results computed only from public inputs
    (registry datasets, hub models, models under the operator's model roots) are shared by every
    team. So another team can never learn, through the stage cache, that a team trained on given
    private data or weights."""
    models = [spec.get("weak") or {}, spec.get("strong") or {}, *(spec.get("chain") or [])]
    names = [model.get("model") if isinstance(model, dict) else model for model in models]
    dataset = (spec.get("dataset") or {}).get("name")
    private_data = not isinstance(dataset, str) or dataset.startswith(UPLOAD_PREFIX)
    private_model = any(isinstance(name, str) and is_store_model(name) for name in names)
    return f"team:{team_id}" if private_data or private_model else None


def stage_plans(
    spec: Any, settings: Settings, seeds: list[int] | None = None, *, scope: str | None = None
) -> dict[tuple[str, int], Any]:
    """The w2s plans of a job's stages (of ``seeds`` only, if given), keyed by (kind, seed), for the
    device kind this deployment's workers run on; ``scope``: :func:`result_scope`."""
    from w2s.pipeline import plan_experiment

    data = experiment_data(spec, settings, seeds)
    narrowed = spec.model_copy(update={"seeds": list(data)}) if seeds else spec
    plans = plan_experiment(
        narrowed,
        data,
        device_kind=settings.device_kind,
        probe_head_device_kind=settings.probe_head_device_kind,
        scope=scope,
    )
    return {(plan.kind, plan.seed): plan for plan in plans}


def hub_revision(model: str) -> str | None:
    """The commit a hub model id points at now, or None offline or when the hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None
    try:
        from huggingface_hub import HfApi

        return str(HfApi().model_info(model, timeout=10).sha) or None
    except Exception as error:  # offline, unknown id, private: the job runs on what loads
        logger.info("could not pin %s to a revision: %s", model, error)
        return None


def pin_revisions(spec: dict[str, Any]) -> dict[str, Any]:
    """Hub models without a revision get the commit they point at now, so every stage of the job
    (and its stage keys) means the same weights even if the hub moves on while it runs."""
    pinned = json.loads(json.dumps(spec))
    for model in [pinned["weak"], pinned["strong"], *pinned.get("chain", [])]:
        if model.get("revision") is None and not is_local_model_name(model["model"]):
            revision = hub_revision(model["model"])
            if revision:
                model["revision"] = revision
    return pinned


def plan_job(session: Session, job_id: str, settings: Settings, store: Any, token: int | None = None) -> bool:
    """Plan every stage once: its full plan (stored, and what the worker runs: w2s.stages.plan_record,
    with the rows in the artifact store), key, memory estimate and queue; stages whose key already
    has a result complete at once. Raises on any problem (the control task fails the job with the
    message), including a stage too large for every GPU class; False if the job no longer needs
    planning or the task holding ``token`` is no longer current."""
    from w2s.pipeline import data_report
    from w2s.stages import plan_record

    job = session.get(Job, job_id)
    if job is None or job.planned or job.status not in JOB_OPEN:
        return False
    pinned = pin_revisions(job.spec)
    spec = library_spec(session, spec=pinned, team_id=job.team_id, settings=settings, store=store)
    data = experiment_data(spec, settings)
    plans = stage_plans(spec, settings, scope=result_scope(job.spec, job.team_id))
    stages = session.execute(
        select(Stage.id, Stage.kind, Stage.seed, Stage.status).where(Stage.job_id == job_id)
    ).all()
    ids = {(kind, seed): stage_id for stage_id, kind, seed, _ in stages}
    planned: dict[str, PlannedStage] = {}
    cached: dict[str, dict[str, Any]] = {}
    too_large: dict[str, str] = {}
    stored_rows: dict[str, Any] = {}
    for stage_id, kind, seed, status in stages:
        plan = plans[kind, seed]
        queue, memory_gb = route_stage(plan, settings, too_large)
        features_from = ids[plan.features_from, seed] if plan.features_from else None
        record = plan_record(plan, store, memo=stored_rows)
        planned[stage_id] = PlannedStage(plan.key, queue, memory_gb, features_from, record)
        if status == StageStatus.pending:
            result = store.get_record("stages", plan.key)
            if result is not None:
                cached[stage_id] = result
    if too_large:
        raise PlanningError(" ".join(too_large.values()))
    summary = {
        "datasets": {str(seed): data[seed].summary() for seed in spec.seeds},
        "data": data_report(spec, data),
        "test": planned[ids["weak", spec.seeds[0]]].plan["test"],  # type: ignore[index]
    }
    if pinned != job.spec:
        job.spec = pinned  # the stored plans name the pinned revision; the spec says so too
    job.data_summary = summary
    from w2s.stages import runtime_fingerprint, runtime_id

    summary["runtime"] = runtime_fingerprint()  # named when no worker runs the same (service/workers.py)
    job.data_summary = summary
    job.runtime = runtime_id()  # workers that compute these keys have the same (service/workers.py)
    session.flush()
    return mark_planned(session, job_id, planned, cached, store_uri=settings.store_uri, token=token)


def route_stage(plan: Any, settings: Settings, too_large: dict[str, str]) -> tuple[str, float | None]:
    """The queue of a planned stage and its memory estimate (GiB). A stage that fits no GPU class
    adds a message to ``too_large`` (one per model and configuration) and gets the largest."""
    from w2s.memory import estimate_memory
    from w2s.spec import TrainConfig

    found = estimate_memory(plan.model, plan.config)
    memory_gb = found.total if found is not None else None
    if plan.device_kind == "cpu" and settings.device_kind == "cuda":
        return "cpu", memory_gb  # a probe head on features a GPU computed: a CPU worker's work
    queue = route_queue(memory_gb, settings.queue_slots, settings.gpu_classes)
    if queue is not None:
        return queue, memory_gb
    size, largest = gpu_queues(settings.queue_slots, settings.gpu_classes)[-1]
    config: TrainConfig = plan.config
    too_large.setdefault(
        json.dumps([plan.model.model, str(config)]),
        f"stage {plan.kind} (seed {plan.seed}) on {plan.model.model} needs an estimated "
        f"{found.describe() if found else memory_gb} of GPU memory, more than the largest GPU class "
        f"here allows ({largest}: {size:g} GiB, of which {size * ROUTING_FILL:.1f} GiB may be used): "
        f"lower minibatch_size (now {config.minibatch_size}; gradient accumulation keeps the result the "
        f"same), set gradient_checkpointing: true, lower max_length (now {config.max_length}), or use "
        "mode: lora.",
    )
    return largest, memory_gb


def finish_job(
    session: Session, job_id: str, settings: Settings, store: Any, token: int | None = None
) -> bool:
    """Aggregate the stage results into the library's results document, from what planning stored
    (no dataset is read); False if the job is not (or no longer) due to be finished, or the task
    holding ``token`` is no longer current."""
    from w2s.pipeline import results_document
    from w2s.stages import get_rows

    job = session.get(Job, job_id)
    if job is None or job.status not in JOB_OPEN or not job.planned or job.stages_left:
        return False
    spec = library_spec(session, spec=job.spec, team_id=job.team_id, settings=settings, read_data=False)
    summary = job.data_summary or {}
    stages = session.scalars(select(Stage).where(Stage.job_id == job_id).order_by(Stage.order)).all()
    results_of = {(stage.kind, stage.seed): stage.result or {} for stage in stages}

    def probs(kind: str, seed: int) -> np.ndarray:
        return store.get_array(results_of[kind, seed]["test_probs"])

    timings: dict[str, float] = {}
    for stage in stages:
        seconds = (
            0.0 if stage.status == StageStatus.cached else float((stage.result or {}).get("seconds", 0.0))
        )
        timings[stage.kind] = timings.get(stage.kind, 0.0) + seconds
    if job.started_at is not None:
        started = job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=utcnow().tzinfo)
        timings["total"] = (utcnow() - started).total_seconds()
    test_labels = np.asarray(get_rows(store, summary["test"]).labels)
    results = results_document(spec, test_labels, summary["data"], probs, timings)
    manifest = {
        "dataset": summary["datasets"],
        "device_kind": settings.device_kind,
        "seeds": spec.seeds,
        "stages": [{"kind": s.kind, "seed": s.seed, "key": s.stage_key, "status": s.status} for s in stages],
    }
    name = (job.spec.get("dataset") or {}).get("name")
    if isinstance(name, str) and name.startswith(UPLOAD_PREFIX):
        for entry in manifest["dataset"].values():  # the upload's id, never its server path
            entry["name"] = name
            entry["sources"] = {"train": name, "test": name}
    session.expunge_all()  # the lifecycle writes with conditional statements, not these objects
    if not job_succeeded(session, job_id, token=token, results=results, manifest=manifest):
        return False
    finished = session.get(Job, job_id)
    assert finished is not None
    schedule_exports(session, finished, settings)  # in the same transaction as the success
    return True

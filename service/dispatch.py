"""One round of the dispatcher, in the database: plan new jobs, complete stages whose key already
has a result, admit ready stages to free worker slots, and finish jobs whose stages are done.

Admission happens here, in the database, not in the broker: the broker only ever holds stages
that already have a slot. ``worker/dispatcher.py`` runs these rounds and enqueues what they admit.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, selectinload

from service.jobs import log
from service.models import Artifact, Job, Stage, Team, utcnow
from service.scheduler import Candidate, TeamShare, admit, route_queue
from service.settings import Settings
from service.states import (
    STAGE_ACTIVE,
    STAGE_DONE,
    JobStatus,
    StageStatus,
    check_job_transition,
    check_stage_transition,
)

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=32)
def _seed_data(spec_json: str, seed: int, data_dir: str | None) -> Any:
    from pathlib import Path

    from w2s.spec import JobSpec
    from w2s.splits import prepare_seed_data

    spec = JobSpec.model_validate_json(spec_json)
    return prepare_seed_data(spec, seed, Path(data_dir) if data_dir else None)


def _spec_json(spec: Any) -> str:
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True)


def experiment_data(spec: Any, settings: Settings, seeds: list[int] | None = None) -> dict[int, Any]:
    """Each seed's clean data (w2s.splits), cached per process: planning and finishing read it."""
    data_dir = str(settings.data_dir) if settings.data_dir else None
    return {seed: _seed_data(_spec_json(spec), seed, data_dir) for seed in (seeds or spec.seeds)}


def stage_plans(spec: Any, settings: Settings, seeds: list[int] | None = None) -> dict[tuple[str, int], Any]:
    """The plans of a job's stages (of ``seeds`` only, if given), keyed by (kind, seed), for the
    device kind this deployment's workers run on."""
    from w2s.pipeline import plan_experiment

    data = experiment_data(spec, settings, seeds)
    narrowed = spec.model_copy(update={"seeds": list(data)}) if seeds else spec
    plans = plan_experiment(narrowed, data, device_kind=settings.device_kind)
    return {(plan.kind, plan.seed): plan for plan in plans}


def plan_job(session: Session, job: Job, settings: Settings) -> None:
    """Compute each stage's key, memory estimate and queue; a job that cannot be planned fails."""
    from w2s.memory import estimate_memory_gb
    from w2s.spec import JobSpec

    try:
        spec = JobSpec.model_validate(job.spec)
        plans = stage_plans(spec, settings)
        for stage in job.stages:
            plan = plans[stage.kind, stage.seed]
            stage.stage_key = plan.key
            stage.memory_gb = estimate_memory_gb(plan.model, plan.config)
            stage.gpu_class = route_queue(stage.memory_gb, settings.queue_slots, settings.gpu_classes)
    except (ValueError, RuntimeError, OSError) as error:
        fail_job(session, job, f"cannot plan the job: {error}")
        return
    job.planned = True
    log(
        session,
        job_id=job.id,
        message="planned: " + ", ".join(f"{s.kind}/{s.seed} -> {s.gpu_class}" for s in job.stages),
    )


def fail_job(session: Session, job: Job, error: str) -> None:
    check_job_transition(job.status, JobStatus.failed)
    job.status = JobStatus.failed
    job.error = error
    job.finished_at = utcnow()
    job.cancel_requested = True  # its other running stages stop at their next step
    for stage in job.stages:
        if stage.status in (StageStatus.pending, StageStatus.queued):
            stage.status = StageStatus.cancelled
    log(session, job_id=job.id, message=error, level="error")


def complete_from_artifact(session: Session, stage: Stage, record: dict[str, Any]) -> None:
    """Mark a stage cached: another stage (or job) already computed its key."""
    check_stage_transition(stage.status, StageStatus.cached)
    stage.status = StageStatus.cached
    stage.result = record
    stage.metrics = {"accuracy": record.get("accuracy"), "auroc": record.get("auroc")}
    stage.finished_at = utcnow()
    log(session, job_id=stage.job_id, stage_id=stage.id, message=f"{stage.kind}/{stage.seed}: cached result")


def record_result(session: Session, stage: Stage, record: dict[str, Any], store_uri: str) -> None:
    """Remember where a stage key's outputs are, so identical stages elsewhere complete as cached."""
    if session.get(Artifact, (record["key"], "result")) is None:
        session.add(
            Artifact(stage_key=record["key"], name="result", uri=f"{store_uri}#stages/{record['key']}")
        )
        for name in ("test_probs", "soft_labels", "checkpoint"):
            if record.get(name):
                session.add(
                    Artifact(stage_key=record["key"], name=name, uri=f"{store_uri}#blobs/{record[name]}")
                )


@dataclass
class RoundReport:
    planned: int = 0
    cached: int = 0
    admitted: list[tuple[str, str]] | None = None  # (stage id, queue)
    finished: int = 0
    resent: list[tuple[str, str]] = field(default_factory=list)  # (stage id, queue): lost, sent again


def _ready(stage: Stage, by_id: dict[str, Stage]) -> bool:
    if stage.status != StageStatus.pending or stage.stage_key is None:
        return False
    dependency = by_id.get(stage.depends_on_id) if stage.depends_on_id else None
    return dependency is None or dependency.status in STAGE_DONE


def _team_shares(session: Session, settings: Settings, team_ids: set[str]) -> dict[str, TeamShare]:
    since = utcnow() - dt.timedelta(hours=settings.fair_share_window_h)
    active = dict(
        session.execute(
            select(Job.team_id, func.count(Stage.id))
            .join(Stage, Stage.job_id == Job.id)
            .where(Stage.status.in_(list(STAGE_ACTIVE)))
            .group_by(Job.team_id)
        ).all()
    )
    recent = dict(
        session.execute(
            select(Job.team_id, func.coalesce(func.sum(Stage.gpu_seconds), 0.0))
            .join(Stage, Stage.job_id == Job.id)
            .where(Stage.finished_at >= since)
            .group_by(Job.team_id)
        ).all()
    )
    shares = {}
    for team in session.scalars(select(Team).where(Team.id.in_(team_ids))):
        quota = team.gpu_quota if team.gpu_quota is not None else settings.default_gpu_quota
        shares[team.id] = TeamShare(
            team.id, team.weight, quota, active.get(team.id, 0), float(recent.get(team.id, 0.0))
        )
    return shares


def recover_lost_stages(session: Session, settings: Settings, report: RoundReport) -> None:
    """Send again what a fault lost, keeping each stage's slot.

    A running stage whose heartbeat went silent lost its worker (killed, or its machine gone): it
    is requeued, and the new attempt fences the old one out (worker/tasks.py). A queued stage that
    no worker took long after it was sent lost its broker message (Redis restarted, say): it is
    sent again. A duplicate message is harmless: the claim drops it.
    """
    now = utcnow()
    silent_since = now - dt.timedelta(seconds=settings.heartbeat_timeout_s)
    lost = session.scalars(
        select(Stage).where(
            Stage.status == StageStatus.running,
            or_(Stage.heartbeat_at < silent_since, Stage.heartbeat_at.is_(None)),
        )
    )
    for stage in lost:
        check_stage_transition(stage.status, StageStatus.queued)
        stage.status = StageStatus.queued
        stage.sent_at = now
        message = (
            f"{stage.kind}/{stage.seed}: no heartbeat from {stage.worker} for "
            f"{settings.heartbeat_timeout_s:.0f} s; requeued"
        )
        log(session, job_id=stage.job_id, stage_id=stage.id, message=message, level="warning")
        report.resent.append((stage.id, stage.gpu_class or "cpu"))
    unclaimed_since = now - dt.timedelta(seconds=settings.redeliver_after_s)
    unclaimed = session.scalars(
        select(Stage).where(Stage.status == StageStatus.queued, Stage.sent_at < unclaimed_since)
    )
    for stage in unclaimed:
        stage.sent_at = now
        waited = f"{settings.redeliver_after_s:.0f} s"
        message = f"{stage.kind}/{stage.seed}: no worker took it for {waited}; sent again"
        log(session, job_id=stage.job_id, stage_id=stage.id, message=message, level="warning")
        report.resent.append((stage.id, stage.gpu_class or "cpu"))


def dispatch_round(session: Session, settings: Settings, store: Any) -> RoundReport:
    """One pass. The caller commits, then enqueues ``report.admitted`` and ``report.resent``."""
    report = RoundReport(admitted=[])
    recover_lost_stages(session, settings, report)
    open_jobs = list(
        session.scalars(
            select(Job)
            .options(selectinload(Job.stages))
            .where(Job.status.in_([JobStatus.queued, JobStatus.running]))
            .order_by(Job.created_at)
        )
    )
    for job in open_jobs:
        if not job.planned:
            plan_job(session, job, settings)
            report.planned += 1
    open_jobs = [job for job in open_jobs if job.status in (JobStatus.queued, JobStatus.running)]

    candidates: list[Candidate] = []
    for job in open_jobs:
        by_id = {stage.id: stage for stage in job.stages}
        for stage in job.stages:
            if not _ready(stage, by_id):
                continue
            record = store.get_record("stages", stage.stage_key)
            if record is not None:
                complete_from_artifact(session, stage, record)
                report.cached += 1
                continue
            candidates.append(
                Candidate(
                    stage.id,
                    job.id,
                    job.team_id,
                    job.priority,
                    job.created_at,
                    stage.order,
                    stage.gpu_class or "cpu",
                    stage.stage_key,
                )
            )

    if candidates:
        in_flight = dict(
            session.execute(
                select(Stage.gpu_class, func.count(Stage.id))
                .where(Stage.status.in_(list(STAGE_ACTIVE)))
                .group_by(Stage.gpu_class)
            ).all()
        )
        free = {queue: slots - in_flight.get(queue, 0) for queue, slots in settings.queue_slots.items()}
        busy = set(session.scalars(select(Stage.stage_key).where(Stage.status.in_(list(STAGE_ACTIVE)))).all())
        teams = _team_shares(session, settings, {c.team_id for c in candidates})
        admission = admit(candidates, teams, free, busy)
        stages = {s.id: s for job in open_jobs for s in job.stages}
        for candidate in admission.admitted:
            stage = stages[candidate.stage_id]
            check_stage_transition(stage.status, StageStatus.queued)
            stage.status = StageStatus.queued
            stage.queued_at = stage.sent_at = utcnow()
            report.admitted.append((stage.id, candidate.queue))
            job = stage.job
            if job.status == JobStatus.queued:
                check_job_transition(job.status, JobStatus.running)
                job.status = JobStatus.running
                job.started_at = job.started_at or utcnow()

    for job in open_jobs:
        if job.planned and all(stage.status in STAGE_DONE for stage in job.stages):
            finish_job(session, job, settings, store)
            report.finished += 1
        elif any(stage.status == StageStatus.failed for stage in job.stages):
            failed = next(stage for stage in job.stages if stage.status == StageStatus.failed)
            fail_job(session, job, f"stage {failed.kind} (seed {failed.seed}) failed: {failed.error}")
            report.finished += 1
    return report


def finish_job(session: Session, job: Job, settings: Settings, store: Any) -> None:
    """Aggregate the stage results into the library's results document."""
    from w2s.pipeline import experiment_results
    from w2s.spec import JobSpec

    spec = JobSpec.model_validate(job.spec)
    data = experiment_data(spec, settings)
    results_of = {(stage.kind, stage.seed): stage.result or {} for stage in job.stages}

    def probs(kind: str, seed: int) -> np.ndarray:
        return store.get_array(results_of[kind, seed]["test_probs"])

    timings: dict[str, float] = {}
    for stage in job.stages:
        seconds = (
            0.0 if stage.status == StageStatus.cached else float((stage.result or {}).get("seconds", 0.0))
        )
        timings[stage.kind] = timings.get(stage.kind, 0.0) + seconds
    if job.started_at is not None:
        timings["total"] = (utcnow() - _aware(job.started_at)).total_seconds()
    job.results = experiment_results(spec, data, probs, timings)
    job.manifest = {
        "dataset": {str(seed): data[seed].summary() for seed in spec.seeds},
        "device_kind": settings.device_kind,
        "seeds": spec.seeds,
        "stages": [
            {"kind": s.kind, "seed": s.seed, "key": s.stage_key, "status": s.status} for s in job.stages
        ],
    }
    check_job_transition(job.status, JobStatus.succeeded)
    job.status = JobStatus.succeeded
    job.finished_at = utcnow()
    log(session, job_id=job.id, message="job succeeded")


def _aware(moment: dt.datetime) -> dt.datetime:
    # SQLite returns naive datetimes even for timezone-aware columns; they were written in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)

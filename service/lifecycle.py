"""The job and stage lifecycle: the one module that changes a status.

Every change is a conditional UPDATE. It names the states the row may be in (those the state machine
in :mod:`service.states` allows to move to the new one, optionally narrowed), and it writes nothing
if the row has moved on meanwhile: a cancel, a retry, a failure and a dispatch round can race, and
whichever commits second finds the row already elsewhere and changes nothing, instead of writing an
old state back. Each change stamps its times and leaves a log line.

Besides the two primitives (:func:`move_job`, :func:`move_stage`) this module holds every operation
that changes a status: admission, cancel, retry, failure, the worker's claim, outcome and requeue,
planning's cached stages, and the effects of a stage getting its result (its dependents become
ready; a job whose stages all have results is due to be finished).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, exists, func, literal, or_, select, text, update
from sqlalchemy.orm import Session

from service.db import insert_ignoring_duplicates
from service.models import Artifact, Job, LogLine, MetricPoint, Stage, TeamUsage, utcnow
from service.states import (
    JOB_TRANSITIONS,
    STAGE_DONE,
    STAGE_TRANSITIONS,
    InvalidTransition,
    JobStatus,
    StageStatus,
)

logger = logging.getLogger(__name__)

STAGE_WAITING = (StageStatus.pending, StageStatus.queued)  # stop at once when the job ends
# The dispatcher (worker/dispatcher.py) listens here, and runs a round as soon as it is told that a
# slot was freed or work became ready instead of at its next interval: with one worker slot and
# stages of a tenth of a second, waiting for the interval would cost more than the stages.
DISPATCH_CHANNEL = "w2s_dispatch"


def log(
    session: Session, *, job_id: str, message: str, stage_id: str | None = None, level: str = "info"
) -> None:
    session.add(LogLine(job_id=job_id, stage_id=stage_id, message=message, level=level))


def wake_dispatcher(session: Session) -> None:
    """Ask for a dispatch round once this transaction commits: a Postgres NOTIFY is delivered at
    commit, not at all on rollback, and equal ones of one transaction are folded into one. Elsewhere
    (SQLite, the embedded default) the dispatcher's interval is its only clock."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": DISPATCH_CHANNEL})


def _sources(transitions: dict[Any, frozenset[Any]], to: Any, only_from: Iterable[Any] | None) -> list[str]:
    allowed = {str(state) for state, targets in transitions.items() if to in targets}
    if only_from is not None:
        allowed &= {str(state) for state in only_from}
    return sorted(allowed)


# ------------------------------------------------------------------------------------------------------
# The two primitives
# ------------------------------------------------------------------------------------------------------


def move_job(
    session: Session,
    job_id: str,
    to: JobStatus,
    *,
    only_from: Iterable[JobStatus] | None = None,
    message: str | None = None,
    level: str = "info",
    **values: Any,
) -> bool:
    """Move a job to ``to`` if it is in a state that may go there; False if it is not (it moved on)."""
    now = utcnow()
    stamps: dict[str, Any] = {}
    if to == JobStatus.running:
        stamps["started_at"] = func.coalesce(Job.started_at, now)
    elif to in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled):
        stamps["finished_at"] = now
    elif to == JobStatus.queued:
        stamps |= {"finished_at": None, "error": None}
    moved = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(_sources(JOB_TRANSITIONS, to, only_from)))
        .values(status=to, **(stamps | values))
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).first()
    if moved is not None and message:
        log(session, job_id=job_id, message=message, level=level)
    return moved is not None


@dataclass(frozen=True)
class MovedStage:
    id: str
    job_id: str
    kind: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.seed}"


def move_stage(
    session: Session,
    stage_id: str,
    to: StageStatus,
    *,
    only_from: Iterable[StageStatus] | None = None,
    attempt: int | None = None,
    message: str | None = None,
    level: str = "info",
    **values: Any,
) -> MovedStage | None:
    """Move a stage to ``to`` if it may go there (and, with ``attempt``, if that attempt still owns
    it); None if it moved on. ``message`` is logged with the stage's name in front."""
    now = utcnow()
    stamps: dict[str, Any] = {}
    if to == StageStatus.running:
        stamps |= {"started_at": now, "heartbeat_at": now}
    elif to == StageStatus.queued:
        stamps["sent_at"] = now
    elif to in (StageStatus.succeeded, StageStatus.cached, StageStatus.failed, StageStatus.cancelled):
        stamps["finished_at"] = now
    elif to == StageStatus.pending:
        stamps["finished_at"] = None
    conditions = [Stage.id == stage_id, Stage.status.in_(_sources(STAGE_TRANSITIONS, to, only_from))]
    if attempt is not None:
        conditions.append(Stage.attempts == attempt)
    row = session.execute(
        update(Stage)
        .where(*conditions)
        .values(status=to, **(stamps | values))
        .returning(Stage.id, Stage.job_id, Stage.kind, Stage.seed)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return None
    moved = MovedStage(*row)
    if message:
        log(session, job_id=moved.job_id, stage_id=moved.id, message=f"{moved.name}: {message}", level=level)
    return moved


def dependencies_done() -> Any:
    """SQL: the stage's supervisor and the stage that computes its features (each, if it has one)
    have results. A planned stage that satisfies it is ready."""
    dependency = Stage.__table__.alias("dependency")
    return ~exists().where(
        or_(dependency.c.id == Stage.depends_on_id, dependency.c.id == Stage.features_from_id),
        dependency.c.status.not_in([str(s) for s in STAGE_DONE]),
    )


def _cancel_waiting_stages(session: Session, job_id: str) -> None:
    session.execute(
        update(Stage)
        .where(Stage.job_id == job_id, Stage.status.in_([str(s) for s in STAGE_WAITING]))
        .values(status=StageStatus.cancelled, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )


# ------------------------------------------------------------------------------------------------------
# Jobs: cancel, retry, fail, finish
# ------------------------------------------------------------------------------------------------------


def _job_status(session: Session, job_id: str) -> str:
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status is None:
        raise LookupError(f"job {job_id} not found")
    return status


def cancel_job(session: Session, job_id: str, *, by: str = "") -> None:
    """Cancel: waiting stages stop now, running ones at their next step. InvalidTransition (409)
    if the job has already ended."""
    suffix = f" by {by}" if by else ""
    if not move_job(
        session, job_id, JobStatus.cancelled, cancel_requested=True, message=f"cancel requested{suffix}"
    ):
        current = _job_status(session, job_id)
        raise InvalidTransition("job", current, JobStatus.cancelled, JOB_TRANSITIONS[JobStatus(current)])
    _cancel_waiting_stages(session, job_id)


def fail_job(session: Session, job_id: str, error: str) -> bool:
    """Fail a job that is still open, stopping its other stages; False if it had already ended."""
    if not move_job(
        session,
        job_id,
        JobStatus.failed,
        only_from=(JobStatus.queued, JobStatus.running),
        error=error,
        cancel_requested=True,
        message=error,
        level="error",
    ):
        return False
    _cancel_waiting_stages(session, job_id)
    return True


def retry_job(session: Session, job_id: str) -> None:
    """Run a failed or cancelled job's unfinished stages again; stages with results are kept."""
    if not move_job(
        session,
        job_id,
        JobStatus.queued,
        cancel_requested=False,
        results=None,
        finish_due=False,
        finish_sent_at=None,
        finish_attempts=0,
        plan_sent_at=None,
        plan_attempts=0,
        message="retry requested",
    ):
        current = _job_status(session, job_id)
        raise InvalidTransition("job", current, JobStatus.queued, JOB_TRANSITIONS[JobStatus(current)])
    session.execute(
        update(Stage)
        .where(
            Stage.job_id == job_id,
            Stage.status.in_([StageStatus.failed, StageStatus.cancelled]),
        )
        .values(
            status=StageStatus.pending,
            attempts=0,
            error=None,
            finished_at=None,
            ready=and_(Stage.stage_key.is_not(None), dependencies_done()),
        )
        .execution_options(synchronize_session=False)
    )


def job_succeeded(
    session: Session, job_id: str, *, results: dict[str, Any], manifest: dict[str, Any]
) -> bool:
    """Store the results of a job whose stages all have results; False if it ended meanwhile."""
    return move_job(
        session,
        job_id,
        JobStatus.succeeded,
        only_from=(JobStatus.running,),
        results=results,
        manifest=manifest,
        finish_due=False,
        message="job succeeded",
    )


# ------------------------------------------------------------------------------------------------------
# Planning and admission
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedStage:
    stage_key: str
    gpu_class: str
    memory_gb: float | None
    features_from_id: str | None = None  # a probe head on a CPU worker: the stage computing its features


def mark_planned(
    session: Session,
    job_id: str,
    planned: dict[str, PlannedStage],
    cached: dict[str, dict[str, Any]],
) -> bool:
    """Write each stage's key, memory estimate and queue, complete those whose key already has a
    result (``cached``: stage id -> result record), and mark the job planned. Nothing is written if
    the job was cancelled or failed meanwhile (returns False)."""
    still_open = session.execute(
        update(Job)
        .where(
            Job.id == job_id, Job.status.in_([JobStatus.queued, JobStatus.running]), Job.planned.is_(False)
        )
        .values(planned=True)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).first()
    if still_open is None:
        return False
    for stage_id, plan in planned.items():
        session.execute(
            update(Stage)
            .where(Stage.id == stage_id)
            .values(
                stage_key=plan.stage_key,
                gpu_class=plan.gpu_class,
                memory_gb=plan.memory_gb,
                features_from_id=plan.features_from_id,
                ready=and_(Stage.depends_on_id.is_(None), literal(plan.features_from_id is None)),
            )
            .execution_options(synchronize_session=False)
        )
    for stage_id, record in cached.items():
        complete_cached(session, stage_id, record)
    log(
        session,
        job_id=job_id,
        message=f"planned {len(planned)} stages"
        + (f", {len(cached)} already computed" if cached else "")
        + ": "
        + ", ".join(sorted({plan.gpu_class for plan in planned.values()})),
    )
    wake_dispatcher(session)  # its first stages are ready
    return True


def admit_stage(session: Session, stage_id: str, queue: str) -> bool:
    """A ready stage gets a slot on ``queue``: queued, and its job running."""
    now = utcnow()
    moved = move_stage(
        session,
        stage_id,
        StageStatus.queued,
        only_from=(StageStatus.pending,),
        queued_at=now,
        sent_at=now,
        gpu_class=queue,
    )
    if moved is None:
        return False
    move_job(session, moved.job_id, JobStatus.running, only_from=(JobStatus.queued,))
    return True


def unadmit_stage(session: Session, stage_id: str) -> None:
    """The broker refused the stage's task: it waits for the next round, slot returned."""
    move_stage(session, stage_id, StageStatus.pending, only_from=(StageStatus.queued,))


def complete_cached(session: Session, stage_id: str, record: dict[str, Any]) -> bool:
    """Complete a waiting stage from a result another stage already computed."""
    moved = move_stage(
        session,
        stage_id,
        StageStatus.cached,
        only_from=(StageStatus.pending, StageStatus.queued),
        result=record,
        metrics={
            "accuracy": record.get("accuracy"),
            "auroc": record.get("auroc"),
            "original_seconds": record.get("seconds"),  # what the run that computed it took
        },
        message="cached result",
    )
    if moved is None:
        return False
    _after_result(session, [moved])
    return True


def _after_result(session: Session, stages: list[MovedStage]) -> None:
    """A stage has its result: its dependents become ready, and a job whose stages all have results
    is due to be finished."""
    ids = [stage.id for stage in stages]
    session.execute(
        update(Stage)
        .where(
            or_(Stage.depends_on_id.in_(ids), Stage.features_from_id.in_(ids)),
            Stage.status == StageStatus.pending,
            Stage.stage_key.is_not(None),
            dependencies_done(),
        )
        .values(ready=True)
        .execution_options(synchronize_session=False)
    )
    for job_id in sorted({stage.job_id for stage in stages}):
        unfinished = exists().where(Stage.job_id == job_id, Stage.status.not_in([str(s) for s in STAGE_DONE]))
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.planned.is_(True), ~unfinished)
            .values(finish_due=True)
            .execution_options(synchronize_session=False)
        )
        # A job whose every stage was cached at planning never had a stage admitted: it is running now.
        move_job(session, job_id, JobStatus.running, only_from=(JobStatus.queued,))


def complete_duplicates(session: Session, record: dict[str, Any]) -> int:
    """Stages elsewhere waiting for the same key take this result (cached)."""
    waiting = session.scalars(
        select(Stage.id).where(Stage.stage_key == record["key"], Stage.status == StageStatus.pending)
    ).all()
    return sum(complete_cached(session, stage_id, record) for stage_id in waiting)


# ------------------------------------------------------------------------------------------------------
# The worker: claim, outcome, requeue
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """What a claimed attempt needs to run its stage."""

    stage_id: str
    job_id: str
    spec: dict[str, Any]
    kind: str
    seed: int
    attempt: int


def claim_stage(
    session: Session, stage_id: str, worker: str, *, max_attempts: int, heartbeat_timeout_s: float
) -> Claim | None:
    """Mark the stage running as a new attempt and return what the run needs, or None if this
    delivery must not run (a duplicate, a finished or cancelled stage, or attempts used up)."""
    row = session.execute(
        select(
            Stage.status,
            Stage.attempts,
            Stage.worker,
            Stage.heartbeat_at,
            Stage.error,
            Stage.kind,
            Stage.seed,
            Stage.job_id,
            Job.cancel_requested,
            Job.status.label("job_status"),
            Job.spec,
        )
        .join(Job, Job.id == Stage.job_id)
        .where(Stage.id == stage_id)
    ).first()
    if row is None or row.status in STAGE_DONE:
        return None  # deleted, or a duplicate delivery of a finished stage
    if row.cancel_requested or row.job_status in (JobStatus.cancelled, JobStatus.failed):
        move_stage(
            session, stage_id, StageStatus.cancelled, only_from=(StageStatus.queued, StageStatus.running)
        )
        return None
    if row.status not in (StageStatus.queued, StageStatus.running):
        return None  # pending again (a retry reset it): the dispatcher sends it when admitted
    if (
        row.status == StageStatus.running
        and row.worker != worker
        and _alive(row.heartbeat_at, heartbeat_timeout_s)
    ):
        logger.info("stage %s is running on %s; duplicate delivery dropped", stage_id, row.worker)
        return None
    if row.attempts >= max_attempts:
        error = f"gave up after {row.attempts} attempts; last error: {row.error or 'worker lost'}"
        moved = move_stage(
            session,
            stage_id,
            StageStatus.failed,
            attempt=row.attempts,
            error=error,
            message=error,
            level="error",
        )
        if moved is not None:
            fail_job(session, moved.job_id, f"stage {moved.kind} (seed {moved.seed}) failed: {error}")
        return None
    if row.status == StageStatus.running:
        # Its last attempt's worker died (this worker runs one task at a time, so if it was here it is
        # gone; elsewhere, its heartbeat stopped).
        log(
            session,
            job_id=row.job_id,
            stage_id=stage_id,
            message=f"{row.kind}/{row.seed}: redelivered; attempt {row.attempts} on {row.worker} was lost",
            level="warning",
        )
    attempt = row.attempts + 1
    moved = move_stage(
        session,
        stage_id,
        StageStatus.running,
        only_from=(StageStatus.queued, StageStatus.running),
        attempt=row.attempts,
        attempts=attempt,
        worker=worker,
        step=0,
        message=f"attempt {attempt} on {worker}",
    )
    if moved is None:
        return None  # another delivery claimed it first
    if row.attempts:
        # The curves show the attempt that produces the result, not a lost one's partial run.
        session.execute(delete(MetricPoint).where(MetricPoint.stage_id == stage_id))
    return Claim(stage_id, row.job_id, row.spec, row.kind, row.seed, attempt)


def _alive(heartbeat_at: dt.datetime | None, timeout_s: float) -> bool:
    if heartbeat_at is None:
        return False
    beat = heartbeat_at if heartbeat_at.tzinfo else heartbeat_at.replace(tzinfo=dt.UTC)
    return (utcnow() - beat).total_seconds() < timeout_s


def record_usage(session: Session, stage_id: str, started_at: dt.datetime | None) -> None:
    """Account the attempt's GPU-seconds to the stage, its job and its team's hourly usage, whether
    the attempt ends well or not."""
    if started_at is None:
        return
    now = utcnow()
    started = started_at if started_at.tzinfo else started_at.replace(tzinfo=dt.UTC)
    used = max(0.0, (now - started).total_seconds())
    stage = session.execute(select(Stage.job_id, Stage.team_id).where(Stage.id == stage_id)).first()
    if stage is None:
        return
    session.execute(
        update(Stage)
        .where(Stage.id == stage_id)
        .values(gpu_seconds=Stage.gpu_seconds + used)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Job)
        .where(Job.id == stage.job_id)
        .values(gpu_seconds=Job.gpu_seconds + used)
        .execution_options(synchronize_session=False)
    )
    hour = now.replace(minute=0, second=0, microsecond=0)
    session.execute(
        insert_ignoring_duplicates(session, TeamUsage.__table__),
        [{"team_id": stage.team_id, "hour": hour, "gpu_seconds": 0.0}],
    )
    session.execute(
        update(TeamUsage)
        .where(TeamUsage.team_id == stage.team_id, TeamUsage.hour == hour)
        .values(gpu_seconds=TeamUsage.gpu_seconds + used)
        .execution_options(synchronize_session=False)
    )


def finish_stage(
    session: Session,
    stage_id: str,
    status: StageStatus,
    *,
    attempt: int,
    store_uri: str,
    error: str | None = None,
    record: dict[str, Any] | None = None,
) -> bool:
    """Write an attempt's outcome, if that attempt still owns the stage (False: it was requeued
    while it looked dead, and the current attempt writes the outcome)."""
    started_at = session.scalar(
        select(Stage.started_at).where(
            Stage.id == stage_id, Stage.attempts == attempt, Stage.status == StageStatus.running
        )
    )
    values: dict[str, Any] = {"error": error}
    if record is not None:
        metrics = session.scalar(select(Stage.metrics).where(Stage.id == stage_id)) or {}
        values |= {
            "result": record,
            "stage_key": record["key"],
            "metrics": {**metrics, "accuracy": record["accuracy"], "auroc": record["auroc"]}
            | ({"original_seconds": record.get("seconds")} if status == StageStatus.cached else {}),
        }
    moved = move_stage(
        session,
        stage_id,
        status,
        only_from=(StageStatus.running,),
        attempt=attempt,
        message=str(status) + (f": {error}" if error else ""),
        level="error" if error else "info",
        **values,
    )
    if moved is None:
        logger.warning("stage %s: outcome of superseded attempt %d discarded", stage_id, attempt)
        return False
    record_usage(session, stage_id, started_at)
    if record is not None:
        _remember_artifacts(session, record, store_uri)
        _after_result(session, [moved])
        complete_duplicates(session, record)
    elif status == StageStatus.failed:
        fail_job(session, moved.job_id, f"stage {moved.kind} (seed {moved.seed}) failed: {error}")
    wake_dispatcher(session)  # its slot is free, and its dependents or its job's finishing may be due
    return True


def _remember_artifacts(session: Session, record: dict[str, Any], store_uri: str) -> None:
    """Where a stage key's outputs are, so identical stages elsewhere complete as cached."""
    rows = [{"stage_key": record["key"], "name": "result", "uri": f"{store_uri}#stages/{record['key']}"}]
    rows += [
        {"stage_key": record["key"], "name": name, "uri": f"{store_uri}#blobs/{record[name]}"}
        for name in ("test_probs", "soft_labels", "checkpoint")
        if record.get(name)
    ]
    now = utcnow()
    session.execute(
        insert_ignoring_duplicates(session, Artifact.__table__), [r | {"created_at": now} for r in rows]
    )


def requeue_after_error(
    session: Session, stage_id: str, worker: str, error: str, due_at: dt.datetime
) -> None:
    """A transient failure: the stage goes back to queued (its slot kept) for Celery's retry; only
    this worker's own attempt, never a newer attempt elsewhere."""
    started_at = session.scalar(select(Stage.started_at).where(Stage.id == stage_id, Stage.worker == worker))
    moved = session.execute(
        update(Stage)
        .where(Stage.id == stage_id, Stage.status == StageStatus.running, Stage.worker == worker)
        .values(status=StageStatus.queued, error=error, sent_at=due_at)  # due back after the backoff
        .returning(Stage.job_id, Stage.kind, Stage.seed)
        .execution_options(synchronize_session=False)
    ).first()
    if moved is not None:
        record_usage(session, stage_id, started_at)
        wait = (due_at - utcnow()).total_seconds()
        log(
            session,
            job_id=moved.job_id,
            stage_id=stage_id,
            message=f"{moved.kind}/{moved.seed}: will retry in {wait:.0f} s: {error}",
            level="warning",
        )


def out_of_memory(
    session: Session, stage_id: str, *, attempt: int, error: str, larger_queue: str | None, store_uri: str
) -> bool:
    """The attempt ran out of GPU memory: the stage waits for a slot of ``larger_queue`` (the next
    GPU class up), or fails with ``error`` when there is none. Never a blind retry on the same class.
    False if the attempt no longer owns the stage."""
    if larger_queue is None:
        return finish_stage(
            session, stage_id, StageStatus.failed, attempt=attempt, store_uri=store_uri, error=error
        )
    started_at = session.scalar(select(Stage.started_at).where(Stage.id == stage_id))
    moved = move_stage(
        session,
        stage_id,
        StageStatus.pending,
        only_from=(StageStatus.running,),
        attempt=attempt,
        gpu_class=larger_queue,
        error=error,
        message=f"{error}; moved to {larger_queue}",
        level="warning",
    )
    if moved is None:
        return False
    record_usage(session, stage_id, started_at)
    wake_dispatcher(session)
    return True


def requeue_lost(session: Session, stage_id: str, message: str) -> bool:
    """A running stage whose worker went silent goes back to queued; its next attempt fences the old."""
    return (
        move_stage(
            session,
            stage_id,
            StageStatus.queued,
            only_from=(StageStatus.running,),
            message=message,
            level="warning",
        )
        is not None
    )

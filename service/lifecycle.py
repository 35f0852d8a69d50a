"""The job and stage lifecycle: the one module that changes a status.

Three rules make it safe under any interleaving of requests, workers, control tasks and dispatch
rounds, on any number of hosts:

- **Level-triggered.** What is due for a job is derived from its rows, never remembered as a flag
  one event set: :func:`refresh_job` recomputes, from the stage rows, which pending stages are ready
  and how many stages still lack a result (``jobs.stages_left``), and fails a job one of whose stages
  failed for good. Every operation here that changes a job's stages ends with it, so a crash, a lost
  message or a race can leave a job late but never stuck: the dispatcher's round (service/dispatch.py)
  acts on whatever the rows say is due (service/states.py names the predicates).
- **Fenced.** A stage's every attempt gets a token (``stages.fence``, incremented by each claim and
  by a retry, never reset); a heartbeat, progress write or outcome whose token is no longer current
  changes nothing. Control tasks are fenced the same way (``jobs.control_token``), and leased: the
  round records a task as sent with a lease of seconds in the same transaction that picks it (an
  outbox), so a crash between commit and send costs one lease, not a timeout of minutes.
- **One lock order.** Every operation that changes a job's stages first locks that job's row
  (:func:`lock_jobs`, in ascending id when it takes several), then writes stages: two transactions
  never wait on each other in a circle, and counts recomputed under the lock see every committed
  change. (SQLite, the embedded default, serialises writers itself: service/db.py.)

Each change is a conditional UPDATE naming the states the row may be in (the state machine in
:mod:`service.states`), so whichever of two racing writes commits second finds the row moved on and
changes nothing, instead of writing an old state back.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, delete, exists, func, or_, select, text, update
from sqlalchemy.orm import Session

from service import checkpoints
from service.db import insert_ignoring_duplicates, upsert
from service.limits import StageTimeLimit, stage_time_limit
from service.models import (
    Artifact,
    Job,
    LogLine,
    MetricPoint,
    MetricSeries,
    Stage,
    StageEvent,
    Team,
    TeamUsage,
    utcnow,
)
from service.states import (
    JOB_OPEN,
    JOB_TRANSITIONS,
    STAGE_DONE,
    STAGE_TRANSITIONS,
    STAGE_UNFINISHED,
    STAGE_WAITING,
    InvalidTransition,
    JobStatus,
    StageEventKind,
    StageStatus,
    YieldReason,
)
from service.storage import RESUME

logger = logging.getLogger(__name__)

# The dispatcher (worker/dispatcher.py) listens here, and runs a round as soon as it is told that a
# slot was freed or work became due instead of at its next interval.
DISPATCH_CHANNEL = "w2s_dispatch"
CONTROL_TASKS = ("plan", "finish")


def log(
    session: Session, *, job_id: str, message: str, stage_id: str | None = None, level: str = "info"
) -> None:
    session.add(LogLine(job_id=job_id, stage_id=stage_id, message=message, level=level))


def wake_dispatcher(session: Session) -> None:
    """Ask for a dispatch round once this transaction commits: a Postgres NOTIFY is delivered at
    commit, not at all on rollback, and equal ones of one transaction are folded into one. On SQLite
    (the embedded default, one host) the commit touches a wake file the dispatcher watches
    (service.db.wake_file), so stages follow each other without waiting for its interval."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": DISPATCH_CHANNEL})
    else:
        session.info["wake_dispatcher"] = True


def _sources(transitions: dict[Any, frozenset[Any]], to: Any, only_from: Iterable[Any] | None) -> list[str]:
    allowed = {str(state) for state, targets in transitions.items() if to in targets}
    if only_from is not None:
        allowed &= {str(state) for state in only_from}
    return sorted(allowed)


def _strs(statuses: Iterable[Any]) -> list[str]:
    return sorted(str(status) for status in statuses)


# ------------------------------------------------------------------------------------------------------
# Locks and the level-triggered refresh
# ------------------------------------------------------------------------------------------------------


def lock_jobs(session: Session, job_ids: Iterable[str]) -> list[str]:
    """Lock the jobs' rows, in ascending id (the one lock order), for the rest of the transaction;
    the ids that exist. On SQLite the database's single writer lock does this."""
    ids = sorted(set(job_ids))
    if not ids:
        return []
    query = select(Job.id).where(Job.id.in_(ids)).order_by(Job.id)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    return list(session.scalars(query))


def job_of_stage(session: Session, stage_id: str) -> str | None:
    """The id of a stage's job (a stage never changes job, so reading it before the lock is safe)."""
    return session.scalar(select(Stage.job_id).where(Stage.id == stage_id))


def dependencies_done() -> Any:
    """SQL: the stage's supervisor and the stage that computes its features (each, if it has one)
    have results. A planned stage that satisfies it is ready."""
    dependency = Stage.__table__.alias("dependency")
    return ~exists().where(
        or_(dependency.c.id == Stage.depends_on_id, dependency.c.id == Stage.features_from_id),
        dependency.c.status.not_in(_strs(STAGE_DONE)),
    )


def refresh_job(session: Session, job_id: str) -> None:
    """Derive what is due for a job from its stage rows (call with the job locked, after changing its
    stages): readiness of its pending stages, its count of stages without a result, and its failure
    when one of its stages failed for good while it was open."""
    session.execute(
        update(Stage)
        .where(Stage.job_id == job_id, Stage.status == StageStatus.pending)
        .values(ready=and_(Stage.stage_key.is_not(None), dependencies_done()))
        .execution_options(synchronize_session=False)
    )
    left = select(func.count()).where(Stage.job_id == job_id, Stage.status.in_(_strs(STAGE_UNFINISHED)))
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(stages_left=left.scalar_subquery())
        .execution_options(synchronize_session=False)
    )
    failed = session.execute(
        select(Stage.kind, Stage.seed, Stage.error)
        .join(Job, Job.id == Stage.job_id)
        .where(Stage.job_id == job_id, Stage.status == StageStatus.failed, Job.status.in_(_strs(JOB_OPEN)))
        .limit(1)
    ).first()
    if failed is not None:
        fail_job(session, job_id, f"stage {failed.kind} (seed {failed.seed}) failed: {failed.error}")


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
        stamps |= {"finished_at": now, "control_task": None, "control_lease_until": None}
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
    team_id: str

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.seed}"


def move_stage(
    session: Session,
    stage_id: str,
    to: StageStatus,
    *,
    only_from: Iterable[StageStatus] | None = None,
    if_fence: int | None = None,
    message: str | None = None,
    level: str = "info",
    **values: Any,
) -> MovedStage | None:
    """Move a stage to ``to`` if it may go there (and, with ``if_fence``, if that attempt is still
    the current one); None if it moved on. ``message`` is logged with the stage's name in front."""
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
    if to != StageStatus.running:  # a yield asked of an attempt ends with it
        stamps |= {"yield_requested_at": None, "yield_reason": None}
    conditions = [Stage.id == stage_id, Stage.status.in_(_sources(STAGE_TRANSITIONS, to, only_from))]
    if if_fence is not None:
        conditions.append(Stage.fence == if_fence)
    row = session.execute(
        update(Stage)
        .where(*conditions)
        .values(status=to, **(stamps | values))
        .returning(Stage.id, Stage.job_id, Stage.kind, Stage.seed, Stage.team_id)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return None
    moved = MovedStage(*row)
    if message:
        log(session, job_id=moved.job_id, stage_id=moved.id, message=f"{moved.name}: {message}", level=level)
    return moved


def _cancel_waiting_stages(session: Session, job_id: str) -> None:
    session.execute(
        update(Stage)
        .where(Stage.job_id == job_id, Stage.status.in_(_strs(STAGE_WAITING)))
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
    """Cancel: waiting stages stop now, running ones at their next step (their attempt then reports,
    and is fenced out if the job was retried meanwhile). InvalidTransition (409) if the job ended."""
    lock_jobs(session, [job_id])
    suffix = f" by {by}" if by else ""
    if not move_job(
        session, job_id, JobStatus.cancelled, cancel_requested=True, message=f"cancel requested{suffix}"
    ):
        current = _job_status(session, job_id)
        raise InvalidTransition("job", current, JobStatus.cancelled, JOB_TRANSITIONS[JobStatus(current)])
    _cancel_waiting_stages(session, job_id)
    refresh_job(session, job_id)


def fail_job(session: Session, job_id: str, error: str) -> bool:
    """Fail a job that is still open, stopping its other stages; False if it had already ended.
    (The caller holds the job's lock.)"""
    if not move_job(
        session,
        job_id,
        JobStatus.failed,
        only_from=JOB_OPEN,
        error=error,
        cancel_requested=True,
        message=error,
        level="error",
    ):
        return False
    _cancel_waiting_stages(session, job_id)
    return True


def retry_job(session: Session, job_id: str) -> None:
    """Run a failed or cancelled job again: every stage without a result starts over as a new
    attempt (an attempt still running, say of a cancel that has not reached its next step, is fenced
    out), stages with results are kept, and what is due (planning, admission, finishing) follows
    from the rows."""
    lock_jobs(session, [job_id])
    if not move_job(
        session,
        job_id,
        JobStatus.queued,
        cancel_requested=False,
        results=None,
        control_task=None,
        control_lease_until=None,
        control_attempts=0,
        control_token=Job.control_token + 1,  # a control task still running is fenced out
        message="retry requested",
    ):
        current = _job_status(session, job_id)
        raise InvalidTransition("job", current, JobStatus.queued, JOB_TRANSITIONS[JobStatus(current)])
    session.execute(
        update(Stage)
        .where(Stage.job_id == job_id, Stage.status.in_(_strs(STAGE_UNFINISHED)))
        .values(
            status=StageStatus.pending,
            fence=Stage.fence + 1,
            attempts=0,
            error=None,
            worker=None,
            finished_at=None,
            sent_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    refresh_job(session, job_id)
    wake_dispatcher(session)


# ------------------------------------------------------------------------------------------------------
# Control tasks (planning, finishing): leased and fenced
# ------------------------------------------------------------------------------------------------------


def lease_control(session: Session, job_id: str, task: str, lease_s: float) -> int | None:
    """Record that ``task`` is being sent for the job (the round does this in the transaction that
    picks it): a new token and a lease. Returns the token, or None if the job moved on."""
    assert task in CONTROL_TASKS
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(_strs(JOB_OPEN)))
        .values(
            control_task=task,
            control_token=Job.control_token + 1,
            control_lease_until=utcnow() + dt.timedelta(seconds=lease_s),
            # Attempts count per kind of task (finishing starts from zero after planning), and only
            # tasks that started (claim_control): a send no worker took, say while the control
            # workers were down, is sent again as often as it takes and never fails the job.
            control_attempts=case((Job.control_task == task, Job.control_attempts), else_=0),
        )
        .returning(Job.control_token)
        .execution_options(synchronize_session=False)
    ).first()
    return None if row is None else int(row[0])


def hold_control(
    session: Session, job_id: str, task: str, token: int, lease_s: float, *, starting: bool = False
) -> bool:
    """A running control task extends its lease (``starting``: claims it as it starts, which counts
    an attempt); False if its token is no longer current (it was sent again after its lease lapsed,
    or the job was retried or ended): it must stop."""
    values: dict[str, Any] = {"control_lease_until": utcnow() + dt.timedelta(seconds=lease_s)}
    if starting:
        values["control_attempts"] = Job.control_attempts + 1
    held = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.control_task == task,
            Job.control_token == token,
            Job.status.in_(_strs(JOB_OPEN)),
        )
        .values(**values)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).first()
    return held is not None


# What a control task's success writes: nothing is leased any more.
RELEASED = {"control_task": None, "control_lease_until": None, "control_attempts": 0}


def control_current(session: Session, job_id: str, task: str, token: int) -> bool:
    """Whether ``token`` is still the current lease of ``task`` (under the job's lock)."""
    return (
        session.scalar(
            select(Job.id).where(Job.id == job_id, Job.control_task == task, Job.control_token == token)
        )
        is not None
    )


def defer_control(session: Session, job_id: str, task: str, token: int, why: str, retry_in_s: float) -> bool:
    """A control task could not reach the artifact store: the job waits for storage. Its attempt is
    given back and the task is sent again after ``retry_in_s`` (its lease lapses then), so an
    outage never fails the job. False if the token is no longer current."""
    lock_jobs(session, [job_id])
    held = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.control_task == task, Job.control_token == token)
        .values(
            control_attempts=case((Job.control_attempts > 0, Job.control_attempts - 1), else_=0),
            control_lease_until=utcnow() + dt.timedelta(seconds=retry_in_s),
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).first()
    if held is not None:
        log(session, job_id=job_id, message=f"{task}: waiting for storage: {why}", level="warning")
    return held is not None


def fail_control(session: Session, job_id: str, task: str, token: int | None, error: str) -> bool:
    """A control task failed in a way that running it again would repeat: the job fails (only if
    ``token`` is still current; None: whatever holds the lease)."""
    lock_jobs(session, [job_id])
    if token is not None and not control_current(session, job_id, task, token):
        return False
    return fail_job(session, job_id, error)


def job_succeeded(
    session: Session, job_id: str, *, token: int | None, results: dict[str, Any], manifest: dict[str, Any]
) -> bool:
    """Store the results of a job whose stages all have results, if the finishing task holding
    ``token`` is still current; False if not (or the job ended meanwhile)."""
    lock_jobs(session, [job_id])
    if token is not None and not control_current(session, job_id, "finish", token):
        return False
    left = session.scalar(select(Job.stages_left).where(Job.id == job_id))
    if left:
        return False  # a stage lost its result meanwhile (retried): finishing is not due any more
    return move_job(
        session,
        job_id,
        JobStatus.succeeded,
        only_from=JOB_OPEN,
        results=results,
        manifest=manifest,
        message="job succeeded",
        **RELEASED,
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
    plan: dict[str, Any] | None = None  # w2s.stages.plan_record: what the worker runs


def mark_planned(
    session: Session,
    job_id: str,
    planned: dict[str, PlannedStage],
    cached: dict[str, dict[str, Any]],
    *,
    store_uri: str,
    token: int | None = None,
) -> bool:
    """Write each stage's plan, key, memory estimate and queue, complete those whose key already has a
    result (``cached``: stage id -> result record, found in the store at ``store_uri``), and mark the
    job planned. Nothing is written if the planning task holding ``token`` is no longer current, or
    the job ended (returns False)."""
    lock_jobs(session, [job_id])
    if token is not None and not control_current(session, job_id, "plan", token):
        return False
    still_open = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(_strs(JOB_OPEN)), Job.planned.is_(False))
        .values(planned=True, **RELEASED)
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
                plan=plan.plan,
            )
            .execution_options(synchronize_session=False)
        )
    completed = sum(
        _complete_cached(session, stage_id, record, store_uri) is not None
        for stage_id, record in cached.items()
    )
    refresh_job(session, job_id)
    if session.scalar(select(Job.stages_left).where(Job.id == job_id)) == 0:
        move_job(session, job_id, JobStatus.running, only_from=(JobStatus.queued,))
    log(
        session,
        job_id=job_id,
        message=f"planned {len(planned)} stages"
        + (f", {completed} already computed" if completed else "")
        + ": "
        + ", ".join(sorted({plan.gpu_class for plan in planned.values()})),
    )
    wake_dispatcher(session)  # its first stages are ready
    return True


def admit_stages(session: Session, admissions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Ready stages get slots: ``(stage id, queue)`` each, queued, and their jobs running. Returns
    those admitted (a stage that moved on meanwhile is left out)."""
    jobs = dict(
        session.execute(
            select(Stage.id, Stage.job_id).where(Stage.id.in_([stage_id for stage_id, _ in admissions]))
        ).all()
    )
    lock_jobs(session, jobs.values())
    admitted = []
    now = utcnow()
    for stage_id, queue in sorted(admissions, key=lambda item: (jobs.get(item[0], ""), item[0])):
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
            continue
        move_job(session, moved.job_id, JobStatus.running, only_from=(JobStatus.queued,))
        admitted.append((stage_id, queue))
    return admitted


def admit_stage(session: Session, stage_id: str, queue: str) -> bool:
    """One ready stage gets a slot on ``queue`` (see :func:`admit_stages`)."""
    return bool(admit_stages(session, [(stage_id, queue)]))


def unadmit_stage(session: Session, stage_id: str) -> None:
    """The broker refused the stage's task: it waits for the next round, slot returned."""
    job_id = job_of_stage(session, stage_id)
    if job_id is None:
        return
    lock_jobs(session, [job_id])
    if move_stage(session, stage_id, StageStatus.pending, only_from=(StageStatus.queued,)):
        refresh_job(session, job_id)


def _complete_cached(
    session: Session, stage_id: str, record: dict[str, Any], store_uri: str
) -> MovedStage | None:
    """Complete a waiting stage from a result another stage computed: None if the stage moved on, or
    the result may no longer be reused (its checkpoint was removed meanwhile: the stage runs)."""
    if not checkpoints.reusable(session, record, store_uri):
        logger.info("stage %s: the stored result names a removed checkpoint; it runs", stage_id)
        return None
    team_id = session.scalar(select(Stage.team_id).where(Stage.id == stage_id))
    moved = move_stage(
        session,
        stage_id,
        StageStatus.cached,
        only_from=(StageStatus.pending, StageStatus.queued),
        result=record,
        metrics={"accuracy": record.get("accuracy"), "auroc": record.get("auroc")}
        | _reuse_figures(session, team_id, record),
        message="cached result",
    )
    if moved is not None:
        checkpoints.hold(session, stage_id, moved.team_id, record)
    return moved


def _reuse_figures(session: Session, team_id: str | None, record: dict[str, Any]) -> dict[str, Any]:
    """What a reused result may tell its new stage about the run that computed it: its run time,
    and only when the same team computed it. Another team's run is never revealed (its time, its
    id, that it was another team's): the stage just says it was reused."""
    computed_by = session.scalar(
        select(Artifact.team_id).where(Artifact.stage_key == record["key"], Artifact.name == "result")
    )
    if team_id is None or computed_by != team_id:
        return {}
    return {"original_seconds": record.get("seconds")}  # what the team's own run that computed it took


def complete_cached(session: Session, stage_id: str, record: dict[str, Any], store_uri: str) -> bool:
    """Complete a waiting stage from a result another stage already computed (see _complete_cached)."""
    job_id = job_of_stage(session, stage_id)
    if job_id is None:
        return False
    lock_jobs(session, [job_id])
    moved = _complete_cached(session, stage_id, record, store_uri)
    if moved is None:
        return False
    refresh_job(session, job_id)
    move_job(session, job_id, JobStatus.running, only_from=(JobStatus.queued,))
    return True


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
    attempt: int  # the attempt's number, towards the limit
    fence: int  # the attempt's token: its writes count only while it is current
    plan: dict[str, Any] | None  # the planner's stored plan (w2s.stages.plan_record)
    time_limit: StageTimeLimit  # how long this attempt may run (deadline_at on the row)
    queue: str = "cpu"  # the queue it was admitted to


def claim_stage(
    session: Session,
    stage_id: str,
    worker: str,
    *,
    max_attempts: int,
    heartbeat_timeout_s: float,
    default_time_limit_s: int = 6 * 3600,
) -> Claim | None:
    """Mark the stage running as a new attempt and return what the run needs, or None if this
    delivery must not run (a duplicate, a finished or cancelled stage, or attempts used up). The
    attempt's time limit is today's (the job's, capped by its team's; ``default_time_limit_s`` is
    W2S_STAGE_TIME_LIMIT_S) and its deadline is written on the row."""
    job_id = job_of_stage(session, stage_id)
    if job_id is None:
        return None
    lock_jobs(session, [job_id])
    row = session.execute(
        select(
            Stage.status,
            Stage.attempts,
            Stage.fence,
            Stage.worker,
            Stage.heartbeat_at,
            Stage.error,
            Stage.kind,
            Stage.seed,
            Stage.plan,
            Stage.gpu_class,
            Stage.checkpoint_step,
            Job.cancel_requested,
            Job.status.label("job_status"),
            Job.spec,
            Job.stage_time_limit_s.label("job_time_limit_s"),
            Team.stage_time_limit_s.label("team_time_limit_s"),
        )
        .join(Job, Job.id == Stage.job_id)
        .join(Team, Team.id == Job.team_id)
        .where(Stage.id == stage_id)
    ).first()
    if row is None or row.status in STAGE_DONE:
        return None  # a duplicate delivery of a finished stage
    if row.cancel_requested or row.job_status in (JobStatus.cancelled, JobStatus.failed):
        if move_stage(
            session, stage_id, StageStatus.cancelled, only_from=(StageStatus.queued, StageStatus.running)
        ):
            refresh_job(session, job_id)
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
        if move_stage(
            session,
            stage_id,
            StageStatus.failed,
            if_fence=row.fence,
            error=error,
            message=error,
            level="error",
        ):
            refresh_job(session, job_id)
        return None
    if row.status == StageStatus.running:
        # Its last attempt's worker died (this worker runs one task at a time, so if it was here it is
        # gone; elsewhere, its heartbeat stopped).
        log(
            session,
            job_id=job_id,
            stage_id=stage_id,
            message=f"{row.kind}/{row.seed}: redelivered; attempt {row.attempts} on {row.worker} was lost",
            level="warning",
        )
    attempt, fence = row.attempts + 1, row.fence + 1
    time_limit = stage_time_limit(row.job_time_limit_s, row.team_time_limit_s, default_time_limit_s)
    moved = move_stage(
        session,
        stage_id,
        StageStatus.running,
        only_from=(StageStatus.queued, StageStatus.running),
        if_fence=row.fence,
        attempts=attempt,
        fence=fence,
        worker=worker,
        step=0,
        time_limit_s=time_limit.seconds,
        deadline_at=utcnow() + dt.timedelta(seconds=time_limit.seconds),
        message=f"attempt {attempt} on {worker}",
    )
    if moved is None:
        return None  # another delivery claimed it first
    if row.attempts or row.fence:
        # The curves show the attempt that produces the result, not a lost one's partial run: up to
        # the checkpoint this attempt resumes from, the steps it goes on from, and nothing after.
        resumes_at = row.checkpoint_step or 0
        session.execute(
            delete(MetricPoint).where(MetricPoint.stage_id == stage_id, MetricPoint.step > resumes_at)
        )
        if not resumes_at:
            session.execute(delete(MetricSeries).where(MetricSeries.stage_id == stage_id))
    return Claim(
        stage_id,
        job_id,
        row.spec,
        row.kind,
        row.seed,
        attempt,
        fence,
        row.plan,
        time_limit,
        row.gpu_class or "cpu",
    )


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


def _current_start(session: Session, stage_id: str, fence: int) -> dt.datetime | None:
    return session.scalar(
        select(Stage.started_at).where(
            Stage.id == stage_id, Stage.fence == fence, Stage.status == StageStatus.running
        )
    )


class ReusedResultGone(Exception):
    """The stored result an attempt found names a checkpoint that was removed after the attempt read
    it (no stage held it any more): the stage must be computed again, not completed from it."""


def finish_stage(
    session: Session,
    stage_id: str,
    status: StageStatus,
    *,
    fence: int,
    store_uri: str,
    error: str | None = None,
    record: dict[str, Any] | None = None,
    stored_bytes: dict[str, int] | None = None,
) -> bool:
    """Write an attempt's outcome, if that attempt is still current (False: it was requeued, retried
    or cancelled meanwhile, and its outcome is discarded). ``stored_bytes``: the size of each output
    the attempt wrote to the store (result, test_probs, soft_labels, checkpoint), charged to its
    team; None for a result found already stored (``status`` cached), which raises
    ReusedResultGone if its checkpoint was removed since."""
    job_id = job_of_stage(session, stage_id)
    if job_id is None:
        return False
    lock_jobs(session, [job_id])
    reused = status == StageStatus.cached and record is not None
    if reused and not checkpoints.reusable(session, record, store_uri):  # type: ignore[arg-type]
        raise ReusedResultGone(f"stage {stage_id}: the stored result's checkpoint was removed meanwhile")
    started_at = _current_start(session, stage_id, fence)
    team_id = session.scalar(select(Stage.team_id).where(Stage.id == stage_id))
    values: dict[str, Any] = {"error": error}
    if record is not None:
        metrics = session.scalar(select(Stage.metrics).where(Stage.id == stage_id)) or {}
        values |= {
            "result": record,
            "metrics": {**metrics, "accuracy": record["accuracy"], "auroc": record["auroc"]}
            | (_reuse_figures(session, team_id, record) if reused else {}),
        }
    moved = move_stage(
        session,
        stage_id,
        status,
        only_from=(StageStatus.running,),
        if_fence=fence,
        message=str(status) + (f": {error}" if error else ""),
        level="error" if error else "info",
        **values,
    )
    if moved is None:
        logger.warning("stage %s: outcome of superseded attempt (fence %d) discarded", stage_id, fence)
        return False
    record_usage(session, stage_id, started_at)
    if record is not None:
        computed_by = moved.team_id if stored_bytes else None
        _remember_artifacts(session, record, store_uri, computed_by, stored_bytes)
        if record.get("checkpoint") and computed_by:
            size = (stored_bytes or {}).get("checkpoint", 0)
            checkpoints.record_computed(session, record, store_uri, computed_by, size)
        checkpoints.hold(session, stage_id, moved.team_id, record)
        # Its result is stored: the library removed the resume checkpoint, so nobody is charged for it.
        session.execute(delete(Artifact).where(Artifact.stage_key == record["key"], Artifact.name == RESUME))
    refresh_job(session, job_id)
    wake_dispatcher(session)  # its slot is free, and its dependents or its job's finishing may be due
    return True


def _remember_artifacts(
    session: Session,
    record: dict[str, Any],
    store_uri: str,
    team_id: str | None,
    stored_bytes: dict[str, int] | None,
) -> None:
    """Where a stage key's outputs are (waiting stages with the same key complete as cached from it),
    who computed them and their size (the team's storage, service/storage.py). Its checkpoint has
    rows of its own (service/checkpoints.py)."""
    rows = [{"stage_key": record["key"], "name": "result", "uri": f"{store_uri}#stages/{record['key']}"}]
    rows += [
        {"stage_key": record["key"], "name": name, "uri": f"{store_uri}#blobs/{record[name]}"}
        for name in ("test_probs", "soft_labels")
        if record.get(name)
    ]
    now = utcnow()
    sizes = stored_bytes or {}
    # A stage that computed them names the run the store now holds (a key computed again after its
    # checkpoint was removed is the new run's); a reused result leaves the rows as they are.
    statement = (
        upsert(session, Artifact.__table__, ("stage_key", "name"))
        if team_id
        else insert_ignoring_duplicates(session, Artifact.__table__)
    )
    session.execute(
        statement,
        [
            row | {"created_at": now, "team_id": team_id, "size_bytes": sizes.get(row["name"], 0)}
            for row in rows
        ],
    )


def _cancel_if_job_ended(
    session: Session, job_id: str, stage_id: str, fence: int, why: str
) -> MovedStage | None:
    """A running stage of a job that has ended (cancelled or failed meanwhile) is not sent back to
    wait: it is cancelled, so no waiting stage outlives its job or holds a slot (call with the job
    locked). None if the job is open (or the attempt is no longer current)."""
    if _job_status(session, job_id) in JOB_OPEN:
        return None
    started_at = _current_start(session, stage_id, fence)
    moved = move_stage(
        session,
        stage_id,
        StageStatus.cancelled,
        only_from=(StageStatus.running,),
        if_fence=fence,
        message=f"{why}; not run again: its job has ended",
        level="warning",
    )
    if moved is not None:
        record_usage(session, stage_id, started_at)
        refresh_job(session, job_id)
        wake_dispatcher(session)  # its slot is free
    return moved


def requeue_after_error(
    session: Session,
    stage_id: str,
    fence: int,
    error: str,
    due_at: dt.datetime,
    *,
    spend_attempt: bool = True,
) -> None:
    """A transient failure: the stage goes back to queued (its slot kept) for Celery's retry; only
    if the failed attempt is still the current one, and only while its job is open. Without
    ``spend_attempt`` (the artifact store was down: the stage waits for storage) the attempt is
    given back, so an outage never uses up a stage's attempts."""
    job_id = job_of_stage(session, stage_id)
    if job_id is None:
        return
    lock_jobs(session, [job_id])
    if _job_status(session, job_id) not in JOB_OPEN:
        _cancel_if_job_ended(session, job_id, stage_id, fence, error)
        return
    if _leaving(session, stage_id, fence):
        _back_to_waiting(session, job_id, stage_id, fence, why=f"ended with an error ({error})")
        return
    started_at = _current_start(session, stage_id, fence)
    moved = move_stage(
        session,
        stage_id,
        StageStatus.queued,
        only_from=(StageStatus.running,),
        if_fence=fence,
        error=error,
    )
    if moved is None:
        return
    # Due back after the backoff: the round does not send it again before then.
    due: dict[str, Any] = {"sent_at": due_at}
    if not spend_attempt:
        due["attempts"] = case((Stage.attempts > 0, Stage.attempts - 1), else_=0)
    session.execute(update(Stage).where(Stage.id == stage_id).values(**due))
    record_usage(session, stage_id, started_at)
    wait = (due_at - utcnow()).total_seconds()
    log(
        session,
        job_id=moved.job_id,
        stage_id=stage_id,
        message=f"{moved.name}: will retry in {wait:.0f} s: {error}",
        level="warning",
    )


def out_of_memory(
    session: Session, stage_id: str, *, fence: int, error: str, larger_queue: str | None, store_uri: str
) -> bool:
    """The attempt ran out of GPU memory: the stage waits for a slot of ``larger_queue`` (the next
    GPU class up), or fails with ``error`` when there is none. Never a blind retry on the same class.
    False if the attempt is no longer current."""
    if larger_queue is None:
        return finish_stage(
            session, stage_id, StageStatus.failed, fence=fence, store_uri=store_uri, error=error
        )
    job_id = job_of_stage(session, stage_id)
    if job_id is None:
        return False
    lock_jobs(session, [job_id])
    if _job_status(session, job_id) not in JOB_OPEN:
        return _cancel_if_job_ended(session, job_id, stage_id, fence, error) is not None
    started_at = _current_start(session, stage_id, fence)
    moved = move_stage(
        session,
        stage_id,
        StageStatus.pending,
        only_from=(StageStatus.running,),
        if_fence=fence,
        gpu_class=larger_queue,
        error=error,
        message=f"{error}; moved to {larger_queue}",
        level="warning",
    )
    if moved is None:
        return False
    record_usage(session, stage_id, started_at)
    refresh_job(session, job_id)
    wake_dispatcher(session)
    return True


def requeue_lost(session: Session, stage_id: str, fence: int, message: str) -> bool:
    """A running stage whose worker went silent goes back to queued, its next claim fencing the old
    attempt out; of a job that has ended, it is cancelled instead."""
    job_id = job_of_stage(session, stage_id)
    if job_id is None:
        return False
    lock_jobs(session, [job_id])
    if _job_status(session, job_id) not in JOB_OPEN:
        return _cancel_if_job_ended(session, job_id, stage_id, fence, message) is not None
    if _leaving(session, stage_id, fence):
        _back_to_waiting(session, job_id, stage_id, fence, why=message)
        return False  # waiting again, not sent
    return (
        move_stage(
            session,
            stage_id,
            StageStatus.queued,
            only_from=(StageStatus.running,),
            if_fence=fence,
            message=message,
            level="warning",
        )
        is not None
    )


# ------------------------------------------------------------------------------------------------------
# Preemption and drain: a running attempt asked to checkpoint and yield its slot
# ------------------------------------------------------------------------------------------------------


def record_event(
    session: Session,
    stage_id: str,
    kind: StageEventKind,
    *,
    step: int | None = None,
    detail: str | None = None,
    team_id: str | None = None,
) -> None:
    """A line on the stage's timeline (service/models.py StageEvent)."""
    team_id = team_id or session.scalar(select(Stage.team_id).where(Stage.id == stage_id))
    if team_id is not None:
        session.add(StageEvent(stage_id=stage_id, team_id=team_id, kind=kind, step=step, detail=detail))


def ask_to_yield(session: Session, stage_id: str, fence: int, reason: YieldReason, detail: str) -> bool:
    """Ask the running attempt ``fence`` to write a checkpoint and give its slot back (its worker sees
    the flag at its next progress write or heartbeat, and stops at its next step). A flag, not a status
    change: the attempt stays running until it yields (:func:`yield_stage`) or the grace period ends
    (:func:`force_yield`). False if it is not running that attempt, or was asked already."""
    moved = session.execute(
        update(Stage)
        .where(
            Stage.id == stage_id,
            Stage.status == StageStatus.running,
            Stage.fence == fence,
            Stage.yield_requested_at.is_(None),
        )
        .values(yield_requested_at=utcnow(), yield_reason=reason)
        .returning(Stage.job_id, Stage.kind, Stage.seed, Stage.team_id, Stage.step)
        .execution_options(synchronize_session=False)
    ).first()
    if moved is None:
        return False
    job_id, kind, seed, team_id, step = moved
    event = StageEventKind.preempt_asked if reason == YieldReason.preempt else StageEventKind.drain_asked
    record_event(session, stage_id, event, step=step, detail=detail, team_id=team_id)
    log(session, job_id=job_id, stage_id=stage_id, message=f"{kind}/{seed}: {detail}", level="warning")
    return True


def yield_stage(session: Session, stage_id: str, fence: int, step: int) -> bool:
    """The attempt wrote its checkpoint at ``step`` (0: none; it starts over) and stopped as asked: the
    stage waits again (pending, its slot free), its attempt given back, to resume from the checkpoint
    when a slot is its turn. Its time so far is charged. False if the attempt is no longer current."""
    job_id = job_of_stage(session, stage_id)
    if job_id is None:
        return False
    lock_jobs(session, [job_id])
    if _job_status(session, job_id) not in JOB_OPEN:
        return _cancel_if_job_ended(session, job_id, stage_id, fence, "yielded") is not None
    return _back_to_waiting(session, job_id, stage_id, fence, step=step)


def force_yield(session: Session, stage_id: str, fence: int, grace_s: float) -> bool:
    """An attempt asked to yield that has not within ``grace_s``: it is stopped (fenced out; its worker
    sees that at its next heartbeat and ends it) and the stage waits again, to resume from its last
    periodic checkpoint. False if the attempt is no longer current."""
    job_id = job_of_stage(session, stage_id)
    if job_id is None:
        return False
    lock_jobs(session, [job_id])
    why = f"did not yield within {grace_s:.0f} s"
    if _job_status(session, job_id) not in JOB_OPEN:
        return _cancel_if_job_ended(session, job_id, stage_id, fence, why) is not None
    return _back_to_waiting(session, job_id, stage_id, fence, why=why)


def _leaving(session: Session, stage_id: str, fence: int) -> bool:
    """Whether the running attempt ``fence`` was asked to yield: the stage preempting it already has
    its slot, so however this attempt ends short of a result, the stage gives the slot up."""
    return (
        session.scalar(
            select(Stage.yield_requested_at).where(
                Stage.id == stage_id, Stage.fence == fence, Stage.status == StageStatus.running
            )
        )
        is not None
    )


def _back_to_waiting(
    session: Session, job_id: str, stage_id: str, fence: int, *, step: int | None = None, why: str = ""
) -> bool:
    """The attempt asked to yield ends: the stage waits again (pending, its slot free), its attempt
    given back, to resume from ``step`` (its checkpoint; None: its last periodic one, as the row
    says). ``why``: it did not yield itself (the grace ran out, it failed, its worker was lost)."""
    row = session.execute(
        select(Stage.yield_reason, Stage.checkpoint_step).where(Stage.id == stage_id, Stage.fence == fence)
    ).first()
    if row is None:
        return False
    reason, step = row.yield_reason, (row.checkpoint_step or 0) if step is None else step
    forced = bool(why)
    started_at = _current_start(session, stage_id, fence)
    preempted = reason == YieldReason.preempt
    where = f"from its checkpoint at step {step}" if step else "from step 0 (no checkpoint yet)"
    verb = f"stopped ({why})" if forced else "drained" if reason == YieldReason.drain else "preempted"
    values: dict[str, Any] = {
        # Not the stage's fault: the attempt is given back.
        "attempts": case((Stage.attempts > 0, Stage.attempts - 1), else_=0),
        "checkpoint_step": step or None,
        "fence": Stage.fence + 1,  # whatever the old attempt still writes changes nothing
    }
    if preempted:
        values |= {"preemptions": Stage.preemptions + 1, "last_preempted_at": utcnow()}
    moved = move_stage(
        session,
        stage_id,
        StageStatus.pending,
        only_from=(StageStatus.running,),
        if_fence=fence,
        message=f"{verb}; waits to resume {where}",
        level="warning",
        **values,
    )
    if moved is None:
        return False
    record_usage(session, stage_id, started_at)  # the time it ran is charged, the wait is not
    record_event(
        session,
        stage_id,
        StageEventKind.forced if forced else StageEventKind.yielded,
        step=step,
        detail=f"{verb}; resumes {where}",
        team_id=moved.team_id,
    )
    refresh_job(session, job_id)
    wake_dispatcher(session)  # its slot is free
    return True


def record_checkpoint(
    session: Session, stage_id: str, fence: int, step: int, detail: str, *, size_bytes: int, store_uri: str
) -> None:
    """The current attempt wrote a resume checkpoint at ``step``: the next attempt resumes there, and
    its bytes count towards the team's storage until the stage's result is stored."""
    moved = session.execute(
        update(Stage)
        .where(Stage.id == stage_id, Stage.fence == fence, Stage.status == StageStatus.running)
        .values(checkpoint_step=step)
        .returning(Stage.team_id, Stage.stage_key)
        .execution_options(synchronize_session=False)
    ).first()
    if moved is None:
        return
    team_id, key = moved
    record_event(session, stage_id, StageEventKind.checkpoint, step=step, detail=detail, team_id=team_id)
    if key is not None:
        session.execute(
            upsert(session, Artifact.__table__, ("stage_key", "name")),
            [
                {
                    "stage_key": key,
                    "name": RESUME,
                    "uri": f"{store_uri}#files/resume/{key}.pt",
                    "created_at": utcnow(),
                    "team_id": team_id,
                    "size_bytes": size_bytes,
                }
            ],
        )


def record_resumed(session: Session, stage_id: str, fence: int, step: int) -> None:
    moved = session.execute(
        select(Stage.team_id, Stage.job_id, Stage.kind, Stage.seed).where(
            Stage.id == stage_id, Stage.fence == fence, Stage.status == StageStatus.running
        )
    ).first()
    if moved is not None:
        team_id, job_id, kind, seed = moved
        record_event(session, stage_id, StageEventKind.resumed, step=step, team_id=team_id)
        log(session, job_id=job_id, stage_id=stage_id, message=f"{kind}/{seed}: resumed from step {step}")

"""The lifecycle's invariants, checked against the rows: the jobs that break one, and why.

Two kinds of finding:

- **Wedged** (``wedged=True``): rows no dispatch round can move on from. An open job with work left
  and nothing due or in flight, a derived count or readiness flag that disagrees with the stage
  rows, an open job holding a failed stage, an ended job with stages still waiting. The lifecycle
  (service/lifecycle.py) is built so that none of these can happen; each one found is a bug to
  report with the job's log.
- **Overdue**: work the rows say is due that nobody has acted on for longer than its lease or
  timeout plus ``grace_s``: planning or finishing not leased, a stage sent and never claimed, a
  running stage whose heartbeat went silent. The dispatcher's round repairs each of these; finding
  them means it is not running (or not reaching the database or the broker).

And, given the artifact store, **missing outputs** (wedged): a finished stage whose result names a
blob or a checkpoint that is not in the store. Checkpoints are removed only once no stage holds them
(service/checkpoints.py), so none should ever be found; one found means the store lost data.

``w2s-service doctor`` and ``GET /v1/admin/doctor`` print this. With the dispatcher running, both
stay empty.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select, text
from sqlalchemy.orm import Session

from service.models import Job, LogLine, Stage, utcnow
from service.settings import Settings
from service.states import (
    JOB_FINISH_DUE,
    JOB_OPEN,
    JOB_PLAN_DUE,
    JOB_TERMINAL,
    STAGE_ACTIVE,
    STAGE_DONE,
    STAGE_UNFINISHED,
    STAGE_WAITING,
    JobStatus,
    StageStatus,
)


def _strs(statuses: Any) -> list[str]:
    return sorted(str(status) for status in statuses)


OPEN, DONE, ACTIVE = _strs(JOB_OPEN), _strs(STAGE_DONE), _strs(STAGE_ACTIVE)
UNFINISHED, WAITING, TERMINAL = _strs(STAGE_UNFINISHED), _strs(STAGE_WAITING), _strs(JOB_TERMINAL)


@dataclass(frozen=True)
class Finding:
    job_id: str
    team_id: str
    job_status: str
    problem: str  # a short name: nothing_due, stages_left, ready, failed_stage, ...
    detail: str  # what is wrong, in words, with the numbers
    wedged: bool  # True: no round can repair it; False: overdue, the dispatcher would repair it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Checkup:
    checked_jobs: int  # open jobs looked at, plus ended jobs that still hold waiting stages
    findings: list[Finding]

    @property
    def healthy(self) -> bool:
        return not self.findings


def checkup(session: Session, settings: Settings, *, grace_s: float = 60.0, outputs: bool = False) -> Checkup:
    """Every invariant, over every open job (and the ended jobs that still hold waiting stages).
    Set-based queries: the cost grows with the open jobs, not with the history. With ``outputs``,
    also every finished stage's outputs against the artifact store (one listing of the store)."""
    now = utcnow()
    findings: list[Finding] = []
    jobs = {
        job_id: (team_id, status)
        for job_id, team_id, status in session.execute(
            select(Job.id, Job.team_id, Job.status).where(Job.status.in_(OPEN))
        ).all()
    }

    def found(job_id: str, problem: str, detail: str, *, wedged: bool) -> None:
        team_id, status = jobs[job_id]
        findings.append(Finding(job_id, team_id, status, problem, detail, wedged))

    # Derived counts: jobs.stages_left against the stage rows.
    unfinished = dict(
        session.execute(
            select(Stage.job_id, func.count())
            .join(Job, Job.id == Stage.job_id)
            .where(Job.status.in_(OPEN), Stage.status.in_(UNFINISHED))
            .group_by(Stage.job_id)
        ).all()
    )
    for job_id, left in session.execute(select(Job.id, Job.stages_left).where(Job.status.in_(OPEN))).all():
        actual = unfinished.get(job_id, 0)
        if left != actual:
            found(
                job_id,
                "stages_left",
                f"jobs.stages_left says {left} but {actual} stages lack a result",
                wedged=True,
            )

    # Readiness: a pending stage is ready exactly when it is planned and its dependencies have results.
    dependency = Stage.__table__.alias("dependency")
    deps_done = (
        ~select(dependency.c.id)
        .where(
            or_(dependency.c.id == Stage.depends_on_id, dependency.c.id == Stage.features_from_id),
            dependency.c.status.not_in(DONE),
        )
        .exists()
    )
    should_be_ready = and_(Stage.stage_key.is_not(None), deps_done)
    for job_id, stage_id, kind, flag in session.execute(
        select(Stage.job_id, Stage.id, Stage.kind, Stage.ready)
        .join(Job, Job.id == Stage.job_id)
        .where(Job.status.in_(OPEN), Stage.status == StageStatus.pending, Stage.ready != should_be_ready)
        .order_by(Stage.job_id, Stage.id)
    ).all():
        found(
            job_id,
            "ready",
            f"stage {stage_id} ({kind}) is marked {'ready' if flag else 'not ready'}, but its plan and "
            f"dependencies say {'not ready' if flag else 'ready'}",
            wedged=True,
        )

    # An open job with a stage that failed for good should have failed with it.
    for job_id, stage_id, kind in session.execute(
        select(Stage.job_id, Stage.id, Stage.kind)
        .join(Job, Job.id == Stage.job_id)
        .where(Job.status.in_(OPEN), Stage.status == StageStatus.failed)
        .order_by(Stage.job_id, Stage.id)
    ).all():
        detail = f"stage {stage_id} ({kind}) failed but the job is still open"
        found(job_id, "failed_stage", detail, wedged=True)

    # Nothing due and nothing in flight: planned, stages left, none ready, queued or running.
    moving = (
        select(Stage.job_id)
        .where(or_(Stage.status.in_(ACTIVE), and_(Stage.status == StageStatus.pending, Stage.ready)))
        .distinct()
    )
    for job_id, left in session.execute(
        select(Job.id, Job.stages_left).where(
            Job.status.in_(OPEN), Job.planned, Job.stages_left > 0, Job.id.not_in(moving)
        )
    ).all():
        found(
            job_id,
            "nothing_due",
            f"{left} stages lack a result but none is ready, queued or running: nothing will move it",
            wedged=True,
        )

    # Ended jobs whose stages still wait for a slot or a worker (cancelling or failing stops them).
    ended = session.execute(
        select(Job.id, Job.team_id, Job.status, func.count())
        .join(Stage, Stage.job_id == Job.id)
        .where(Job.status.in_(TERMINAL), Stage.status.in_(WAITING))
        .group_by(Job.id, Job.team_id, Job.status)
    ).all()
    for job_id, team_id, status, count in ended:
        jobs[job_id] = (team_id, status)
        detail = f"the job is {status} but {count} stages still wait"
        found(job_id, "ended_with_waiting_stages", detail, wedged=True)
    for job_id, team_id, count in session.execute(
        select(Job.id, Job.team_id, func.count())
        .join(Stage, Stage.job_id == Job.id)
        .where(Job.status == JobStatus.succeeded, Stage.status.not_in(DONE))
        .group_by(Job.id, Job.team_id)
    ).all():
        jobs[job_id] = (team_id, JobStatus.succeeded)
        detail = f"the job succeeded but {count} stages have no result"
        found(job_id, "succeeded_without_results", detail, wedged=True)

    # Overdue: due work nobody acted on for longer than its lease or timeout, plus grace.
    last_activity = (
        select(func.max(LogLine.created_at)).where(LogLine.job_id == Job.id).correlate(Job).scalar_subquery()
    )
    lease_free = or_(Job.control_lease_until.is_(None), Job.control_lease_until < now)
    for task, due in (("planning", JOB_PLAN_DUE), ("finishing", JOB_FINISH_DUE)):
        for job_id, created_at, lease_until, activity in session.execute(
            select(Job.id, Job.created_at, Job.control_lease_until, last_activity).where(
                text(due), lease_free
            )
        ).all():
            since = max(_aware(t) for t in (created_at, lease_until, activity) if t is not None)
            idle = (now - since).total_seconds()
            if idle > settings.control_lease_s + grace_s:
                found(
                    job_id,
                    f"{task}_overdue",
                    f"{task} has been due for {idle:.0f} s and no task holds it; is the dispatcher running?",
                    wedged=False,
                )
    silent_since = now - dt.timedelta(seconds=settings.heartbeat_timeout_s + grace_s)
    for job_id, stage_id, kind, worker, beat in session.execute(
        select(Stage.job_id, Stage.id, Stage.kind, Stage.worker, Stage.heartbeat_at)
        .join(Job, Job.id == Stage.job_id)
        .where(
            Stage.status == StageStatus.running,
            or_(Stage.heartbeat_at < silent_since, Stage.heartbeat_at.is_(None)),
        )
        .order_by(Stage.job_id, Stage.id)
    ).all():
        jobs.setdefault(job_id, _job_row(session, job_id))
        silent = "never beat" if beat is None else f"silent for {(now - _aware(beat)).total_seconds():.0f} s"
        found(
            job_id,
            "stage_silent",
            f"stage {stage_id} ({kind}) runs on {worker}, {silent}; the dispatcher requeues such stages "
            "after heartbeat_timeout_s: is it running?",
            wedged=False,
        )
    unclaimed_since = now - dt.timedelta(seconds=settings.redeliver_after_s + grace_s)
    for job_id, stage_id, kind, sent_at in session.execute(
        select(Stage.job_id, Stage.id, Stage.kind, Stage.sent_at)
        .where(Stage.status == StageStatus.queued, Stage.sent_at < unclaimed_since)
        .order_by(Stage.job_id, Stage.id)
    ).all():
        jobs.setdefault(job_id, _job_row(session, job_id))
        found(
            job_id,
            "stage_unclaimed",
            f"stage {stage_id} ({kind}) was sent {(now - _aware(sent_at)).total_seconds():.0f} s ago and "
            "no worker claimed it; the dispatcher sends such stages again: is it running, and is a worker "
            "consuming its queue?",
            wedged=False,
        )
    if outputs:
        from w2s.store import ArtifactStore

        for finding in missing_outputs(session, ArtifactStore(settings.store_uri)):
            jobs.setdefault(finding.job_id, (finding.team_id, finding.job_status))
            findings.append(finding)
    findings.sort(key=lambda finding: (not finding.wedged, finding.job_id, finding.problem))
    return Checkup(checked_jobs=len(jobs), findings=findings)


OUTPUT_BLOBS = ("test_probs", "soft_labels")


def missing_outputs(session: Session, store: Any) -> list[Finding]:
    """Finished stages whose result names a blob or a checkpoint the store does not hold."""
    blobs, checkpoints = set(store.blob_digests()), set(store.checkpoint_refs())
    found = []
    for job_id, team_id, job_status, stage_id, kind, result in session.execute(
        select(Job.id, Job.team_id, Job.status, Stage.id, Stage.kind, Stage.result)
        .join(Stage, Stage.job_id == Job.id)
        .where(Stage.status.in_(DONE), Stage.result.is_not(None))
        .order_by(Job.id, Stage.id)
    ).all():
        missing = [name for name in OUTPUT_BLOBS if result.get(name) and result[name] not in blobs]
        ref = result.get("checkpoint")
        if ref and ref not in (checkpoints if "/" in ref else blobs):
            missing.append("checkpoint")
        if missing:
            detail = f"stage {stage_id} ({kind}) names {', '.join(missing)}, not in the artifact store"
            found.append(Finding(job_id, team_id, job_status, "missing_output", detail, wedged=True))
    return found


def _aware(moment: dt.datetime) -> dt.datetime:
    """SQLite (the embedded default) gives back naive UTC datetimes; Postgres aware ones."""
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _job_row(session: Session, job_id: str) -> tuple[str, str]:
    team_id, status = session.execute(select(Job.team_id, Job.status).where(Job.id == job_id)).one()
    return team_id, status

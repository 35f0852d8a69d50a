"""One dispatch round, in the database: requeue what faults lost, pick the jobs whose planning or
finishing is due (their control tasks do the work, worker/control.py), and admit ready stages to
free worker slots.

The round only admits. Every query is indexed and returns rows in proportion to the worker slots
and the stages in flight, never to the backlog: a hundred thousand queued stages cost what ten do.
It loads no dataset, hashes no file and computes no statistics, so nothing one job asks for can
slow or stop the round for everyone. ``worker/dispatcher.py`` runs rounds and sends what they pick.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.orm import Session

from service.lifecycle import (
    admit_stages,
    complete_cached,
    fail_job,
    lease_control,
    lock_jobs,
    log,
    requeue_lost,
)
from service.models import Job, Stage, Team, TeamUsage, utcnow
from service.scheduler import Candidate, TeamShare, admit
from service.settings import Settings
from service.states import JOB_FINISH_DUE, JOB_PLAN_DUE, STAGE_ACTIVE, STAGE_DONE, STAGE_READY, StageStatus

logger = logging.getLogger(__name__)

# The predicates of service/states.py, as the partial indexes in service/models.py use them: the
# database can then use those indexes.
PLAN_DUE = text(JOB_PLAN_DUE)
FINISH_DUE = text(JOB_FINISH_DUE)
READY = text(STAGE_READY)
ACTIVE = [str(status) for status in STAGE_ACTIVE]


@dataclass
class RoundReport:
    admitted: list[tuple[str, str]] = field(default_factory=list)  # (stage id, queue)
    resent: list[tuple[str, str]] = field(default_factory=list)  # (stage id, queue): lost, sent again
    plan: list[tuple[str, int]] = field(default_factory=list)  # (job id, lease token): planning to send
    finish: list[tuple[str, int]] = field(default_factory=list)  # (job id, lease token): finishing to send
    failed: int = 0  # jobs failed because their control task was lost too often
    cached: int = 0  # stages completed from a result another stage computed

    def __bool__(self) -> bool:
        return bool(self.admitted or self.resent or self.plan or self.finish or self.failed or self.cached)


def dispatch_round(session: Session, settings: Settings) -> RoundReport:
    """One pass. The caller commits, then sends what the report lists."""
    report = RoundReport()
    recover_lost_stages(session, settings, report)
    due_control_tasks(session, settings, report)
    admit_ready_stages(session, settings, report)
    return report


def recover_lost_stages(session: Session, settings: Settings, report: RoundReport) -> None:
    """Send again what a fault lost, keeping each stage's slot.

    A running stage whose heartbeat went silent lost its worker (killed, or its machine gone): it is
    requeued, and the new attempt fences the old one out (service/lifecycle.py). A queued stage that
    no worker claimed within a lease of seconds after it was sent (the dispatcher died between its
    commit and the send, or the broker lost the message) is sent again, then every
    ``redeliver_after_s``. A duplicate message is harmless: the claim drops it.
    """
    now = utcnow()
    silent_since = now - dt.timedelta(seconds=settings.heartbeat_timeout_s)
    lost = session.execute(
        select(Stage.id, Stage.fence, Stage.worker, Stage.gpu_class)
        .where(
            Stage.status == StageStatus.running,
            or_(Stage.heartbeat_at < silent_since, Stage.heartbeat_at.is_(None)),
        )
        .order_by(Stage.id)
    ).all()
    for stage_id, fence, worker, queue in lost:
        message = f"no heartbeat from {worker} for {settings.heartbeat_timeout_s:.0f} s; requeued"
        if requeue_lost(session, stage_id, fence, message):
            report.resent.append((stage_id, queue or "cpu"))
    first_lease = now - dt.timedelta(seconds=settings.claim_lease_s)
    again = now - dt.timedelta(seconds=settings.redeliver_after_s)
    unclaimed = session.execute(
        select(Stage.id, Stage.job_id)
        .where(
            Stage.status == StageStatus.queued,
            or_(
                and_(Stage.sent_at == Stage.queued_at, Stage.sent_at < first_lease),  # sent once
                Stage.sent_at < again,
            ),
        )
        .order_by(Stage.id)
    ).all()
    if not unclaimed:
        return
    lock_jobs(session, [job_id for _, job_id in unclaimed])  # a job before its stages
    resent = session.execute(
        update(Stage)
        .where(
            Stage.id.in_([stage_id for stage_id, _ in unclaimed]),
            Stage.status == StageStatus.queued,
            or_(and_(Stage.sent_at == Stage.queued_at, Stage.sent_at < first_lease), Stage.sent_at < again),
        )
        .values(sent_at=now)
        .returning(Stage.id, Stage.job_id, Stage.kind, Stage.seed, Stage.gpu_class)
        .execution_options(synchronize_session=False)
    ).all()
    for stage_id, job_id, kind, seed, queue in sorted(resent):
        message = f"{kind}/{seed}: no worker claimed it; sent again"
        log(session, job_id=job_id, stage_id=stage_id, message=message, level="warning")
        report.resent.append((stage_id, queue or "cpu"))


def due_control_tasks(session: Session, settings: Settings, report: RoundReport) -> None:
    """Jobs to plan and jobs to finish, as their rows say (service/states.py), whose task is not
    leased right now. Fair across teams: a team has at most one planning and one finishing task out
    at a time, so a sweep of a thousand jobs is planned one job after another while another team's
    job is planned as soon as it arrives. A task whose lease lapsed (its worker lost, or the send
    lost) is due again; a job whose task started and was lost too often fails (a send no worker took is
    not an attempt: it is sent again as long as it takes)."""
    now = utcnow()
    free = or_(Job.control_lease_until.is_(None), Job.control_lease_until < now)
    for due, task, what, into in (
        (PLAN_DUE, "plan", "planning", report.plan),
        (FINISH_DUE, "finish", "finishing", report.finish),
    ):
        busy_teams = set(session.scalars(select(Job.team_id).where(due, ~free).distinct()))
        waiting_teams = session.scalars(  # the team waiting longest first
            select(Job.team_id).where(due, free).group_by(Job.team_id).order_by(func.min(Job.created_at))
        ).all()
        chosen = [team_id for team_id in waiting_teams if team_id not in busy_teams]
        for team_id in chosen[: settings.dispatch_batch]:
            row = session.execute(
                select(Job.id, Job.control_task, Job.control_attempts)
                .where(due, free, Job.team_id == team_id)
                .order_by(Job.created_at)
                .limit(1)
            ).first()
            if row is None:
                continue
            job_id, leased_task, tries = row
            if leased_task == task and tries >= settings.max_control_attempts:
                error = (
                    f"{what} the job started {tries} times and did not end (its worker was lost or "
                    f"stuck, each time for longer than its {settings.control_lease_s:.0f} s lease); retry "
                    "the job, and if it happens again, tell the operators: the control worker's log "
                    "says why"
                )
                lock_jobs(session, [job_id])
                report.failed += fail_job(session, job_id, error)
                continue
            token = lease_control(session, job_id, task, settings.control_lease_s)
            if token is not None:
                into.append((job_id, token))


def team_shares(session: Session, settings: Settings) -> dict[str, TeamShare]:
    """Every enabled team's fair-share standing: weight, quota, stages in flight, recent GPU-seconds."""
    since = utcnow() - dt.timedelta(hours=settings.fair_share_window_h)
    active = dict(
        session.execute(
            select(Stage.team_id, func.count()).where(Stage.status.in_(ACTIVE)).group_by(Stage.team_id)
        ).all()
    )
    recent = dict(
        session.execute(
            select(TeamUsage.team_id, func.sum(TeamUsage.gpu_seconds))
            .where(TeamUsage.hour >= since)
            .group_by(TeamUsage.team_id)
        ).all()
    )
    shares = {}
    for team_id, weight, quota in session.execute(
        select(Team.id, Team.weight, Team.gpu_quota).where(Team.disabled_at.is_(None))
    ):
        shares[team_id] = TeamShare(
            team_id,
            weight,
            quota if quota is not None else settings.default_gpu_quota,
            active.get(team_id, 0),
            float(recent.get(team_id) or 0.0),
        )
    return shares


def admit_ready_stages(session: Session, settings: Settings, report: RoundReport) -> None:
    """Fill free slots: per queue and team, the next few ready stages (an index seek each), then the
    scheduler's order: fair share across teams, priority within a team."""
    in_flight = dict(
        session.execute(
            select(Stage.gpu_class, func.count()).where(Stage.status.in_(ACTIVE)).group_by(Stage.gpu_class)
        ).all()
    )
    free = {queue: slots - in_flight.get(queue, 0) for queue, slots in settings.queue_slots.items()}
    if all(slots <= 0 for slots in free.values()):
        return
    teams = team_shares(session, settings)
    candidates: list[Candidate] = []
    for queue, slots in free.items():
        # Per team, a few more than fit: some may wait on a duplicate key and must not block the rest.
        wanted = {
            team.team_id: 2 * room + 4
            for team in teams.values()
            if (room := min(slots, team.quota - team.active)) > 0
        }
        if wanted:
            candidates += [
                Candidate(stage_id, job_id, team_id, priority, created, order, queue, key)
                for stage_id, job_id, team_id, priority, created, order, key in _next_ready(
                    session, queue, wanted
                )
            ]
    if not candidates:
        return
    keys = [c.stage_key for c in candidates if c.stage_key]
    # A stage whose key another stage has computed meanwhile completes from that result.
    computed = dict(
        session.execute(
            select(Stage.stage_key, Stage.result).where(
                Stage.stage_key.in_(keys), Stage.status.in_([str(s) for s in STAGE_DONE])
            )
        ).all()
    )
    for candidate in [c for c in candidates if c.stage_key in computed]:
        report.cached += complete_cached(session, candidate.stage_id, computed[candidate.stage_key])
    candidates = [c for c in candidates if c.stage_key not in computed]
    busy = set(
        session.scalars(select(Stage.stage_key).where(Stage.status.in_(ACTIVE), Stage.stage_key.in_(keys)))
    )
    chosen = admit(candidates, teams, free, busy)
    report.admitted += admit_stages(session, [(c.stage_id, c.queue) for c in chosen])


# Per team, its next ready stages in a queue: one index seek each, in one statement (LATERAL).
_NEXT_READY_POSTGRES = text(
    f"""
    SELECT s.id, s.job_id, s.team_id, s.priority, s.job_created_at, s."order", s.stage_key
    FROM unnest(CAST(:team_ids AS varchar[]), CAST(:limits AS integer[])) AS wanted(team_id, n)
    CROSS JOIN LATERAL (
        SELECT id, job_id, team_id, priority, job_created_at, "order", stage_key
        FROM stages
        WHERE {STAGE_READY}
          AND stages.gpu_class = :queue AND stages.team_id = wanted.team_id
        ORDER BY priority DESC, job_created_at, job_id, "order"
        LIMIT wanted.n
    ) AS s
    """
)


def _next_ready(session: Session, queue: str, wanted: dict[str, int]) -> list[tuple[Any, ...]]:
    """For each team in ``wanted`` (team id -> how many), its next ready stages on ``queue``."""
    if session.get_bind().dialect.name == "postgresql":
        params = {"team_ids": list(wanted), "limits": list(wanted.values()), "queue": queue}
        return [tuple(row) for row in session.execute(_NEXT_READY_POSTGRES, params)]
    rows: list[tuple[Any, ...]] = []
    for team_id, limit in wanted.items():  # SQLite (the embedded default) has no LATERAL
        rows += session.execute(
            select(
                Stage.id,
                Stage.job_id,
                Stage.team_id,
                Stage.priority,
                Stage.job_created_at,
                Stage.order,
                Stage.stage_key,
            )
            .where(READY, Stage.gpu_class == queue, Stage.team_id == team_id)
            .order_by(Stage.priority.desc(), Stage.job_created_at, Stage.job_id, Stage.order)
            .limit(limit)
        ).all()
    return rows

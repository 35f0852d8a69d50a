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

from sqlalchemy import Row, and_, case, func, or_, select, text, update
from sqlalchemy.orm import Session

from service.db import among
from service.exports import lease_due_exports
from service.lifecycle import (
    admit_stages,
    ask_to_yield,
    complete_cached,
    fail_job,
    finish_stage,
    force_yield,
    lease_control,
    lock_jobs,
    log,
    requeue_lost,
)
from service.limits import STAGE_LIMIT_GRACE_S, stage_time_limit
from service.models import Job, Stage, Team, TeamUsage, Worker, utcnow
from service.scheduler import Candidate, PreemptionRules, RunningStage, TeamShare, admit, preemptions
from service.settings import Settings
from service.states import (
    JOB_FINISH_DUE,
    JOB_PLAN_DUE,
    STAGE_ACTIVE,
    STAGE_DONE,
    STAGE_READY,
    StageStatus,
    YieldReason,
)
from service.workers import DRAIN_BACKSTOP_S, drain_message, live_runtimes, why_no_worker

logger = logging.getLogger(__name__)

# The predicates of service/states.py, as the partial indexes in service/models.py use them: the
# database can then use those indexes.
PLAN_DUE = text(JOB_PLAN_DUE)
FINISH_DUE = text(JOB_FINISH_DUE)
READY = text(STAGE_READY)
ACTIVE = [str(status) for status in STAGE_ACTIVE]
DONE = [str(status) for status in STAGE_DONE]


@dataclass
class RoundReport:
    admitted: list[tuple[str, str]] = field(default_factory=list)  # (stage id, queue)
    resent: list[tuple[str, str]] = field(default_factory=list)  # (stage id, queue): lost, sent again
    plan: list[tuple[str, int]] = field(default_factory=list)  # (job id, lease token): planning to send
    finish: list[tuple[str, int]] = field(default_factory=list)  # (job id, lease token): finishing to send
    exports: list[tuple[str, str]] = field(default_factory=list)  # (export id, token): exports to send
    preempted: list[str] = field(default_factory=list)  # stage ids asked to yield their slot
    failed: int = 0  # jobs failed because their control task was lost too often
    cached: int = 0  # stages completed from a result another stage computed
    time_limits: dict[str, int] = field(default_factory=dict)  # stage id -> its limit in s, to send
    waits: list[tuple[str, float]] = field(default_factory=list)  # (queue, s from job creation) admitted

    def __bool__(self) -> bool:
        return bool(
            self.admitted
            or self.preempted
            or self.resent
            or self.plan
            or self.finish
            or self.exports
            or self.failed
            or self.cached
        )


def dispatch_round(session: Session, settings: Settings) -> RoundReport:
    """One pass. The caller commits, then sends what the report lists."""
    report = RoundReport()
    # The running stages, read once: each rule below takes the rows it is about. A stage an earlier
    # rule moved is skipped by the later ones (and their lifecycle calls are fenced anyway).
    running = running_stages(session)
    moved: set[str] = set()
    recover_lost_stages(session, settings, report, running, moved)
    stop_stages_that_did_not_yield(session, settings, running, moved)
    ask_draining_workers_stages_to_yield(session, running, moved)
    due_control_tasks(session, settings, report)
    report.exports = lease_due_exports(session, settings, settings.dispatch_batch)
    in_flight = admit_ready_stages(session, settings, report)
    if settings.preemption:
        still_running = [row for row in running if row.id not in moved]
        preempt_for_waiting_stages(session, settings, report, still_running, in_flight)
    sent = [stage_id for stage_id, _ in [*report.admitted, *report.resent]]
    report.time_limits = send_time_limits(session, sent, settings)
    return report


def running_stages(session: Session) -> list[Row[Any]]:
    """Every running stage (as many as the slots), with what the round's rules look at."""
    return list(
        session.execute(
            select(
                Stage.id,
                Stage.fence,
                Stage.worker,
                Stage.gpu_class,
                Stage.team_id,
                Stage.priority,
                Stage.started_at,
                Stage.heartbeat_at,
                Stage.deadline_at,
                Stage.time_limit_s,
                Stage.yield_requested_at,
                Stage.last_preempted_at,
            )
            .where(Stage.status == StageStatus.running)
            .order_by(Stage.id)
        ).all()
    )


def recover_lost_stages(
    session: Session,
    settings: Settings,
    report: RoundReport,
    running: list[Row[Any]] | None = None,
    moved: set[str] | None = None,
) -> None:
    """Send again what a fault lost, keeping each stage's slot.

    A running stage whose heartbeat went silent lost its worker (killed, or its machine gone): it is
    requeued, and the new attempt fences the old one out (service/lifecycle.py). A queued stage that
    no worker claimed within a lease of seconds after it was sent (the dispatcher died between its
    commit and the send, or the broker lost the message) is sent again, then every
    ``redeliver_after_s``. A duplicate message is harmless: the claim drops it.
    """
    now = utcnow()
    running = running_stages(session) if running is None else running
    moved = set() if moved is None else moved
    fail_overdue_stages(session, settings, now, running, moved)
    silent_since = now - dt.timedelta(seconds=settings.heartbeat_timeout_s)
    for row in running:
        if row.id in moved or (row.heartbeat_at is not None and _utc(row.heartbeat_at) >= silent_since):
            continue
        moved.add(row.id)
        message = f"no heartbeat from {row.worker} for {settings.heartbeat_timeout_s:.0f} s; requeued"
        if requeue_lost(session, row.id, row.fence, message):
            report.resent.append((row.id, row.gpu_class or "cpu"))
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


def fail_overdue_stages(
    session: Session, settings: Settings, now: dt.datetime, running: list[Row[Any]], moved: set[str]
) -> None:
    """A stage still running well past its deadline (its worker stops it at the deadline; Celery's
    limits kill it soon after) lost its worker or is stuck: it fails, naming its limit, instead of
    being sent again to run as long once more."""
    overdue_since = now - dt.timedelta(seconds=3 * STAGE_LIMIT_GRACE_S)
    for row in running:
        if row.id in moved or row.deadline_at is None or _utc(row.deadline_at) >= overdue_since:
            continue
        moved.add(row.id)
        stage_id, fence, limit_s, worker = row.id, row.fence, row.time_limit_s, row.worker
        message = (
            f"stopped: the stage ran past its time limit of {limit_s} s and {worker} did not end it within "
            f"{3 * STAGE_LIMIT_GRACE_S} s (lost or stuck); give it more time with stage_time_limit_s (up to "
            "your team's limit) or make it shorter"
        )
        finish_stage(
            session, stage_id, StageStatus.failed, fence=fence, store_uri=settings.store_uri, error=message
        )


def stop_stages_that_did_not_yield(
    session: Session, settings: Settings, running: list[Row[Any]], moved: set[str]
) -> None:
    """A stage asked to yield (preempted, drained) that has not within the grace period is stopped and
    waits again; it resumes from its last periodic checkpoint."""
    since = utcnow() - dt.timedelta(seconds=settings.preempt_grace_s)
    for row in running:
        if row.id in moved or row.yield_requested_at is None or _utc(row.yield_requested_at) >= since:
            continue
        moved.add(row.id)
        force_yield(session, row.id, row.fence, settings.preempt_grace_s)


def ask_draining_workers_stages_to_yield(session: Session, running: list[Row[Any]], moved: set[str]) -> None:
    """Stages still running on a worker drained a while ago (``w2s-service drain``) are asked to
    checkpoint and yield: the worker itself asks them within seconds, once it stopped taking work
    (worker/registration.py); this is for a worker that did not."""
    asking = [row for row in running if row.id not in moved and row.yield_requested_at is None]
    if not asking:
        return
    since = utcnow() - dt.timedelta(seconds=DRAIN_BACKSTOP_S)
    drained = set(session.scalars(select(Worker.name).where(Worker.draining_since < since)))
    for row in asking:
        if row.worker in drained:
            moved.add(row.id)
            ask_to_yield(session, row.id, row.fence, YieldReason.drain, drain_message(row.worker))


def preempt_for_waiting_stages(
    session: Session,
    settings: Settings,
    report: RoundReport,
    running_rows: list[Row[Any]],
    in_flight: dict[str, int],
) -> None:
    """Where every slot of a queue is taken and ready stages wait, the scheduler's preemption rules
    (service/scheduler.py) pick running stages to yield; each is asked to, and the stage it yields to
    is admitted now (over the slot count until the victim leaves: the slot goes to it, not to whoever
    the next round would pick). Reads a few rows per team and queue, like the admission, and stops
    after the round's running stages while none has run long enough to be preempted.
    ``in_flight``: stages holding a slot per queue, as the admission left them."""
    full = [q for q, slots in settings.queue_slots.items() if slots > 0 and in_flight.get(q, 0) >= slots]
    if not full:
        return
    now = utcnow()
    rows = [
        row
        for row in running_rows
        if row.gpu_class in full and row.yield_requested_at is None and row.started_at is not None
    ]
    oldest_start = now - dt.timedelta(seconds=settings.preempt_min_run_s)
    if not any(_utc(row.started_at) <= oldest_start for row in rows):
        return  # nothing may be preempted yet
    fences = {row.id: row.fence for row in rows}
    running = [
        RunningStage(
            row.id,
            row.team_id,
            row.priority,
            row.gpu_class,
            _utc(row.started_at),
            _utc(row.last_preempted_at),
        )
        for row in rows
    ]
    teams = team_shares(session, settings)
    waiting = [
        Candidate(stage_id, job_id, team_id, priority, created, order, queue, key)
        for queue in full
        for stage_id, job_id, team_id, priority, created, order, key in _next_ready(
            session, queue, {team_id: 2 for team_id in teams}
        )
    ]
    if not waiting:
        return
    keys = [c.stage_key for c in waiting if c.stage_key]
    taken = set(
        session.scalars(
            select(Stage.stage_key).where(
                among(session, Stage.stage_key, keys), Stage.status.in_([*ACTIVE, *DONE])
            )
        )
    )
    waiting = _runnable_somewhere(session, [c for c in waiting if c.stage_key not in taken])
    rules = PreemptionRules(settings.preempt_min_run_s, settings.preempt_window_s)
    for chosen in preemptions(waiting, running, teams, settings.queue_slots, now, rules):
        victim = chosen.victim
        if ask_to_yield(
            session, victim.stage_id, fences[victim.stage_id], YieldReason.preempt, chosen.reason
        ):
            report.preempted.append(victim.stage_id)
            report.admitted += admit_stages(session, [(chosen.for_stage.stage_id, chosen.for_stage.queue)])


def _utc(moment: dt.datetime | None) -> Any:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def send_time_limits(session: Session, stage_ids: list[str], settings: Settings) -> dict[str, int]:
    """Each stage's time limit as its task is sent (Celery's soft and hard limits follow from it):
    the job's, capped by its team's, as the claim will compute it."""
    if not stage_ids:
        return {}
    rows = session.execute(
        select(Stage.id, Job.stage_time_limit_s, Team.stage_time_limit_s)
        .join(Job, Job.id == Stage.job_id)
        .join(Team, Team.id == Job.team_id)
        .where(Stage.id.in_(stage_ids))
    ).all()
    return {
        stage_id: stage_time_limit(job_limit, team_limit, settings.stage_time_limit_s).seconds
        for stage_id, job_limit, team_limit in rows
    }


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
        # Per team with due jobs: whether one of its tasks is out, and its oldest job waiting for one.
        teams = session.execute(
            select(Job.team_id, func.max(case((free, 0), else_=1)), func.min(case((free, Job.created_at))))
            .where(due)
            .group_by(Job.team_id)
        ).all()
        chosen = [  # the team waiting longest first
            team_id for oldest, team_id in sorted((o, t) for t, out, o in teams if not out and o is not None)
        ]
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


def admit_ready_stages(session: Session, settings: Settings, report: RoundReport) -> dict[str, int]:
    """Fill free slots: per queue and team, the next few ready stages (an index seek each), then the
    scheduler's order: fair share across teams, priority within a team. Returns the stages holding a
    slot per queue once these are admitted."""
    in_flight: dict[str, int] = dict(
        session.execute(
            select(Stage.gpu_class, func.count()).where(Stage.status.in_(ACTIVE)).group_by(Stage.gpu_class)
        ).all()
    )
    free = {queue: slots - in_flight.get(queue, 0) for queue, slots in settings.queue_slots.items()}
    if all(slots <= 0 for slots in free.values()):
        return in_flight
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
        return in_flight
    keys = {c.stage_key for c in candidates if c.stage_key}
    # One read for the candidates' keys: a stage whose key another stage has computed meanwhile
    # completes from that result; one whose key another stage is computing now waits (busy).
    computed: dict[str, Any] = {}
    busy: set[str] = set()
    for key, status, result in session.execute(
        select(Stage.stage_key, Stage.status, Stage.result).where(
            among(session, Stage.stage_key, keys), Stage.status.in_([*DONE, *ACTIVE])
        )
    ):
        if status not in DONE:
            busy.add(key)
        elif not (result or {}).get("checkpoint_removed"):  # weights asked for and removed: it runs
            computed[key] = result
    for candidate in [c for c in candidates if c.stage_key in computed]:
        report.cached += complete_cached(
            session, candidate.stage_id, computed[candidate.stage_key], settings.store_uri
        )
    candidates = [c for c in candidates if c.stage_key not in computed]
    candidates = _runnable_somewhere(session, candidates)
    chosen = admit(candidates, teams, free, busy)
    admitted = admit_stages(session, [(c.stage_id, c.queue) for c in chosen])
    report.admitted += admitted
    created = {c.stage_id: c.created_at for c in chosen}
    now = utcnow()
    for stage_id, queue in admitted:
        at = created[stage_id] if created[stage_id].tzinfo else created[stage_id].replace(tzinfo=dt.UTC)
        report.waits.append((queue, (now - at).total_seconds()))
        in_flight[queue] = in_flight.get(queue, 0) + 1
    return in_flight


def _runnable_somewhere(session: Session, candidates: list[Candidate]) -> list[Candidate]:
    """The candidates some live worker on their queue can run: one whose runtime (library versions
    and code, which stage keys hash) is the planner's. A queue with no registered worker is trusted.
    A stage left out says why on its row (once), and waits for such a worker."""
    workers = live_runtimes(session, {c.queue for c in candidates})
    if not workers:
        return candidates
    runtimes = dict(
        session.execute(
            select(Job.id, Job.runtime).where(among(session, Job.id, {c.job_id for c in candidates}))
        ).all()
    )
    runnable, blocked = [], []
    for candidate in candidates:
        known = workers.get(candidate.queue)
        runtime = runtimes.get(candidate.job_id)
        if known is None or runtime is None or runtime in known:
            runnable.append(candidate)
        else:
            blocked.append(candidate)
    for candidate in blocked:
        summary = session.scalar(select(Job.data_summary).where(Job.id == candidate.job_id)) or {}
        message = why_no_worker(candidate.queue, summary.get("runtime"), workers[candidate.queue])
        said = session.execute(
            update(Stage)
            .where(Stage.id == candidate.stage_id, or_(Stage.error.is_(None), Stage.error != message))
            .values(error=message)
            .returning(Stage.job_id, Stage.kind, Stage.seed)
        ).first()
        if said is not None:
            log(
                session,
                job_id=said[0],
                stage_id=candidate.stage_id,
                message=f"{said[1]}/{said[2]}: {message}",
                level="warning",
            )
    return runnable


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


def ready_per_queue(session: Session) -> dict[str, int]:
    """Stages ready and waiting for a slot, per queue (the partial index on ready stages)."""
    return {
        queue or "unplanned": count
        for queue, count in session.execute(
            select(Stage.gpu_class, func.count()).where(READY).group_by(Stage.gpu_class)
        )
    }

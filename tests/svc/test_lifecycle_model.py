"""A model-based test of the lifecycle against the real Postgres: Hypothesis interleaves what clients,
the dispatcher, control tasks, workers and faults do, in any order, and checks after every step what
must always hold.

Actions: submit a job, run a dispatch round, deliver a sent message (a stage to a worker, a planning
or finishing task), lose or duplicate a message, an attempt's heartbeat, its outcome (success, a
transient error, a permanent error, a yield when it was asked to: preempted or drained) or its
worker's death, cancel, retry, drain a worker, and time passing (leases, heartbeats and grace
periods lapse). Team b weighs 3 to team a's 1 and jobs of one spec have a higher priority, so stages
are preempted across teams and within one. Stages do no training: an attempt's outcome is written
through the same lifecycle calls a worker makes, with a stored result of the right size.

After every step: at most one current attempt per stage; counts derived from rows match the rows;
every open job has something due or in flight; the operators' doctor finds nothing wedged; no team
has more stages in flight than its quota and no queue more than its slots (a stage asked to yield
is on its way out: the one that preempts it is admitted in its place). At the end, with faults
stopped and time allowed to pass, every job ends; every failed or cancelled job, retried, succeeds.

Every failure it finds is to stay as a plain test: tests/svc/test_lifecycle_cases.py holds the
cases found by hand before this lifecycle (each wedged a job). This test found one once preemption
was in it: a stage asked to yield that failed transiently or lost its worker went back to queued,
holding the slot its preemptor had been given (tests/svc/test_preemption.py keeps the case). Budget:
12 x 25 steps in the fast tier, 40 x 50 randomised in the slow tier.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select, text

from service import dispatch, doctor, jobs, lifecycle, planning, workers
from service.db import get_engine, reset_caches, session_scope
from service.models import Base, Job, Stage, StageEvent, Team
from service.settings import get_settings
from service.states import JOB_OPEN, STAGE_ACTIVE, STAGE_DONE, InvalidTransition, StageStatus
from service.workers import drain_worker, register_worker
from svc_support import tiny_job
from w2s.stages import runtime_id
from w2s.store import ArtifactStore
from worker import control, tasks

WORKERS = ("w1", "w2", "w3")
OPEN = [str(status) for status in JOB_OPEN]
DONE = [str(status) for status in STAGE_DONE]
ACTIVE = [str(status) for status in STAGE_ACTIVE]
QUOTA_A = 2  # team a's stages in flight; team b has the default
# How an attempt ends: mostly well, sometimes a fault; "beat" is a heartbeat, and the attempt goes on.
# "yield": the worker honours a request to yield (preempted, drained): its checkpoint written, the
# stage waits again; an attempt not asked to yield just beats.
OUTCOMES = st.sampled_from(
    ["succeeded", "succeeded", "succeeded", "transient", "failed", "crash", "beat", "yield"]
)


class Clock:
    """The service's clock, moved by the test alone: leases and heartbeats lapse when it says so,
    and a run replays exactly (Hypothesis replays runs to shrink them)."""

    START = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)

    def __init__(self) -> None:
        self.offset = dt.timedelta(0)

    def __call__(self) -> dt.datetime:
        return self.START + self.offset


@dataclasses.dataclass
class Attempt:
    stage_id: str
    fence: int
    worker: str


def pick(data: st.DataObject, items: list[Any]) -> Any:
    """One of ``items``, drawn so that the draw does not depend on how many there are (what the
    database did decides that, and a replayed run must draw the same)."""
    return items[data.draw(st.integers(0, 63)) % len(items)]


class LifecycleMachine(RuleBasedStateMachine):
    """One run: two teams on a fresh database, a broker that is a list, workers that are names."""

    specs: ClassVar[list[dict[str, Any]]] = []  # set by the test: job bodies to submit
    # What the runs got to (preemptions asked, yields, stages stopped after the grace): a run that
    # never preempts proves nothing about preemption.
    seen: ClassVar[dict[str, int]] = {}

    def __init__(self) -> None:
        super().__init__()
        with get_engine().begin() as connection:
            tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
            connection.execute(text(f"TRUNCATE {tables} CASCADE"))
        self.settings = get_settings()
        self.store = ArtifactStore(self.settings.store_uri)
        self.broker: list[tuple[Any, ...]] = []
        self.attempts: dict[int, Attempt] = {}  # by a counter: attempts whose worker is still running them
        self.next_attempt = 0
        self.jobs: list[str] = []
        self.faults = True
        CLOCK.offset = dt.timedelta(0)
        IDS.reset()
        with session_scope() as session:
            self.teams = []
            for name, quota, weight in (("a", QUOTA_A, 1.0), ("b", None, 3.0)):
                # Fixed ids: fair share breaks ties by team id, and a replayed run must choose alike.
                team = Team(id=name * 32, name=f"team-{name}", gpu_quota=quota, weight=weight)
                session.add(team)
                session.flush()
                self.teams.append(team.id)

    # -- clients --------------------------------------------------------------------------------

    @initialize()
    def both_teams_submit(self) -> None:
        """Each team has a job from the start: runs reach contention for slots (and preemption) in
        few steps."""
        self.submit(0, 0)
        self.submit(1, 1)

    @rule(team=st.integers(0, 1), spec=st.integers(0, 1))
    def submit(self, team: int, spec: int) -> None:
        if len(self.jobs) >= 4:
            return
        with session_scope() as session:
            owner = session.get(Team, self.teams[team])
            # Each team its own seed: another team's identical stage would wait for the running one
            # (one key computed once), never compete for a slot; within a team keys repeat.
            raw = self.specs[spec] | {"seeds": [team]}
            resolved = jobs.resolve_spec(session, team=owner, raw=raw, settings=self.settings)
            job, _ = jobs.create_job(
                session, team=owner, resolved=resolved, settings=self.settings, priority=5 * spec
            )
            self.jobs.append(job.id)

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job_id = pick(data, self.jobs)
        try:
            with session_scope() as session:
                lifecycle.cancel_job(session, job_id, by="model")
        except InvalidTransition:
            pass

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        job_id = pick(data, self.jobs)
        try:
            with session_scope() as session:
                lifecycle.retry_job(session, job_id)
        except InvalidTransition:
            pass

    # -- the dispatcher and the broker ----------------------------------------------------------

    @rule()
    def dispatch_round(self) -> None:
        with session_scope() as session:
            report = dispatch.dispatch_round(session, self.settings)
        self.count("preempted", len(report.preempted))
        self.broker += [("stage", stage_id) for stage_id, _ in [*report.admitted, *report.resent]]
        self.broker += [("plan", job_id, token) for job_id, token in report.plan]
        self.broker += [("finish", job_id, token) for job_id, token in report.finish]

    @rule(data=st.data())
    def busy_cluster(self, data: st.DataObject) -> None:
        """A round, then every message delivered, and every attempt ends as drawn: what a cluster
        does between two of the finer steps, so that runs get far in few steps."""
        self.dispatch_round()
        while self.broker:
            worker = next((w for w in WORKERS if all(a.worker != w for a in self.attempts.values())), None)
            if worker is None:
                break
            self.handle(self.broker.pop(0), worker)
        outcomes = data.draw(st.lists(OUTCOMES, min_size=len(WORKERS), max_size=len(WORKERS)))
        for number, outcome in zip(sorted(self.attempts), outcomes, strict=False):
            self.attempt_number(number, outcome)

    @precondition(lambda self: self.broker)
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        message = pick(data, self.broker)
        self.broker.remove(message)
        self.handle(message, data.draw(st.sampled_from(WORKERS)))

    @precondition(lambda self: self.broker and self.faults)
    @rule(data=st.data(), duplicate=st.booleans())
    def lose_or_duplicate(self, data: st.DataObject, duplicate: bool) -> None:
        message = pick(data, self.broker)
        if duplicate:
            self.broker.append(message)
        else:
            self.broker.remove(message)

    def handle(self, message: tuple[Any, ...], worker: str) -> None:
        if message[0] == "plan":
            control.run_control("plan", message[1], message[2], planning.plan_job, 60.0)
        elif message[0] == "finish":
            control.run_control("finish", message[1], message[2], planning.finish_job, 60.0)
        else:
            if any(a.worker == worker for a in self.attempts.values()):
                self.broker.append(message)  # this worker is busy: the message waits its turn
                return
            claim = tasks.claim_stage(message[1], worker, self.settings)
            if claim is not None:
                self.attempts[self.next_attempt] = Attempt(message[1], claim.fence, worker)
                self.next_attempt += 1

    # -- workers --------------------------------------------------------------------------------

    @precondition(lambda self: self.attempts)
    @rule(data=st.data(), outcome=OUTCOMES)
    def attempt(self, data: st.DataObject, outcome: str) -> None:
        self.attempt_number(pick(data, sorted(self.attempts)), outcome)

    def attempt_number(self, number: int, outcome: str) -> None:
        attempt = self.attempts[number]
        if outcome in ("transient", "failed", "crash") and not self.faults:
            outcome = "succeeded"
        if outcome in ("yield", "beat"):
            # A heartbeat of an attempt asked to yield is where it learns so: it yields at its next step.
            with session_scope() as session:
                asked = session.scalar(
                    select(Stage.yield_requested_at).where(
                        Stage.id == attempt.stage_id, Stage.fence == attempt.fence
                    )
                )
            outcome = "beat" if asked is None else "yield"
        if outcome == "beat":
            tasks.ProgressWriter(attempt.stage_id, 0.0, attempt.fence)._write()
            return
        del self.attempts[number]
        if outcome == "crash":
            return  # the worker died: nothing is written; the heartbeat lapses
        if outcome == "yield":
            self.count("yielded")
            tasks.persist_yield(attempt.stage_id, fence=attempt.fence, step=3, settings=self.settings)
            return
        with session_scope() as session:
            if outcome == "succeeded":
                record = self.result_of(session, attempt.stage_id)
                if record is not None:
                    lifecycle.finish_stage(
                        session,
                        attempt.stage_id,
                        StageStatus.succeeded,
                        fence=attempt.fence,
                        store_uri=self.store.uri,
                        record=record,
                    )
            elif outcome == "transient":
                due = lifecycle.utcnow()
                lifecycle.requeue_after_error(session, attempt.stage_id, attempt.fence, "OSError: flaky", due)
                self.broker.append(("stage", attempt.stage_id))  # Celery's retry of the task
            else:
                lifecycle.finish_stage(
                    session,
                    attempt.stage_id,
                    StageStatus.failed,
                    fence=attempt.fence,
                    store_uri=self.store.uri,
                    error="ValueError: bad input",
                )

    def count(self, what: str, n: int = 1) -> None:
        LifecycleMachine.seen[what] = LifecycleMachine.seen.get(what, 0) + n

    def result_of(self, session: Any, stage_id: str) -> dict[str, Any] | None:
        """What a worker stores for the stage's planned key: a result of the right shape."""
        key, plan = session.execute(select(Stage.stage_key, Stage.plan).where(Stage.id == stage_id)).one()
        if key is None or plan is None:
            return None
        probs = self.store.put_array(np.full(plan["test"]["n"], 0.6))
        labels = self.store.put_array(np.full(plan["predict"]["n"], 0.7)) if plan.get("predict") else None
        record = {"key": key, "accuracy": 0.5, "auroc": 0.5, "test_probs": probs, "soft_labels": labels}
        return record | {"seconds": 0.1, "train_seconds": 0.1, "steps": 1, "kind": plan["kind"]}

    @rule(worker=st.sampled_from(WORKERS))
    def drain(self, worker: str) -> None:
        """An operator drains a worker (its stages are asked to yield), and a new process under its name
        takes work again at once (the model's workers never stop)."""
        with session_scope() as session:
            register_worker(session, name=worker, queues=["cpu"], runtime=runtime_id(), versions={})
        with session_scope() as session:
            drain_worker(session, worker)
        with session_scope() as session:
            register_worker(session, name=worker, queues=["cpu"], runtime=runtime_id(), versions={})

    @rule(seconds=st.sampled_from([1, 20, 200]))
    def time_passes(self, seconds: int) -> None:
        CLOCK.offset += dt.timedelta(seconds=seconds)

    # -- what must always hold ------------------------------------------------------------------

    @invariant()
    def one_current_attempt_per_stage(self) -> None:
        with session_scope() as session:
            current = dict(
                session.execute(
                    select(Stage.id, Stage.fence).where(Stage.status == StageStatus.running)
                ).all()
            )
        holders: dict[str, int] = {}
        for attempt in self.attempts.values():
            if current.get(attempt.stage_id) == attempt.fence:
                holders[attempt.stage_id] = holders.get(attempt.stage_id, 0) + 1
        assert all(count == 1 for count in holders.values()), holders

    @invariant()
    def derived_counts_match_the_rows(self) -> None:
        with session_scope() as session:
            for job_id, left in session.execute(select(Job.id, Job.stages_left)).all():
                actual = session.scalar(
                    select(func.count()).where(Stage.job_id == job_id, Stage.status.not_in(DONE))
                )
                assert left == actual, (job_id, left, actual)
            ready = session.execute(
                select(
                    Stage.id, Stage.ready, Stage.stage_key, Stage.depends_on_id, Stage.features_from_id
                ).where(Stage.status == StageStatus.pending)
            ).all()
            done = set(session.scalars(select(Stage.id).where(Stage.status.in_(DONE))))
            for stage_id, flag, key, depends_on, features_from in ready:
                expected = key is not None and all(
                    d is None or d in done for d in (depends_on, features_from)
                )
                assert flag == expected, (stage_id, flag, expected)

    @invariant()
    def every_open_job_has_something_due_or_in_flight(self) -> None:
        with session_scope() as session:
            for job_id, planned, left in session.execute(
                select(Job.id, Job.planned, Job.stages_left).where(Job.status.in_(OPEN))
            ).all():
                if not planned or left == 0:
                    continue  # planning or finishing is due (or leased)
                moving = session.scalar(
                    select(func.count()).where(
                        Stage.job_id == job_id,
                        (Stage.status.in_(ACTIVE)) | ((Stage.status == StageStatus.pending) & Stage.ready),
                    )
                )
                assert moving, f"job {job_id} is open with {left} stages left and nothing due or in flight"
                failed = session.scalar(
                    select(func.count()).where(Stage.job_id == job_id, Stage.status == StageStatus.failed)
                )
                assert not failed, f"job {job_id} is open with a failed stage"

    @invariant()
    def the_doctor_finds_nothing_wedged(self) -> None:
        """The operators' check (service/doctor.py) agrees: no job breaks an invariant no round can
        repair. (Overdue work is expected here: the test decides when rounds run.)"""
        with session_scope() as session:
            result = doctor.checkup(session, self.settings)
        wedged = [finding for finding in result.findings if finding.wedged]
        assert not wedged, wedged

    @invariant()
    def quotas_and_slots_hold(self) -> None:
        # A stage asked to yield is leaving: the stage preempting it was admitted in its place (and
        # runs once the leaving one's worker is free), so it counts for neither its team nor its queue.
        with session_scope() as session:
            per_team = dict(
                session.execute(
                    select(Stage.team_id, func.count())
                    .where(Stage.status.in_(ACTIVE), Stage.yield_requested_at.is_(None))
                    .group_by(Stage.team_id)
                ).all()
            )
            per_queue = dict(
                session.execute(
                    select(Stage.gpu_class, func.count())
                    .where(Stage.status.in_(ACTIVE), Stage.yield_requested_at.is_(None))
                    .group_by(Stage.gpu_class)
                ).all()
            )
        assert per_team.get(self.teams[0], 0) <= QUOTA_A
        for queue, count in per_queue.items():
            assert count <= self.settings.queue_slots.get(queue or "cpu", 0), (queue, count)

    # -- the end: faults stop, time passes, everything ends; retried failures succeed ----------

    def teardown(self) -> None:
        with session_scope() as session:
            for kind, n in session.execute(
                select(StageEvent.kind, func.count()).group_by(StageEvent.kind)
            ).all():
                self.count(f"event:{kind}", n)
        try:
            self.faults = False
            self.settle()
            with session_scope() as session:
                statuses = dict(
                    session.execute(select(Job.id, Job.status).where(Job.id.in_(self.jobs))).all()
                )
            assert all(status in ("succeeded", "failed", "cancelled") for status in statuses.values()), (
                statuses
            )
            for job_id, status in statuses.items():
                if status != "succeeded":
                    with session_scope() as session:
                        lifecycle.retry_job(session, job_id)
            self.settle()
            with session_scope() as session:
                statuses = dict(
                    session.execute(select(Job.id, Job.status).where(Job.id.in_(self.jobs))).all()
                )
            assert all(status == "succeeded" for status in statuses.values()), statuses
        finally:
            CLOCK.offset = dt.timedelta(0)

    def succeed_all(self) -> None:
        """Every attempt in flight reports success."""
        for number in sorted(self.attempts):
            attempt = self.attempts.pop(number)
            with session_scope() as session:
                record = self.result_of(session, attempt.stage_id)
                if record is not None:
                    lifecycle.finish_stage(
                        session,
                        attempt.stage_id,
                        StageStatus.succeeded,
                        fence=attempt.fence,
                        store_uri=self.store.uri,
                        record=record,
                    )

    def settle(self, rounds: int = 60) -> None:
        """Without faults, rounds, deliveries and successes until no job is open (or ``rounds``)."""
        for _ in range(rounds):
            CLOCK.offset += dt.timedelta(seconds=300)  # every lease and heartbeat lapses
            self.succeed_all()
            self.dispatch_round()
            while self.broker:
                self.handle(self.broker.pop(0), WORKERS[0])
                self.succeed_all()
            with session_scope() as session:
                still_open = session.scalar(
                    select(func.count()).where(Job.id.in_(self.jobs), Job.status.in_(OPEN))
                )
            if not still_open:
                return


class Ids:
    """Ids in order of creation: the service orders by id in places (locks, ties), and a replayed
    run must see the same order."""

    def __init__(self) -> None:
        self.next = 0

    def reset(self) -> None:
        self.next = 0

    def __call__(self) -> str:
        self.next += 1
        return f"{self.next:032x}"


CLOCK = Clock()
IDS = Ids()


@pytest.fixture
def model_env(service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tiny_bert: Path) -> None:
    monkeypatch.setenv("W2S_QUEUE_SLOTS", '{"cpu": 2}')
    monkeypatch.setenv("W2S_PREEMPT_MIN_RUN_S", "0")  # the rule itself: tests/test_scheduler.py
    monkeypatch.setenv("W2S_PREEMPT_WINDOW_S", "100")
    reset_caches()
    for module in (lifecycle, dispatch, tasks, planning, jobs, doctor, workers):
        monkeypatch.setattr(module, "utcnow", CLOCK)
    monkeypatch.setattr(jobs, "new_id", IDS)
    two_losses = tiny_job(tiny_bert, tiny_bert, losses=["xent", "logconf"])
    two_losses["weak"]["mode"] = "probe"
    LifecycleMachine.specs = [tiny_job(tiny_bert, tiny_bert), two_losses]


def run_model(examples: int, steps: int, derandomize: bool) -> None:
    LifecycleMachine.seen = {}
    run_state_machine_as_test(
        LifecycleMachine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            derandomize=derandomize,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )


def test_no_interleaving_wedges_a_job(model_env: None) -> None:
    """A short budget: the fast tier runs the same examples every time."""
    run_model(examples=12, steps=25, derandomize=True)
    print("reached:", LifecycleMachine.seen)


@pytest.mark.slow
def test_no_interleaving_wedges_a_job_long_run(model_env: None) -> None:
    """A longer, randomised search in the slow tier."""
    run_model(examples=40, steps=50, derandomize=False)
    print("reached:", LifecycleMachine.seen)
    # Preemption is among what the long search explores, not just possible in it.
    assert LifecycleMachine.seen.get("preempted"), LifecycleMachine.seen

"""Preemption, yield and drain in the service's rows, against the real Postgres, with the dispatcher's
rounds and the worker's writes run in this process: who is asked to yield and for whom, what a yield
does to the stage (waiting again, attempt given back, time charged, events), the grace period, and a
drain. tests/svc/test_preemption_live.py runs the same with real worker processes."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from service import admin, lifecycle
from service.db import reset_caches, session_scope
from service.errors import NotFound
from service.models import (
    Artifact,
    LogLine,
    MetricPoint,
    MetricSeries,
    Stage,
    StageEvent,
    TeamUsage,
    Worker,
    utcnow,
)
from service.settings import get_settings
from service.states import StageEventKind, StageStatus, YieldReason
from service.storage import RESUME
from service.workers import DRAIN_BACKSTOP_S, register_worker
from svc_support import Steps, login, tiny_job
from w2s.stages import runtime_id
from worker import tasks
from worker.control import plan_job_task


@pytest.fixture
def one_slot(service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("W2S_QUEUE_SLOTS", '{"cpu": 1}')
    monkeypatch.setenv("W2S_PREEMPT_MIN_RUN_S", "0")
    monkeypatch.setenv("W2S_PREEMPT_GRACE_S", "30")
    reset_caches()
    return service_env


def submit(client: TestClient, team: Any, body: dict[str, Any]) -> str:
    response = client.post("/v1/jobs", json=body, headers=team.headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def planned_round(steps: Steps) -> Any:
    """A round, its planning run, and the round after."""
    report = steps.round()
    for job_id, token in report.plan:
        plan_job_task(job_id, token)
    return steps.round() if report.plan else report


def stage(job_id: str, kind: str) -> Stage:
    with session_scope() as session:
        row = session.scalars(select(Stage).where(Stage.job_id == job_id, Stage.kind == kind)).one()
        session.expunge(row)
        return row


def events(stage_id: str) -> list[tuple[str, int | None]]:
    with session_scope() as session:
        rows = session.execute(
            select(StageEvent.kind, StageEvent.step)
            .where(StageEvent.stage_id == stage_id)
            .order_by(StageEvent.id)
        ).all()
    return [(kind, step) for kind, step in rows]


def running_weak(client: TestClient, team: Any, tiny_bert: Path, worker: str = "worker-a") -> tuple[str, Any]:
    """A job of ``team`` whose weak stage holds the only slot, claimed by ``worker``."""
    job_id = submit(client, team, tiny_job(tiny_bert, tiny_bert))
    report = planned_round(Steps())
    weak = stage(job_id, "weak")
    assert (weak.id, "cpu") in report.admitted
    claim = tasks.claim_stage(weak.id, worker, get_settings())
    assert claim is not None
    return job_id, claim


def test_a_team_below_its_share_gets_the_slot_of_a_borrowing_team(
    one_slot: dict[str, str], client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    borrower, owner = make_team(weight=1.0), make_team(weight=3.0)  # owner's share: 3/4 of the slot
    borrowed_job, claim = running_weak(client, borrower, tiny_bert)
    owners_job = submit(client, owner, tiny_job(tiny_bert, tiny_bert, seeds=[1]))
    report = planned_round(Steps())
    owners_weak = stage(owners_job, "weak")
    assert report.preempted == [claim.stage_id]
    assert (owners_weak.id, "cpu") in report.admitted  # admitted now: the slot is promised to it
    assert stage(borrowed_job, "weak").yield_requested_at is not None
    assert events(claim.stage_id) == [(StageEventKind.preempt_asked, 0)]
    # Until the victim yields, no round asks again or admits anything else.
    again = Steps().round()
    assert again.preempted == [] and again.admitted == []

    # The worker wrote its checkpoint at step 3 and yielded.
    time.sleep(0.05)
    tasks.persist_yield(claim.stage_id, fence=claim.fence, step=3, settings=get_settings())
    yielded = stage(borrowed_job, "weak")
    assert yielded.status == StageStatus.pending and yielded.attempts == 0  # its attempt given back
    assert (yielded.preemptions, yielded.checkpoint_step, yielded.yield_requested_at) == (1, 3, None)
    assert yielded.gpu_seconds > 0  # the time it ran is charged, to the stage and its team
    with session_scope() as session:
        charged = session.scalar(select(TeamUsage.gpu_seconds).where(TeamUsage.team_id == borrower.team_id))
    assert charged == pytest.approx(yielded.gpu_seconds)
    assert [kind for kind, _ in events(claim.stage_id)] == [
        StageEventKind.preempt_asked,
        StageEventKind.yielded,
    ]
    # Its old attempt's late outcome changes nothing.
    tasks.persist_outcome(
        claim.stage_id, StageStatus.failed, fence=claim.fence, error="late", settings=get_settings()
    )
    assert stage(borrowed_job, "weak").status == StageStatus.pending
    # The owner's stage runs; the borrower's waits (the slot is taken) and then resumes.
    assert Steps().round().admitted == []
    api = client.get(f"/v1/jobs/{borrowed_job}", headers=borrower.headers).json()
    weak = next(s for s in api["stages"] if s["kind"] == "weak")
    assert (weak["preemptions"], weak["checkpoint_step"]) == (1, 3)
    assert [e["kind"] for e in weak["events"]] == ["preempt_asked", "yielded"]
    # The job page marks the ask and the yield on the stage's timeline, and says where it resumes.
    assert login(client, borrower.key).status_code == 303
    page = client.get(f"/jobs/{borrowed_job}").text
    assert 'class="gantt-mark mark-asked"' in page and 'class="gantt-mark mark-yielded"' in page
    assert "preempted 1× · last checkpoint at step 3" in page
    usage = client.get("/v1/teams/me/usage", headers=borrower.headers).json()
    assert usage["preemptions_window"] == 1
    admins = client.get("/v1/admin/teams", headers={"Authorization": f"Bearer {one_slot['W2S_ADMIN_KEY']}"})
    counts = {team["id"]: team["preemptions_window"] for team in admins.json()}
    assert (counts[borrower.team_id], counts[owner.team_id]) == (1, 0)


def test_the_same_weight_in_one_slot_preempts_nobody(
    one_slot: dict[str, str], client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    first, second = make_team(), make_team()
    running_weak(client, first, tiny_bert)
    submit(client, second, tiny_job(tiny_bert, tiny_bert, seeds=[1]))
    assert planned_round(Steps()).preempted == []  # swapping would only invert who waits


def test_a_higher_priority_job_preempts_its_own_teams_lower_priority_stage(
    one_slot: dict[str, str], client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    _, claim = running_weak(client, team, tiny_bert)
    urgent = submit(client, team, tiny_job(tiny_bert, tiny_bert, seeds=[1], priority=5))
    report = planned_round(Steps())
    assert report.preempted == [claim.stage_id]
    assert (stage(urgent, "weak").id, "cpu") in report.admitted
    with session_scope() as session:
        said = session.scalars(select(LogLine.message).where(LogLine.stage_id == claim.stage_id)).all()
    assert any("priority 5 (this job's is 0)" in line for line in said), said
    # The same priority preempts nothing.
    submit(client, team, tiny_job(tiny_bert, tiny_bert, seeds=[2], priority=0))
    assert planned_round(Steps()).preempted == []


def test_a_stage_that_does_not_yield_within_the_grace_period_is_stopped_and_waits(
    one_slot: dict[str, str], client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    job_id, claim = running_weak(client, make_team(), tiny_bert)
    with session_scope() as session:
        assert lifecycle.ask_to_yield(session, claim.stage_id, claim.fence, YieldReason.preempt, "test")
        session.execute(
            update(Stage)
            .where(Stage.id == claim.stage_id)
            .values(yield_requested_at=utcnow() - dt.timedelta(seconds=31), checkpoint_step=7)
        )
    Steps().round()  # stops it; the slot is free again, so the same round admits it again
    stopped = stage(job_id, "weak")
    assert stopped.status == StageStatus.queued and stopped.fence == claim.fence + 1
    assert stopped.checkpoint_step == 7  # it resumes from its last periodic checkpoint
    assert [kind for kind, _ in events(claim.stage_id)][-1] == StageEventKind.forced
    # The stuck attempt's heartbeat sees it no longer owns the stage, and its outcome is discarded.
    tasks.persist_outcome(claim.stage_id, StageStatus.succeeded, fence=claim.fence, settings=get_settings())
    assert stage(job_id, "weak").status == StageStatus.queued


def test_drain_asks_the_workers_running_stages_to_yield_and_names_live_workers_when_unknown(
    service_env: dict[str, str], client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    with session_scope() as session:
        register_worker(session, name="cpu-1@host-a", queues=["cpu"], runtime=runtime_id(), versions={})
    job_id, claim = running_weak(client, make_team(), tiny_bert, worker="cpu-1@host-a")
    with session_scope() as session:
        # The operator's drain marks the worker; the worker sees it, stops taking work, then asks its
        # own stages (worker/registration.py), so none comes straight back to it.
        assert admin.drain_worker(session, name="cpu-1@host-a") == []
    Steps().round()
    assert stage(job_id, "weak").yield_requested_at is None
    # A worker that has not done so within DRAIN_BACKSTOP_S has its stages asked by the dispatcher.
    with session_scope() as session:
        session.execute(
            update(Worker)
            .where(Worker.name == "cpu-1@host-a")
            .values(draining_since=utcnow() - dt.timedelta(seconds=DRAIN_BACKSTOP_S + 1))
        )
    Steps().round()
    assert stage(job_id, "weak").yield_requested_at is not None
    assert [kind for kind, _ in events(claim.stage_id)] == [StageEventKind.drain_asked]
    with pytest.raises(NotFound, match="live workers: cpu-1@host-a"), session_scope() as session:
        admin.drain_worker(session, name="cpu-9@nowhere")
    tasks.persist_yield(claim.stage_id, fence=claim.fence, step=0, settings=get_settings())
    drained = stage(job_id, "weak")
    assert drained.status == StageStatus.pending and drained.preemptions == 0  # a drain is no preemption


def test_a_stage_asked_to_yield_mid_training_resumes_and_the_job_matches_an_uninterrupted_one(
    one_slot: dict[str, str], client: TestClient, make_team, tiny_bert: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The whole worker path in this process: the flag is seen at a progress write, the training loop
    writes a checkpoint and yields, the stage waits, a new attempt resumes from it; the job's results
    are the library's for the same spec, run without interruption."""
    from test_faults import figures, reference_results

    team = make_team()
    body = tiny_job(tiny_bert, tiny_bert)
    # 160 steps: the request is seen at a progress write (every 0.2 s here), long before the last step.
    body["weak"] |= {"epochs": 40, "batch_size": 8, "train_dropout": True}
    job_id = submit(client, team, body)
    weak = next(stage_id for stage_id, _ in planned_round(Steps()).admitted)

    def ask_when_training() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = stage(job_id, "weak")
            if row.status == StageStatus.running and row.step >= 5:
                with session_scope() as session:
                    lifecycle.ask_to_yield(session, weak, row.fence, YieldReason.preempt, "test preemption")
                return
            time.sleep(0.05)

    asker = threading.Thread(target=ask_when_training)
    asker.start()
    assert tasks.execute_stage(weak, worker="in-process", settings=get_settings(), isolate=False) == "pending"
    asker.join()
    yielded = stage(job_id, "weak")
    assert yielded.status == StageStatus.pending and yielded.checkpoint_step and yielded.checkpoint_step >= 5
    # The checkpoint is the team's storage until the stage's result is stored.
    resume = (Artifact.stage_key == yielded.stage_key, Artifact.name == RESUME)
    with session_scope() as session:
        charged = session.execute(select(Artifact.team_id, Artifact.size_bytes).where(*resume)).one()
    assert charged.team_id == team.team_id and charged.size_bytes > 0
    held = client.get("/v1/teams/me/usage", headers=team.headers).json()["storage"]
    assert held["checkpoints_bytes"] >= charged.size_bytes
    result = Steps().run(job_id)
    assert result["status"] == "succeeded"
    with session_scope() as session:
        assert session.execute(select(Artifact.stage_key).where(*resume)).first() is None
    kinds = [(kind, step) for kind, step in events(weak) if kind != StageEventKind.checkpoint]
    assert kinds == [
        (StageEventKind.preempt_asked, kinds[0][1]),
        (StageEventKind.yielded, yielded.checkpoint_step),
        (StageEventKind.resumed, yielded.checkpoint_step),
    ]
    # Its curve is whole: the first attempt's points up to the checkpoint, the second's after it, and
    # the figures of the whole series carried across the resume.
    with session_scope() as session:
        losses = session.scalars(
            select(MetricPoint.value)
            .where(MetricPoint.stage_id == weak, MetricPoint.name == "loss")
            .order_by(MetricPoint.step)
        ).all()
        series = session.get(MetricSeries, (weak, "loss"))
    assert series is not None and len(losses) == stage(job_id, "weak").total_steps == series.points_seen
    assert (series.min_value, series.max_value, series.last_value) == (min(losses), max(losses), losses[-1])
    job = client.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
    assert figures(job["results"]) == figures(reference_results(job, one_slot["W2S_DATA_DIR"], tmp_path))


@pytest.mark.parametrize("ending", ["transient error", "worker lost"])
def test_a_stage_asked_to_yield_that_ends_otherwise_still_gives_up_its_slot(
    one_slot: dict[str, str], client: TestClient, make_team, tiny_bert: Path, ending: str
) -> None:  # type: ignore[no-untyped-def]
    """Found by the lifecycle model: the victim, instead of yielding, failed transiently (or its worker
    died); it went back to queued, keeping the slot the stage preempting it had been given: two stages
    in one slot. It waits (pending) instead, its attempt given back."""
    borrower, owner = make_team(weight=1.0), make_team(weight=3.0)
    job_id, claim = running_weak(client, borrower, tiny_bert)
    submit(client, owner, tiny_job(tiny_bert, tiny_bert, seeds=[1]))
    assert planned_round(Steps()).preempted == [claim.stage_id]
    if ending == "transient error":
        with session_scope() as session:
            lifecycle.requeue_after_error(session, claim.stage_id, claim.fence, "OSError: flaky", utcnow())
    else:
        with session_scope() as session:
            session.execute(
                update(Stage)
                .where(Stage.id == claim.stage_id)
                .values(heartbeat_at=utcnow() - dt.timedelta(seconds=get_settings().heartbeat_timeout_s + 1))
            )
        assert claim.stage_id not in [stage_id for stage_id, _ in Steps().round().resent]
    victim = stage(job_id, "weak")
    assert victim.status == StageStatus.pending and victim.attempts == 0
    with session_scope() as session:
        active = session.scalar(
            select(func.count()).select_from(Stage).where(Stage.status.in_(["queued", "running"]))
        )
    assert active == 1  # the preemptor alone

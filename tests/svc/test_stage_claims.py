"""The rules that make redelivery safe, one at a time, without worker processes: who may claim a
stage, whose writes count, and what the dispatcher sends again."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service import lifecycle
from service.db import session_scope
from service.dispatch import RoundReport, recover_lost_stages
from service.models import LogLine, MetricPoint, Stage, utcnow
from service.settings import get_settings
from service.states import StageStatus
from svc_support import tiny_job
from worker import tasks
from worker.tasks import ProgressWriter, claim_stage


@pytest.fixture
def stage_id(client: TestClient, make_team, tiny_bert: Path) -> str:  # type: ignore[no-untyped-def]
    team = make_team()
    job = client.post("/v1/jobs", json=tiny_job(tiny_bert, tiny_bert), headers=team.headers).json()
    weak = job["stages"][0]
    with session_scope() as session:
        stage = session.get(Stage, weak["id"])
        assert stage is not None
        stage.status = "queued"
        stage.gpu_class = "cpu"
        stage.sent_at = utcnow()
    return str(weak["id"])


def stage_row(stage_id: str) -> Stage:
    with session_scope() as session:
        stage = session.get(Stage, stage_id)
        assert stage is not None
        return stage


def set_stage(stage_id: str, **values: object) -> None:
    with session_scope() as session:
        stage = session.get(Stage, stage_id)
        for name, value in values.items():
            setattr(stage, name, value)


def test_first_claim_runs_attempt_one(stage_id: str) -> None:
    claim = claim_stage(stage_id, "worker-a", get_settings())
    assert claim is not None and claim.attempt == 1
    stage = stage_row(stage_id)
    assert (stage.status, stage.attempts, stage.worker) == ("running", 1, "worker-a")


def test_duplicate_delivery_while_another_worker_is_alive_is_dropped(stage_id: str) -> None:
    claim_stage(stage_id, "worker-a", get_settings())
    assert claim_stage(stage_id, "worker-b", get_settings()) is None
    stage = stage_row(stage_id)
    assert (stage.attempts, stage.worker) == (1, "worker-a")


def test_redelivery_after_the_worker_died_starts_a_clean_attempt(stage_id: str) -> None:
    settings = get_settings()
    claim_stage(stage_id, "worker-a", settings)
    ProgressWriter(stage_id, 0.0, fence=1)._write()  # a heartbeat...
    with session_scope() as session:  # ...and a partial curve from the attempt that dies
        session.add_all(MetricPoint(stage_id=stage_id, step=step, name="loss", value=1.0) for step in (1, 2))
    set_stage(stage_id, heartbeat_at=utcnow() - dt.timedelta(seconds=settings.heartbeat_timeout_s + 1))

    claim = claim_stage(stage_id, "worker-b", settings)
    assert claim is not None and claim.attempt == 2
    with session_scope() as session:
        points = session.scalar(select(func.count()).where(MetricPoint.stage_id == stage_id))
        messages = session.scalars(select(LogLine.message).where(LogLine.stage_id == stage_id)).all()
    assert points == 0
    assert any("redelivered" in message and "worker-a" in message for message in messages)


def test_the_same_worker_getting_its_stage_back_means_its_last_attempt_died(stage_id: str) -> None:
    # One task at a time per worker: if the stage says it runs here, that run is gone (its child
    # process was killed and Celery requeued the task), however fresh its heartbeat.
    claim_stage(stage_id, "worker-a", get_settings())
    claim = claim_stage(stage_id, "worker-a", get_settings())
    assert claim is not None and claim.attempt == 2


def test_a_superseded_attempt_writes_nothing(stage_id: str) -> None:
    settings = get_settings()
    claim_stage(stage_id, "worker-a", settings)
    set_stage(stage_id, heartbeat_at=utcnow() - dt.timedelta(seconds=settings.heartbeat_timeout_s + 1))
    claim_stage(stage_id, "worker-b", settings)

    with session_scope() as session:
        lifecycle.finish_stage(
            session, stage_id, StageStatus.failed, fence=1, store_uri=settings.store_uri, error="late error"
        )
    writer = ProgressWriter(stage_id, 0.0, fence=1)
    writer.points.append((1, "loss", 0.5))
    writer.flush()
    stage = stage_row(stage_id)
    assert (stage.status, stage.attempts, stage.error) == ("running", 2, None)
    assert writer.cancelled  # its training stops at the next step
    with session_scope() as session:
        assert session.scalar(select(func.count()).where(MetricPoint.stage_id == stage_id)) == 0


def test_attempts_are_bounded(stage_id: str) -> None:
    settings = get_settings()
    set_stage(stage_id, attempts=settings.max_stage_attempts, error="OSError: disk full")
    assert claim_stage(stage_id, "worker-a", settings) is None
    stage = stage_row(stage_id)
    assert stage.status == "failed"
    assert (
        stage.error == f"gave up after {settings.max_stage_attempts} attempts; last error: OSError: disk full"
    )


def test_a_transient_error_requeues_the_stage_with_its_message_and_a_backoff(
    stage_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(tasks, "run_plan", disk_full)
    monkeypatch.setattr(tasks, "load_plan", lambda claim, settings: None)
    before = utcnow()
    with pytest.raises(OSError, match="No space left"):
        tasks.run_stage_task(stage_id)  # called directly, Celery's retry re-raises the error
    stage = stage_row(stage_id)
    assert stage.status == "queued" and stage.attempts == 1
    assert stage.error == "OSError: No space left on device"
    assert stage.sent_at is not None and stage.sent_at.replace(tzinfo=dt.UTC) >= before


@pytest.mark.parametrize("factor", [0.05, 5.0])
def test_retry_backoff_is_bounded_and_jittered(factor: float) -> None:
    for retries in range(12):
        countdowns = [tasks.retry_countdown(factor, retries) for _ in range(50)]
        assert all(0.0 <= c <= min(300.0, factor * 2**retries) for c in countdowns)
        assert len(set(countdowns)) > 1  # full jitter: workers that failed together do not retry together


def test_a_pending_stage_is_not_claimed(stage_id: str) -> None:
    set_stage(stage_id, status="pending")  # reset by a retry; its old message arrives late
    assert claim_stage(stage_id, "worker-a", get_settings()) is None
    assert stage_row(stage_id).status == "pending"


def test_dispatcher_requeues_silent_stages_and_resends_unclaimed_ones(stage_id: str) -> None:
    settings = get_settings()
    report = RoundReport(admitted=[])
    with session_scope() as session:
        recover_lost_stages(session, settings, report)
    assert report.resent == []  # just sent, nothing lost yet

    set_stage(stage_id, sent_at=utcnow() - dt.timedelta(seconds=settings.redeliver_after_s + 1))
    with session_scope() as session:
        recover_lost_stages(session, settings, report)
    assert report.resent == [(stage_id, "cpu")] and stage_row(stage_id).status == "queued"

    claim_stage(stage_id, "worker-a", settings)
    set_stage(stage_id, heartbeat_at=utcnow() - dt.timedelta(seconds=settings.heartbeat_timeout_s + 1))
    report = RoundReport(admitted=[])
    with session_scope() as session:
        recover_lost_stages(session, settings, report)
    assert report.resent == [(stage_id, "cpu")]
    stage = stage_row(stage_id)
    assert stage.status == "queued" and stage.attempts == 1

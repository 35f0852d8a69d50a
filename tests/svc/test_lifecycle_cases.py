"""The lifecycle cases issue 17 found by hand, one test each, against the real Postgres, with stages
run in this process (``execute_stage``) or their outcomes written as a worker writes them. Before
the lifecycle was made level-triggered and fenced, each of these left a job in a state nothing
would move on from."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from service import dispatch, lifecycle
from service.db import run_transaction, session_scope
from service.models import Job, Stage
from service.settings import get_settings
from service.states import InvalidTransition, StageStatus
from svc_support import Steps, tiny_job
from worker import tasks
from worker.control import plan_job_task
from worker.tasks import execute_stage


def submit(client: TestClient, team: Any, body: dict[str, Any]) -> str:
    response = client.post("/v1/jobs", json=body, headers=team.headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def job_row(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def stages(job_id: str) -> dict[str, Stage]:
    with session_scope() as session:
        rows = session.scalars(select(Stage).where(Stage.job_id == job_id)).all()
        for row in rows:
            session.expunge(row)
        return {row.kind: row for row in rows}


def admitted(job_id: str) -> list[str]:
    """A round: the job's stages it admitted (planning first, if due)."""
    steps = Steps()
    report = steps.round()
    for planned, token in report.plan:
        plan_job_task(planned, token)
    if report.plan:
        report = steps.round()
    return [
        stage_id for stage_id, _ in report.admitted if stage_id in {s.id for s in stages(job_id).values()}
    ]


def test_cancel_then_retry_while_a_stage_trains_ends_the_job(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    """Cancel, then retry 2-3 s later while a stage is inside a training step: the running attempt
    reports 'cancelled' after the retry. Before, that outcome was accepted and the job stayed
    'running' for good (weak cancelled, student pending); now the retry fenced the attempt out."""
    job_id = submit(client, make_team(), tiny_job(tiny_bert, tiny_bert))
    weak = admitted(job_id)[0]
    settings = get_settings()
    claim = tasks.claim_stage(weak, "worker-a", settings)
    assert claim is not None
    with session_scope() as session:
        lifecycle.cancel_job(session, job_id)
    with session_scope() as session:
        lifecycle.retry_job(session, job_id)
    # The old attempt now reaches its next step, sees the cancel it was told of, and reports.
    tasks.persist_outcome(weak, StageStatus.cancelled, fence=claim.fence, settings=settings)
    assert stages(job_id)["weak"].status == StageStatus.pending  # not resurrected as cancelled
    outcome = Steps().run(job_id, rounds=12)
    assert outcome["status"] == "succeeded"


def test_cancel_after_every_stage_finished_then_retry_finishes_the_job(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, make_team(), tiny_job(tiny_bert, tiny_bert))
    settings = get_settings()
    steps = Steps()
    for _ in range(10):  # every stage runs; the job's finishing is never run
        report = steps.round()
        for planned, token in report.plan:
            plan_job_task(planned, token)
        for stage_id, _ in report.admitted:
            execute_stage(stage_id, worker="in-process", settings=settings)
        if all(s.status in ("succeeded", "cached") for s in stages(job_id).values()):
            break
    assert job_row(job_id).stages_left == 0
    with session_scope() as session:
        lifecycle.cancel_job(session, job_id)  # before its finishing task ran
    with session_scope() as session:
        lifecycle.retry_job(session, job_id)
    assert Steps().run(job_id, rounds=4)["status"] == "succeeded"  # finishing is due from the rows


def test_a_job_whose_finishing_failed_finishes_when_retried(
    client: TestClient, make_team, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, make_team(), tiny_job(tiny_bert, tiny_bert))
    import service.planning as planning

    real = planning.finish_job

    def store_down(*args: Any, **kwargs: Any) -> bool:
        raise OSError("artifact store unreachable")

    monkeypatch.setattr(planning, "finish_job", store_down)
    import worker.control as control

    monkeypatch.setattr(control, "finish_job", store_down)
    assert Steps().run(job_id)["status"] == "failed"
    monkeypatch.setattr(control, "finish_job", real)
    with session_scope() as session:
        lifecycle.retry_job(session, job_id)
    assert Steps().run(job_id, rounds=4)["status"] == "succeeded"


def test_a_control_task_lost_between_commit_and_send_is_sent_again_within_seconds(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    """The dispatcher died after committing the round, before sending: before, the job waited
    control_timeout_s + 60 s (660 s); now the lease of seconds lapses."""
    job_id = submit(client, make_team(), tiny_job(tiny_bert, tiny_bert))
    settings = get_settings()
    assert [j for j, _ in Steps().round().plan] == [job_id]  # committed, then "lost"
    assert Steps().round().plan == []  # leased
    with session_scope() as session:
        lease = session.scalar(select(Job.control_lease_until).where(Job.id == job_id))
    assert lease is not None
    waited = (lease - dt.datetime.now(dt.UTC)).total_seconds()
    assert waited <= settings.control_lease_s + 1
    with session_scope() as session:  # the lease lapses
        session.execute(
            update(Job).where(Job.id == job_id).values(control_lease_until=dt.datetime.now(dt.UTC))
        )
    assert [j for j, _ in Steps().round().plan] == [job_id]


def test_a_stage_sent_but_lost_is_sent_again_after_its_claim_lease(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, make_team(), tiny_job(tiny_bert, tiny_bert))
    first = admitted(job_id)[0]  # its message is lost
    settings = get_settings()
    with session_scope() as session:
        report = dispatch.RoundReport()
        dispatch.recover_lost_stages(session, settings, report)
    assert first not in [stage_id for stage_id, _ in report.resent]  # within its lease
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=settings.claim_lease_s + 1)
    with session_scope() as session:
        session.execute(update(Stage).where(Stage.id == first).values(sent_at=past, queued_at=past))
        report = dispatch.RoundReport()
        dispatch.recover_lost_stages(session, settings, report)
    assert first in [stage_id for stage_id, _ in report.resent]


def test_a_worker_that_computes_another_key_refuses_the_stage_naming_both(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    """The planner's plan is the only plan: a worker whose code, versions or model files differ
    computes another key and hands the stage back naming both keys, instead of running something
    else; the attempt is not spent (a worker that can run it may take it, test_worker_routing.py)."""
    job_id = submit(client, make_team(), tiny_job(tiny_bert, tiny_bert))
    weak = admitted(job_id)[0]
    with session_scope() as session:
        plan = session.scalar(select(Stage.plan).where(Stage.id == weak))
        planned_key = plan["key"]
        plan["key"] = "0" * 64  # as if the planner's versions differed from this worker's
        session.execute(update(Stage).where(Stage.id == weak).values(plan=plan))
    with pytest.raises(tasks.TransientStageError):
        execute_stage(weak, worker="in-process", settings=get_settings())
    stage = stages(job_id)["weak"]
    error = stage.error or ""
    assert "0000000000000000" in error and planned_key[:16] in error and "computes stage key" in error
    assert (stage.status, stage.attempts) == ("queued", 0)


def test_cancel_and_retry_storms_never_deadlock_or_report_an_outage(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    """Clients cancelling and retrying while rounds admit and workers report: before, Postgres
    broke deadlocks (cancel locked job then stages, admission stage then job) and clients got 503."""
    team = make_team()
    job_ids = [submit(client, team, tiny_job(tiny_bert, tiny_bert, seeds=[seed])) for seed in range(3)]
    admitted(job_ids[0])  # planned, some stages in flight
    settings = get_settings()
    errors: list[BaseException] = []
    stop = threading.Event()

    def clients() -> None:
        while not stop.is_set():
            for job_id in job_ids:
                for action in (lifecycle.cancel_job, lifecycle.retry_job):
                    try:
                        run_transaction(action, job_id)
                    except InvalidTransition:
                        pass
                    except BaseException as error:
                        errors.append(error)

    def dispatcher() -> None:
        while not stop.is_set():
            try:
                report = run_transaction(dispatch.dispatch_round, settings)
                for planned, token in report.plan:
                    plan_job_task(planned, token)
                for stage_id, _ in report.admitted:
                    claim = tasks.claim_stage(stage_id, "storm-worker", settings)
                    if claim is not None:
                        tasks.persist_outcome(
                            stage_id, StageStatus.cancelled, fence=claim.fence, settings=settings
                        )
            except BaseException as error:
                errors.append(error)

    threads = [threading.Thread(target=clients) for _ in range(3)] + [threading.Thread(target=dispatcher)]
    for thread in threads:
        thread.start()
    threading.Event().wait(8.0)
    stop.set()
    for thread in threads:
        thread.join(60)
    assert errors == []


@pytest.mark.parametrize("fault", ["worker_lost", "transient_error", "out_of_memory"])
def test_a_running_stage_of_a_job_that_ended_is_cancelled_not_requeued(
    client: TestClient, make_team, tiny_bert: Path, fault: str
) -> None:  # type: ignore[no-untyped-def]
    """Found by the model-based test (slow tier, randomised): a job failed while one of its stages ran;
    the stage's worker then went silent and the round requeued it, leaving a queued stage, holding a
    slot, in a failed job. A stage of an ended job is cancelled instead, whatever sends it back."""
    job_id = submit(client, make_team(), tiny_job(tiny_bert, tiny_bert))
    weak = admitted(job_id)[0]
    settings = get_settings()
    claim = tasks.claim_stage(weak, "worker-a", settings)
    assert claim is not None
    with session_scope() as session:
        lifecycle.lock_jobs(session, [job_id])
        assert lifecycle.fail_job(session, job_id, "another stage failed")
    with session_scope() as session:
        if fault == "worker_lost":
            silent = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=settings.heartbeat_timeout_s + 1)
            session.execute(update(Stage).where(Stage.id == weak).values(heartbeat_at=silent))
        elif fault == "transient_error":
            lifecycle.requeue_after_error(session, weak, claim.fence, "flaky disk", dt.datetime.now(dt.UTC))
        else:
            lifecycle.out_of_memory(
                session, weak, fence=claim.fence, error="CUDA OOM", larger_queue="gpu-80g", store_uri="x"
            )
    Steps().round()
    assert stages(job_id)["weak"].status == StageStatus.cancelled
    assert job_row(job_id).status == "failed" and job_row(job_id).stages_left == 3

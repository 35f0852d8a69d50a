"""Hard stage time limits: a job may ask for one up to its team's limit (an admin's value, or
W2S_STAGE_TIME_LIMIT_S); a stage past it fails alone, naming the limit, and the worker goes on. The
issue: W2S_STAGE_TIMEOUT_S was only the broker's visibility timeout, so no stage had a limit."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import update

from service.db import session_scope
from service.models import Job, Stage, Team, utcnow
from service.settings import get_settings
from svc_support import Steps, queued_weak, tiny_job
from worker import dispatcher, tasks
from worker.control import plan_job_task
from worker.tasks import execute_stage

LONG = {"epochs": 1000, "lr": 1e-3, "batch_size": 16, "max_length": 32}  # thousands of steps


def planned_weak(client: TestClient, team: Any, body: dict[str, Any]) -> tuple[str, str]:
    response = client.post("/v1/jobs", json=body, headers=team.headers)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    plan_job_task(job_id)
    return job_id, queued_weak(job_id)


def test_a_job_may_ask_for_at_most_its_teams_limit(client: TestClient, make_team, tiny_bert: Path) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    with session_scope() as session:
        session.execute(update(Team).where(Team.id == team.team_id).values(stage_time_limit_s=600))
    over = client.post(
        "/v1/jobs", json=tiny_job(tiny_bert, tiny_bert, stage_time_limit_s=601), headers=team.headers
    )
    assert over.status_code == 422
    assert "stage_time_limit_s" in over.text and "600" in over.text
    under = client.post(
        "/v1/jobs", json=tiny_job(tiny_bert, tiny_bert, stage_time_limit_s=60), headers=team.headers
    )
    assert under.status_code == 201 and under.json()["stage_time_limit_s"] == 60
    wrong = client.post(
        "/v1/jobs", json=tiny_job(tiny_bert, tiny_bert, stage_time_limit_s=0), headers=team.headers
    )
    assert wrong.status_code == 422 and "stage_time_limit_s" in wrong.text


def test_a_stage_past_its_limit_fails_alone_naming_it(client: TestClient, make_team, tiny_bert: Path) -> None:  # type: ignore[no-untyped-def]
    settings = get_settings()
    slow = tiny_job(tiny_bert, tiny_bert, stage_time_limit_s=1)
    slow["weak"] |= LONG
    job_id, weak = planned_weak(client, make_team(), slow)
    assert execute_stage(weak, worker="in-process", settings=settings) == "failed"
    with session_scope() as session:
        stage, job = session.get_one(Stage, weak), session.get_one(Job, job_id)
        assert "time limit of 1 s (the job's stage_time_limit_s)" in (stage.error or "")
        assert 0 < stage.step < stage.total_steps  # stopped part-way, at a step
        assert stage.time_limit_s == 1 and stage.deadline_at is not None
        assert job.status == "failed"
    # The same worker process goes on: another team's job runs to its end.
    _, other_weak = planned_weak(client, make_team(), tiny_job(tiny_bert, tiny_bert))
    assert execute_stage(other_weak, worker="in-process", settings=settings) == "succeeded"


def test_the_teams_limit_applies_when_the_job_asks_for_none(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    body = tiny_job(tiny_bert, tiny_bert)
    body["weak"] |= LONG
    team = make_team()
    with session_scope() as session:
        session.execute(update(Team).where(Team.id == team.team_id).values(stage_time_limit_s=1))
    _, weak = planned_weak(client, team, body)
    assert execute_stage(weak, worker="in-process", settings=get_settings()) == "failed"
    with session_scope() as session:
        assert "time limit of 1 s (your team's stage time limit)" in (
            session.get_one(Stage, weak).error or ""
        )


def test_a_stage_running_long_past_its_deadline_is_failed_by_the_round(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    """Its worker was lost or is stuck past every limit: failed, not sent again to run as long once more."""
    job_id, weak = planned_weak(client, make_team(), tiny_job(tiny_bert, tiny_bert))
    claim = tasks.claim_stage(weak, "stuck-worker", get_settings())
    assert claim is not None
    with session_scope() as session:
        session.execute(
            update(Stage)
            .where(Stage.id == weak)
            .values(
                deadline_at=utcnow() - dt.timedelta(minutes=10), heartbeat_at=utcnow() - dt.timedelta(hours=1)
            )
        )
    report = Steps().round()
    assert weak not in [stage_id for stage_id, _ in report.resent]
    with session_scope() as session:
        stage = session.get_one(Stage, weak)
        assert stage.status == "failed" and "stuck-worker did not end it" in (stage.error or "")
        assert session.get_one(Job, job_id).status == "failed"


def test_the_dispatcher_sends_each_stage_with_celerys_limits(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    from service.limits import STAGE_LIMIT_GRACE_S

    team = make_team()
    job_id = client.post(
        "/v1/jobs", json=tiny_job(tiny_bert, tiny_bert, stage_time_limit_s=120), headers=team.headers
    ).json()["id"]
    plan_job_task(job_id)

    class Broker:
        def __init__(self) -> None:
            self.sent: list[dict[str, Any]] = []

        def send_task(self, name: str, args: list[Any], **options: Any) -> None:
            self.sent.append({"name": name, "args": args, **options})

    broker = Broker()
    dispatcher.run_round(get_settings(), broker)  # type: ignore[arg-type]
    stage_sends = [sent for sent in broker.sent if sent["name"] == tasks.STAGE_TASK]
    assert stage_sends, broker.sent
    assert all(sent["soft_time_limit"] == 120 + STAGE_LIMIT_GRACE_S for sent in stage_sends)
    assert all(sent["time_limit"] == 120 + 2 * STAGE_LIMIT_GRACE_S for sent in stage_sends)

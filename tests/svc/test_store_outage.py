"""An artifact store outage is weather, not failure (issue: 20 s down cost a stage two of its three
attempts, 60 s failed the job, and /readyz said ok). The store here is a real S3-compatible server
behind a proxy the test takes down: planning and stages wait for storage with their attempts given
back, a computed result is written once the store is back, and /readyz says the store is down."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from helpers import OutageProxy, S3Server
from service.db import reset_caches, session_scope
from service.models import Job, LogLine, Stage
from service.settings import get_settings
from svc_support import queued_weak, tiny_job
from worker.control import plan_job_task
from worker.tasks import TransientStageError, execute_stage


@pytest.fixture
def s3_store(
    service_env: dict[str, str], s3_outage: OutageProxy, s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> OutageProxy:
    monkeypatch.setenv("W2S_ARTIFACT_STORE", s3_env.new_bucket())
    monkeypatch.setenv("W2S_STORE_RETRY_S", "1")
    reset_caches()
    return s3_outage


def submit(client: TestClient, team: Any, model: Path) -> str:
    response = client.post("/v1/jobs", json=tiny_job(model, model), headers=team.headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_planning_waits_for_storage_and_goes_on_when_it_is_back(
    s3_store: OutageProxy, client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, make_team(), tiny_bert)
    s3_store.down()
    assert plan_job_task(job_id) == "deferred"
    with session_scope() as session:
        job = session.get_one(Job, job_id)
        assert (job.status, job.planned, job.control_attempts) == ("queued", False, 0)
        logs = session.scalars(select(LogLine.message).where(LogLine.job_id == job_id)).all()
    assert any("waiting for storage" in line for line in logs)
    s3_store.up()
    assert plan_job_task(job_id) == "done"
    with session_scope() as session:
        assert session.get_one(Job, job_id).planned


def test_a_stage_waits_for_storage_without_spending_an_attempt(
    s3_store: OutageProxy, client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, make_team(), tiny_bert)
    assert plan_job_task(job_id) == "done"
    weak = queued_weak(job_id)
    settings = get_settings()
    s3_store.down()
    for _ in range(settings.max_stage_attempts + 1):  # more outages than it has attempts
        with pytest.raises(TransientStageError):
            execute_stage(weak, worker="in-process", settings=settings)
        with session_scope() as session:
            stage = session.get_one(Stage, weak)
            assert (stage.status, stage.attempts) == ("queued", 0)
            assert (stage.error or "").startswith("waiting for storage: the artifact store did not answer")
            assert session.get_one(Job, job_id).status != "failed"
    s3_store.up()
    assert execute_stage(weak, worker="in-process", settings=settings) == "succeeded"
    with session_scope() as session:
        assert session.get_one(Stage, weak).attempts == 1


def test_a_computed_result_is_written_once_the_store_is_back(
    s3_store: OutageProxy,
    client: TestClient,
    make_team,
    tiny_bert: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # type: ignore[no-untyped-def]
    """The store goes down right after training, for longer than W2S_STORE_RETRY_S (1 s here): the
    result waits however long it takes, and is written, not recomputed."""
    from w2s import stages

    job_id = submit(client, make_team(), tiny_bert)
    assert plan_job_task(job_id) == "done"
    weak = queued_weak(job_id)
    real_fit, fits = stages.fit, []

    def fit_then_outage(*args: Any, **kwargs: Any) -> Any:
        outcome = real_fit(*args, **kwargs)
        fits.append(1)
        s3_store.down()
        threading.Timer(3.0, s3_store.up).start()
        return outcome

    monkeypatch.setattr(stages, "fit", fit_then_outage)
    assert execute_stage(weak, worker="in-process", settings=get_settings()) == "succeeded"
    with session_scope() as session:
        stage = session.get_one(Stage, weak)
        assert stage.attempts == 1 and stage.result is not None
    assert len(fits) == 1  # trained once


def test_readyz_says_when_the_store_is_down(s3_store: OutageProxy, client: TestClient) -> None:
    assert client.get("/readyz").json()["store"] == "ok"
    s3_store.down()
    down = client.get("/readyz")
    assert down.status_code == 503 and down.json()["store"].startswith("unreachable")
    s3_store.up()
    assert client.get("/readyz").status_code == 200

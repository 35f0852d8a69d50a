"""Errors mean what they say: domain errors map to their statuses; a bug is a 500 with a request id
(never a 422 or a 503 that blames the user or the database); a check-then-insert race is a 409."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from fastapi.testclient import TestClient

from service import auth, jobs
from service.db import session_scope

ADMIN = {"Authorization": "Bearer test-admin-key"}


@pytest.fixture
def raising_client(service_env: dict[str, str]) -> TestClient:
    from api.main import create_app

    return TestClient(create_app(), raise_server_exceptions=False)


@pytest.mark.parametrize("bug", [KeyError("stage"), ValueError("a bug, not the caller's input")])
def test_a_bug_inside_a_route_is_a_500_with_a_request_id(
    raising_client: TestClient,
    make_team,
    bug: Exception,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()

    def broken(*args: object, **kwargs: object) -> None:
        raise bug

    monkeypatch.setattr(jobs, "list_job_summaries", broken)
    with caplog.at_level(logging.ERROR, logger="api.main"):
        response = raising_client.get("/v1/jobs", headers=team.headers)
    assert response.status_code == 500
    request_id = response.json()["request_id"]
    assert request_id in response.json()["detail"] and response.headers["x-request-id"] == request_id
    assert any(request_id in record.getMessage() for record in caplog.records)


def test_a_race_on_a_team_name_is_a_409_from_the_unique_constraint(client: TestClient) -> None:
    holder = session_scope()
    session = holder.__enter__()
    auth.create_team(session, name="contested")  # inserted, not yet committed: the row is locked
    answers: list[int] = []
    second = threading.Thread(
        target=lambda: answers.append(
            client.post("/v1/teams", json={"name": "contested"}, headers=ADMIN).status_code
        )
    )
    second.start()
    time.sleep(0.5)  # the second insert now waits on the unique index
    holder.__exit__(None, None, None)
    second.join(10)
    assert answers == [409]


def test_domain_errors_keep_their_statuses(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    assert client.get("/v1/jobs?cursor=not-a-cursor", headers=team.headers).status_code == 422
    assert client.get(f"/v1/jobs/{'f' * 32}", headers=team.headers).status_code == 404
    assert client.post("/v1/teams", json={"name": "twice"}, headers=ADMIN).status_code == 201
    assert client.post("/v1/teams", json={"name": "twice"}, headers=ADMIN).status_code == 409

"""The jobs API on Postgres: validation errors name fields, teams are isolated, POST is idempotent."""

from __future__ import annotations

import json
import re
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from service.models import utcnow

ADMIN = {"Authorization": "Bearer test-admin-key"}


def spec(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "dataset": {"name": "sst2", "n_train": 40, "n_test": 20},
        "weak": {"model": "gpt2"},
        "strong": {"model": "gpt2-medium"},
        "losses": ["xent", "logconf"],
        "seeds": [0, 1],
    }
    body.update(overrides)
    return body


def test_submit_creates_job_with_stages(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    response = client.post("/v1/jobs", json={**spec(), "name": "first", "priority": 3}, headers=team.headers)
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued" and job["name"] == "first" and job["priority"] == 3
    kinds = [(stage["kind"], stage["seed"]) for stage in job["stages"]]
    assert kinds == [
        ("weak", 0),
        ("ceiling", 0),
        ("student:xent", 0),
        ("student:logconf", 0),
        ("weak", 1),
        ("ceiling", 1),
        ("student:xent", 1),
        ("student:logconf", 1),
    ]
    assert all(stage["status"] == "pending" for stage in job["stages"])
    assert client.get(f"/v1/jobs/{job['id']}", headers=team.headers).json()["id"] == job["id"]


def test_validation_errors_name_each_field(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    bad = spec(weak={"model": "gpt2", "mode": "freeze", "lr": -1}, losses=["nope"])
    response = client.post("/v1/jobs", json=bad, headers=team.headers)
    assert response.status_code == 422
    fields = {".".join(map(str, item["loc"][1:])): item["msg"] for item in response.json()["detail"]}
    assert "'full', 'probe' or 'lora'" in fields["weak.mode"]
    assert "weak.lr" in fields and "xent" in fields["losses.0"]
    missing = client.post("/v1/jobs", json={"dataset": {"name": "sst2"}}, headers=team.headers)
    assert {tuple(item["loc"][1:]) for item in missing.json()["detail"]} == {("weak",), ("strong",)}
    assert client.post("/v1/jobs", json=spec(priority=1000), headers=team.headers).status_code == 422


def test_paths_outside_data_dir_and_remote_code_are_refused(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    outside = spec(dataset={"name": {"path": "/etc/passwd", "text": "a", "label": "b"}})
    detail = client.post("/v1/jobs", json=outside, headers=team.headers).json()["detail"]
    assert detail[0]["loc"][1:] == ["dataset", "name", "path"] and "outside" in detail[0]["msg"]
    remote = spec(strong={"model": "gpt2", "trust_remote_code": True})
    detail = client.post("/v1/jobs", json=remote, headers=team.headers).json()["detail"]
    assert detail[0]["loc"][1:] == ["strong", "trust_remote_code"]
    trusted = make_team(allow_trust_remote_code=True)
    assert client.post("/v1/jobs", json=remote, headers=trusted.headers).status_code == 201


def test_auth_required_and_teams_isolated(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    alice, bob = make_team("alice"), make_team("bob")
    assert client.get("/v1/jobs").status_code == 401
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer w2s_wrong"}).status_code == 401
    job_id = client.post("/v1/jobs", json=spec(), headers=alice.headers).json()["id"]
    for method, path in [
        ("get", ""),
        ("get", "/metrics"),
        ("get", "/logs"),
        ("post", "/cancel"),
        ("post", "/retry"),
    ]:
        response = getattr(client, method)(f"/v1/jobs/{job_id}{path}", headers=bob.headers)
        assert response.status_code == 404, (method, path)
        # Indistinguishable from a job that does not exist at all.
        missing = getattr(client, method)(f"/v1/jobs/{'0' * 32}{path}", headers=bob.headers)
        assert missing.status_code == 404 and response.json()["detail"].replace(
            job_id, "X"
        ) == missing.json()["detail"].replace("0" * 32, "X")
    assert client.get("/v1/jobs", headers=bob.headers).json()["data"] == []
    assert len(client.get("/v1/jobs", headers=alice.headers).json()["data"]) == 1


def test_idempotent_post(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    alice, bob = make_team(), make_team()
    first = client.post("/v1/jobs", json=spec(), headers={**alice.headers, "Idempotency-Key": "k1"})
    again = client.post("/v1/jobs", json=spec(), headers={**alice.headers, "Idempotency-Key": "k1"})
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other_team = client.post("/v1/jobs", json=spec(), headers={**bob.headers, "Idempotency-Key": "k1"})
    assert other_team.status_code == 201 and other_team.json()["id"] != first.json()["id"]
    assert len(client.get("/v1/jobs", headers=alice.headers).json()["data"]) == 1


def test_list_filters_and_keyset_pagination(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    ids = [
        client.post("/v1/jobs", json={**spec(), "name": f"run-{i}"}, headers=team.headers).json()["id"]
        for i in range(5)
    ]
    client.post("/v1/jobs", json=spec(dataset={"name": "imdb", "n_train": 40}), headers=team.headers)
    seen, cursor = [], None
    while True:
        page = client.get(
            "/v1/jobs",
            params={"limit": 2, "dataset": "sst2", **({"cursor": cursor} if cursor else {})},
            headers=team.headers,
        ).json()
        seen += [job["id"] for job in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))  # newest first, each once
    named = client.get("/v1/jobs", params={"name": "run-3"}, headers=team.headers).json()["data"]
    assert [job["name"] for job in named] == ["run-3"]
    assert client.get("/v1/jobs", params={"status": "weird"}, headers=team.headers).status_code == 422
    assert client.get("/v1/jobs", params={"cursor": "garbage"}, headers=team.headers).status_code == 422


def test_cancel_and_retry_transitions(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    job_id = client.post("/v1/jobs", json=spec(), headers=team.headers).json()["id"]
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel", headers=team.headers)
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert {stage["status"] for stage in cancelled.json()["stages"]} == {"cancelled"}
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=team.headers).status_code == 409
    retried = client.post(f"/v1/jobs/{job_id}/retry", headers=team.headers)
    assert retried.status_code == 202 and retried.json()["status"] == "queued"
    assert {stage["status"] for stage in retried.json()["stages"]} == {"pending"}
    assert client.post(f"/v1/jobs/{job_id}/retry", headers=team.headers).status_code == 409
    logs = client.get(f"/v1/jobs/{job_id}/logs", headers=team.headers).json()["data"]
    assert [line["message"] for line in logs][-2:] == ["cancel requested", "retry requested"]


def test_admin_creates_teams_and_keys(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    assert client.post("/v1/teams", json={"name": "x"}, headers=team.headers).status_code == 403
    created = client.post("/v1/teams", json={"name": "vision", "gpu_quota": 2}, headers=ADMIN)
    assert created.status_code == 201
    assert client.post("/v1/teams", json={"name": "vision"}, headers=ADMIN).status_code == 409
    key = client.post(f"/v1/teams/{created.json()['id']}/keys", json={"name": "ci"}, headers=ADMIN).json()[
        "key"
    ]
    me = client.get("/v1/teams/me", headers={"Authorization": f"Bearer {key}"}).json()
    assert me["name"] == "vision" and "key" not in me
    usage = client.get("/v1/teams/me/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert usage["gpu_quota"] == 2 and usage["gpu_seconds_total"] == 0


def test_health_ready_metrics_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["database"] == "ok"
    # The counts describe every team's work: the admin key reads them.
    assert client.get("/metrics").status_code == 401
    assert "w2s_http_requests_total" in client.get("/metrics", headers=ADMIN).text
    assert client.get("/docs").status_code == 200
    assert "/v1/jobs" in client.get("/openapi.json").json()["paths"]


def test_a_write_is_committed_before_its_response_is_sent(service_env: dict[str, str], make_team) -> None:  # type: ignore[no-untyped-def]
    # TestClient waits for the whole ASGI call, hiding a commit that runs after the response: call the
    # app directly and look from another connection the moment the body goes out, as a client's next
    # request would.
    from api.main import create_app
    from service.db import session_scope
    from service.models import Job

    team = make_team()
    body = json.dumps(spec()).encode()
    visible: list[bool] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            with session_scope() as session:
                visible.append(session.get(Job, json.loads(message["body"])["id"]) is not None)

    headers = [
        (b"authorization", team.headers["Authorization"].encode()),
        (b"content-type", b"application/json"),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/jobs",
        "raw_path": b"/v1/jobs",
        "query_string": b"",
        "root_path": "",
        "headers": [*headers, (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    anyio.run(create_app(), scope, receive, send)
    assert visible == [True]


def test_reads_show_what_the_orm_views_show(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    # GET /v1/jobs/{id} and GET /v1/jobs read with Core statements; the JSON is what the ORM gives.
    from api.schemas import JobsPublic, job_public, job_summary
    from service import jobs as job_service
    from service.db import session_scope

    team = make_team()
    ids = [client.post("/v1/jobs", json=spec(), headers=team.headers).json()["id"] for _ in range(3)]
    with session_scope() as session:
        job = job_service.get_job(session, team_id=team.team_id, job_id=ids[0])
        job.stages[0].status = "succeeded"
        job.stages[1].status, job.stages[1].step, job.stages[1].total_steps = "running", 3, 10
        job.results = {"weak": {"accuracy": 0.5}}
    with session_scope() as session:
        expected_job = job_public(job_service.get_job(session, team_id=team.team_id, job_id=ids[0]))
        jobs, cursor = job_service.list_jobs(session, team_id=team.team_id, limit=2)
        expected_page = JobsPublic(data=[job_summary(job) for job in jobs], next_cursor=cursor)
    read = client.get(f"/v1/jobs/{ids[0]}", headers=team.headers)
    assert read.json() == expected_job.model_dump(mode="json")
    page = client.get("/v1/jobs?limit=2", headers=team.headers)
    assert page.json() == expected_page.model_dump(mode="json") and page.json()["next_cursor"]


def test_a_revoked_key_stops_reading_within_the_cache_ttl(
    client: TestClient, make_team, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from service import auth
    from service.db import session_scope
    from service.models import ApiKey

    team, other = make_team(), make_team()
    assert client.get("/v1/jobs", headers=team.headers).status_code == 200  # the key is now cached
    with session_scope() as session:
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.team_id == team.team_id))
        assert auth.revoke_api_key(session, key_id=key_id)
    # Revoked by this process: refused at once.
    assert client.get("/v1/jobs", headers=team.headers).status_code == 401
    # Revoked elsewhere (another process, SQL): accepted until the cached check expires, then refused.
    assert client.get("/v1/jobs", headers=other.headers).status_code == 200
    with session_scope() as session:
        session.execute(update(ApiKey).where(ApiKey.team_id == other.team_id).values(revoked_at=utcnow()))
    assert client.get("/v1/jobs", headers=other.headers).status_code == 200
    monkeypatch.setattr(auth.KEY_CACHE, "ttl_s", 0.0)
    auth.KEY_CACHE.clear()
    assert client.get("/v1/jobs", headers=other.headers).status_code == 401
    assert client.get(f"/v1/jobs/{'0' * 32}", headers=other.headers).status_code == 401


def test_request_metrics_name_the_route(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    assert client.get(f"/v1/jobs/{'0' * 32}", headers=team.headers).status_code == 404
    refused = client.put("/v1/jobs", headers=team.headers)
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, POST"
    text = client.get("/metrics", headers=ADMIN).text
    # The route label is the path template (its router's part of it), never the id itself.
    assert re.search(
        r'w2s_http_requests_total\{method="GET",route="[^"]*/jobs/\{job_id\}",status="404"\}', text
    )
    assert re.search(r'w2s_http_request_seconds_count\{method="GET",route="[^"]*/jobs/\{job_id\}"\}', text)
    assert "0" * 32 not in text


def test_name_filter_is_a_literal_substring(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    for name in ("a_b", "axb", "50%", "500", "a/b", "a//b"):
        client.post("/v1/jobs", json={**spec(), "name": name}, headers=team.headers)

    def names(**params: str) -> set[str]:
        page = client.get("/v1/jobs", params=params, headers=team.headers).json()["data"]
        return {job["name"] for job in page}

    assert names(name="_") == {"a_b"}
    assert names(name="%") == {"50%"}
    assert names(name="/") == {"a/b", "a//b"} and names(name="//") == {"a//b"}
    assert names(name="a", model="gpt2-medium") == {"a_b", "axb", "a/b", "a//b"}
    assert names(name="a", model="gpt2-large") == set()

"""The jobs API on Postgres: validation errors name fields, teams are isolated, POST is idempotent."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

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
    assert "w2s_http_requests_total" in client.get("/metrics").text
    assert client.get("/docs").status_code == 200
    assert "/v1/jobs" in client.get("/openapi.json").json()["paths"]

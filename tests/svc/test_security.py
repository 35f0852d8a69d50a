"""Security on Postgres: API keys are stored hashed and never logged, and no team can read, change
or detect another team's jobs, sweeps or datasets, through /v1 or the dashboard: the answer for
another team's id is the answer for an id that does not exist."""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from service.db import get_engine
from svc_support import login

ADMIN = {"Authorization": "Bearer test-admin-key"}
JOB = {
    "name": "private",
    "dataset": {"name": "sst2", "n_train": 40, "n_test": 20},
    "weak": {"model": "gpt2"},
    "strong": {"model": "gpt2-medium"},
}
GRID = {
    "dataset": {"name": "sst2", "n_train": 40},
    "weak_models": ["gpt2"],
    "strong_models": ["gpt2-medium"],
}
ROWS = "".join(f'{{"text": "review {i}", "label": {i % 2}}}\n' for i in range(12)).encode()
MISSING_ID = "0123456789abcdef0123456789abcdef"


def csrf(client: TestClient) -> str:
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/").text)
    assert token
    return token.group(1)


def test_keys_are_stored_only_as_hashes(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    factory_key = make_team().key
    team_id = client.post("/v1/teams", json={"name": "vision"}, headers=ADMIN).json()["id"]
    api_key = client.post(f"/v1/teams/{team_id}/keys", json={"name": "ci"}, headers=ADMIN).json()["key"]
    with get_engine().connect() as connection:
        # Every column of every row, as text: the key must not be in any of them.
        rows = connection.execute(text("SELECT * FROM api_keys")).mappings().all()
    dump = repr([dict(row) for row in rows])
    for key in (factory_key, api_key):
        assert key not in dump
        assert hashlib.sha256(key.encode()).hexdigest() in dump
    assert client.get("/v1/teams/me", headers={"Authorization": f"Bearer {api_key}"}).status_code == 200


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture, service_env: dict[str, str]) -> pytest.LogCaptureFixture:
    """Every record at DEBUG from every logger, SQL statements and their parameters included.
    SQLAlchemy checks its level when a connection is made, so this is set before the first one."""
    caplog.set_level(logging.DEBUG)
    for name in (
        "sqlalchemy.engine",
        "sqlalchemy.pool",
        "uvicorn",
        "uvicorn.access",
        "uvicorn.error",
        "httpx",
    ):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def test_keys_never_reach_the_logs_or_the_cookie(
    all_logs: pytest.LogCaptureFixture, client: TestClient
) -> None:
    team_id = client.post("/v1/teams", json={"name": "logged"}, headers=ADMIN).json()["id"]
    key = client.post(f"/v1/teams/{team_id}/keys", json={"name": "ci"}, headers=ADMIN).json()["key"]
    auth = {"Authorization": f"Bearer {key}"}
    job = client.post("/v1/jobs", json=JOB, headers=auth).json()
    for path in ("/v1/jobs", f"/v1/jobs/{job['id']}", "/v1/teams/me", "/v1/teams/me/usage", "/v1/datasets"):
        assert client.get(path, headers=auth).status_code == 200
    # A near miss, a key in the wrong header, and the dashboard sign-in with its pages.
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}x"}).status_code == 401
    assert client.get("/v1/jobs", headers={"Authorization": key}).status_code == 401
    signed_in = login(client, key)
    assert signed_in.status_code == 303
    assert client.get("/").status_code == client.get(f"/jobs/{job['id']}").status_code == 200
    assert login(client, key[:-1] + "!").status_code == 401

    logged = "\n".join(f"{record.name} {record.getMessage()} {record.args!r}" for record in all_logs.records)
    assert "SELECT" in logged and "api_keys" in logged  # the capture did see the key lookups
    assert key not in logged and key[:-1] not in logged
    # The session cookie is signed, not encrypted: its payload must not hold the key either.
    cookie = client.cookies["w2s_session"]
    payload = cookie.split(".")[0]
    decoded = base64.b64decode(payload + "=" * (-len(payload) % 4)).decode()
    assert key not in cookie and key not in decoded


@pytest.fixture
def alice_objects(client: TestClient, make_team) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    alice, bob = make_team(), make_team()
    job = client.post("/v1/jobs", json=JOB, headers=alice.headers).json()
    sweep = client.post("/v1/sweeps", json=GRID, headers=alice.headers).json()
    dataset = client.post(
        "/v1/datasets", files={"file": ("d.jsonl", ROWS)}, data={"name": "private"}, headers=alice.headers
    ).json()
    return {"alice": alice, "bob": bob, "job": job["id"], "sweep": sweep["id"], "dataset": dataset["id"]}


def assert_same_as_missing(request: Any, real_id: str) -> None:
    """``request(id)`` answers for another team's ``real_id`` exactly as for an id nobody has."""
    theirs, missing = request(real_id), request(MISSING_ID)
    assert theirs.status_code == missing.status_code, theirs.text
    assert theirs.headers.get("content-type") == missing.headers.get("content-type")
    assert theirs.text.replace(real_id, "<id>") == missing.text.replace(MISSING_ID, "<id>")


V1_READS = [
    ("get", "/v1/jobs/{job}", {}),
    ("get", "/v1/jobs/{job}/metrics", {}),
    ("get", "/v1/jobs/{job}/metrics", {"headers": {"Accept": "text/event-stream"}}),
    ("get", "/v1/jobs/{job}/logs", {}),
    ("post", "/v1/jobs/{job}/cancel", {}),
    ("post", "/v1/jobs/{job}/retry", {}),
    ("get", "/v1/sweeps/{sweep}", {}),
    ("get", "/v1/datasets/{dataset}", {}),
]


@pytest.mark.parametrize(
    ("method", "template", "options"), V1_READS, ids=[f"{m} {t} {o}" for m, t, o in V1_READS]
)
def test_v1_answers_for_others_ids_as_for_missing_ones(
    client: TestClient, alice_objects: dict[str, Any], method: str, template: str, options: dict[str, Any]
) -> None:
    bob = alice_objects["bob"]
    kind = template.split("{")[1].split("}")[0]

    def request(object_id: str) -> Any:
        headers = {**bob.headers, **options.get("headers", {})}
        return getattr(client, method)(template.replace(f"{{{kind}}}", object_id), headers=headers)

    assert_same_as_missing(request, alice_objects[kind])
    assert request(alice_objects[kind]).status_code == 404


def test_others_ids_in_lists_filters_and_specs(client: TestClient, alice_objects: dict[str, Any]) -> None:
    alice, bob = alice_objects["alice"], alice_objects["bob"]
    for path in ("/v1/jobs", "/v1/sweeps", "/v1/datasets"):
        assert client.get(path, headers=bob.headers).json()["data"] == []
    assert_same_as_missing(
        lambda sweep_id: client.get("/v1/jobs", params={"sweep_id": sweep_id}, headers=bob.headers),
        alice_objects["sweep"],
    )
    # Alice's upload in Bob's job or sweep spec: refused exactly like an id that does not exist.
    assert_same_as_missing(
        lambda dataset_id: client.post(
            "/v1/jobs", json={**JOB, "dataset": {"name": f"upload:{dataset_id}"}}, headers=bob.headers
        ),
        alice_objects["dataset"],
    )
    assert_same_as_missing(
        lambda dataset_id: client.post(
            "/v1/sweeps", json={**GRID, "dataset": {"name": f"upload:{dataset_id}"}}, headers=bob.headers
        ),
        alice_objects["dataset"],
    )
    # Bob's cancel and retry changed nothing of Alice's.
    job = client.get(f"/v1/jobs/{alice_objects['job']}", headers=alice.headers).json()
    assert job["status"] == "queued" and {stage["status"] for stage in job["stages"]} == {"pending"}
    logs = client.get(f"/v1/jobs/{alice_objects['job']}/logs", headers=alice.headers).json()["data"]
    assert not [line for line in logs if "requested" in line["message"]]


DASHBOARD = [
    ("get", "/jobs/{job}"),
    ("get", "/ui/jobs/{job}.json"),
    ("post", "/jobs/{job}/cancel"),
    ("post", "/jobs/{job}/retry"),
    ("get", "/sweeps/{sweep}"),
    ("get", "/sweeps/{sweep}.csv"),
    ("get", "/sweeps/{sweep}.json"),
    ("get", "/ui/sweeps/{sweep}.json"),
]


def test_dashboard_answers_for_others_ids_as_for_missing_ones(
    client: TestClient, alice_objects: dict[str, Any]
) -> None:
    login(client, alice_objects["bob"].key)
    token = csrf(client)
    for method, template in DASHBOARD:
        kind = template.split("{")[1].split("}")[0]

        def request(object_id: str, method: str = method, template: str = template, kind: str = kind) -> Any:
            path = template.replace(f"{{{kind}}}", object_id)
            if method == "post":
                return client.post(path, data={"csrf": token}, follow_redirects=False)
            return client.get(path)

        assert_same_as_missing(request, alice_objects[kind])
        assert request(alice_objects[kind]).status_code == 404, template
    assert client.get("/ui/jobs.json").json()["jobs"] == []
    assert (
        alice_objects["job"] not in client.get("/").text
        and alice_objects["sweep"] not in client.get("/sweeps").text
    )

"""Storage is a quota: the bytes a team's stages wrote (outputs, checkpoints) and its uploads are
counted, shown in usage, the dashboard and the admin view, and a job, sweep, retry or upload is
refused over the quota; a team keeps only its last W2S_CHECKPOINTS_KEPT checkpoints. The issue:
save_checkpoint on a 16-stage tiny job wrote 267 MB and no quota covered it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import ADMIN_KEY
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.db import reset_caches, session_scope
from service.models import CheckpointHold, Stage
from service.settings import get_settings
from service.storage import MB
from svc_support import login, queued_weak, tiny_job
from worker.control import plan_job_task
from worker.tasks import execute_stage

ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}


def run_weak(client: TestClient, team: Any, model: Path, **weak_options: Any) -> tuple[str, str]:
    body = tiny_job(model, model)
    body["weak"] |= weak_options
    response = client.post("/v1/jobs", json=body, headers=team.headers)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    plan_job_task(job_id)
    weak_id = queued_weak(job_id)
    assert execute_stage(weak_id, worker="in-process", settings=get_settings()) == "succeeded"
    return job_id, weak_id


def store_blob(digest: str) -> Path:
    return Path(get_settings().store_uri) / "blobs" / digest[:2] / digest


def checkpoint_file(ref: str) -> Path:
    """Where a stage result's ``checkpoint`` lives in the (local) store: a file of its own."""
    return Path(get_settings().store_uri) / "files" / "checkpoints" / ref


def usage(client: TestClient, team: Any) -> dict[str, int]:
    return client.get("/v1/teams/me/usage", headers=team.headers).json()["storage"]


def test_a_teams_stages_are_charged_what_they_wrote(client: TestClient, make_team, tiny_bert: Path) -> None:  # type: ignore[no-untyped-def]
    team, other = make_team(), make_team()
    _, weak = run_weak(client, team, tiny_bert, save_checkpoint=True)
    with session_scope() as session:
        result = session.get_one(Stage, weak).result
    assert result is not None
    checkpoint = checkpoint_file(result["checkpoint"]).stat().st_size
    outputs = (
        store_blob(result["test_probs"]).stat().st_size + store_blob(result["soft_labels"]).stat().st_size
    )
    held = usage(client, team)
    assert held["checkpoints_bytes"] == checkpoint > 0
    assert outputs < held["outputs_bytes"] < outputs + 10_000  # plus the small result record
    assert held["used_bytes"] == held["outputs_bytes"] + held["checkpoints_bytes"] + held["uploads_bytes"]
    assert held["quota_bytes"] == get_settings().storage_quota_mb * MB
    assert usage(client, other)["used_bytes"] == 0  # nobody else pays for it

    teams = client.get("/v1/admin/teams", headers=ADMIN_HEADERS).json()
    assert next(t for t in teams if t["id"] == team.team_id)["storage"]["checkpoints_bytes"] == checkpoint


@pytest.fixture
def two_checkpoints_kept(service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("W2S_CHECKPOINTS_KEPT", "2")
    reset_caches()
    return 2


def test_a_team_keeps_its_last_checkpoints(
    two_checkpoints_kept: int, client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    refs, weaks = [], []
    for lr in (1e-3, 2e-3, 3e-3):  # three different stage keys, so three checkpoints
        _, weak = run_weak(client, team, tiny_bert, save_checkpoint=True, lr=lr)
        weaks.append(weak)
        with session_scope() as session:
            refs.append(session.get_one(Stage, weak).result["checkpoint"])  # type: ignore[index]
    with session_scope() as session:
        kept = session.scalars(select(CheckpointHold.stage_id).where(CheckpointHold.team_id == team.team_id))
        assert sorted(kept) == sorted(weaks[1:])
        oldest = session.get_one(Stage, weaks[0]).result
    assert not checkpoint_file(refs[0]).exists()  # removed from the store, not only forgotten
    assert all(checkpoint_file(ref).exists() for ref in refs[1:])
    # The oldest stage's result no longer names a file that is gone: it says what happened.
    assert oldest is not None and oldest["checkpoint"] is None
    assert "last 2" in oldest["checkpoint_removed"]
    held = usage(client, team)
    assert held["checkpoints_bytes"] == sum(checkpoint_file(ref).stat().st_size for ref in refs[1:])


def test_over_its_quota_a_team_is_refused_new_work_with_the_reason(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    team, other = make_team(), make_team()
    client.patch(f"/v1/admin/teams/{team.team_id}", json={"storage_quota_mb": 1}, headers=ADMIN_HEADERS)
    first = client.post("/v1/jobs", json=tiny_job(tiny_bert, tiny_bert), headers=team.headers).json()["id"]
    with session_scope() as session:  # a checkpoint of 2 MiB one of its stages holds
        weak = session.scalars(select(Stage.id).where(Stage.job_id == first, Stage.kind == "weak")).one()
        session.add(
            CheckpointHold(
                stage_id=weak, team_id=team.team_id, stage_key="k" * 64, uri="mem#blobs/x", size_bytes=2 * MB
            )
        )
    refused = client.post("/v1/jobs", json=tiny_job(tiny_bert, tiny_bert), headers=team.headers)
    assert refused.status_code == 422
    detail = refused.json()["detail"]
    assert "storage_quota_mb" in str(refused.json()) and "checkpoints 2.0 MB" in detail
    assert "DELETE /v1/datasets" in detail
    upload = client.post(
        "/v1/datasets",
        files={
            "file": ("d.jsonl", b"".join(b'{"text": "t%d", "label": %d}\n' % (i, i % 2) for i in range(12)))
        },
        headers=team.headers,
    )
    assert upload.status_code == 422 and "storage" in upload.text
    sweep = client.post(
        "/v1/sweeps",
        json={
            "dataset": {"name": "sst2", "n_train": 64, "n_test": 32},
            "weak_models": [str(tiny_bert)],
            "strong_models": [str(tiny_bert)],
        },
        headers=team.headers,
    )
    assert sweep.status_code == 422 and "storage" in sweep.text, sweep.text
    # Another team is not affected; the admin sees why.
    assert (
        client.post("/v1/jobs", json=tiny_job(tiny_bert, tiny_bert), headers=other.headers).status_code == 201
    )
    page = client.get("/v1/teams/me/usage", headers=team.headers).json()["storage"]
    assert page["used_bytes"] == 2 * MB and page["quota_bytes"] == 1 * MB
    login(client, team.key)  # the dashboard's team page shows the same
    html = client.get("/team").text
    assert "Storage" in html and "2.0 MiB" in html and "1.0 MiB" in html and "checkpoints 2.0 MiB" in html

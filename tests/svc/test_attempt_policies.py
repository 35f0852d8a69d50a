"""Policies hold at every attempt, not only at submission (issue 18): a job submitted under rules an
administrator has since tightened (remote code forbidden, a model root removed) does not run a
stage, and a retry of an old job is validated under today's rules. Before, a job submitted with
trust_remote_code, cancelled, then retried after an admin forbade remote code ran the model's code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ADMIN_KEY
from fastapi.testclient import TestClient

from service.db import reset_caches
from svc_support import Steps, tiny_job

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def remote_code_job(client: TestClient, team, tiny_bert: Path) -> str:  # type: ignore[no-untyped-def]
    client.patch(f"/v1/admin/teams/{team.team_id}", json={"allow_trust_remote_code": True}, headers=ADMIN)
    body = tiny_job(tiny_bert, tiny_bert)
    body["weak"]["trust_remote_code"] = True
    response = client.post("/v1/jobs", json=body, headers=team.headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_a_retry_obeys_todays_rules(client: TestClient, make_team, tiny_bert: Path) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    job_id = remote_code_job(client, team, tiny_bert)
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=team.headers).status_code == 202
    client.patch(f"/v1/admin/teams/{team.team_id}", json={"allow_trust_remote_code": False}, headers=ADMIN)
    refused = client.post(f"/v1/jobs/{job_id}/retry", headers=team.headers)
    assert refused.status_code == 422
    assert [item["loc"][-2:] for item in refused.json()["detail"]] == [["weak", "trust_remote_code"]]
    assert client.get(f"/v1/jobs/{job_id}", headers=team.headers).json()["status"] == "cancelled"


def test_a_queued_job_does_not_run_under_rules_tightened_since(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    job_id = remote_code_job(client, team, tiny_bert)
    client.patch(f"/v1/admin/teams/{team.team_id}", json={"allow_trust_remote_code": False}, headers=ADMIN)
    outcome = Steps().run(job_id)
    assert outcome["status"] == "failed"
    assert "today's rules" in outcome["error"] and "weak.trust_remote_code" in outcome["error"]


def test_a_model_whose_root_was_removed_does_not_run(
    client: TestClient, make_team, tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    response = client.post("/v1/jobs", json=tiny_job(tiny_bert, tiny_bert), headers=team.headers)
    job_id = response.json()["id"]
    monkeypatch.setenv("W2S_MODEL_ROOTS", json.dumps([str(tmp_path / "elsewhere")]))  # an admin moved it
    reset_caches()
    outcome = Steps().run(job_id)
    assert outcome["status"] == "failed" and "no longer under the model roots" in outcome["error"]

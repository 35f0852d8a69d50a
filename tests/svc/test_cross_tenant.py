"""What one team computes, uploads or keeps can be neither removed nor seen by another (issue 28,
items 1-3), attacked as a hostile team would: alpha against beta.

1. Kept checkpoints: alpha and beta share a checkpoint through the stage cache; alpha's "keep the last
   N" rule releases only alpha's hold, beta's weights stay, and once nobody holds them they go (no
   result ever names a missing file; ``w2s-service doctor`` checks it).
2. The stage cache as a membership oracle: results computed from a team's private upload are reused
   only by that team; public inputs stay shared, and nothing in a response reveals another team's run.
3. Uploads write the same bytes whatever another team stored (no "already stored" shortcut to time).

The fast tests run the service's loop in this process (``Steps``); the slow one attacks the live API
with real workers and the dispatcher.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from service import doctor
from service.db import reset_caches, session_scope
from service.models import CheckpointHold, Stage
from service.settings import get_settings
from svc_support import Steps, tiny_job
from w2s.store import ArtifactStore

ADMIN = {"Authorization": "Bearer test-admin-key"}


@pytest.fixture
def one_checkpoint_kept(service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("W2S_CHECKPOINTS_KEPT", "1")
    reset_caches()


def checkpointed(model: Path, seed: int) -> dict[str, Any]:
    """A tiny public job (a model under the operator's roots, the registry's sst2) whose weak stage
    keeps its weights."""
    body = tiny_job(model, model, seeds=[seed])
    body["weak"]["save_checkpoint"] = True
    return body


def run(client: TestClient, team: Any, body: dict[str, Any]) -> str:
    response = client.post("/v1/jobs", json=body, headers=team.headers)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert Steps().run(job_id)["status"] == "succeeded"
    return job_id


def weak_stage(job_id: str) -> Stage:
    with session_scope() as session:
        stage = session.scalars(select(Stage).where(Stage.job_id == job_id, Stage.kind == "weak")).one()
        session.expunge(stage)
        return stage


def store() -> ArtifactStore:
    return ArtifactStore(get_settings().store_uri)


def weights(ref: str) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(store().get_checkpoint(ref)), weights_only=True)


def missing_outputs() -> list[str]:
    with session_scope() as session:
        return [finding.detail for finding in doctor.checkup(session, get_settings(), outputs=True).findings]


def checkpoints_bytes(client: TestClient, team: Any) -> int:
    return int(client.get("/v1/teams/me/usage", headers=team.headers).json()["storage"]["checkpoints_bytes"])


def test_one_teams_retention_never_removes_a_checkpoint_another_team_holds(
    one_checkpoint_kept: None, client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    alpha, beta, gamma = make_team(), make_team(), make_team()
    alphas_first = run(client, alpha, checkpointed(tiny_bert, seed=0))
    betas = run(client, beta, checkpointed(tiny_bert, seed=0))  # the same spec: every stage cached
    assert {s["status"] for s in client.get(f"/v1/jobs/{betas}", headers=beta.headers).json()["stages"]} == {
        "cached"
    }
    shared = weak_stage(betas).result["checkpoint"]  # type: ignore[index]
    assert shared == weak_stage(alphas_first).result["checkpoint"]  # type: ignore[index]
    size = store().checkpoint_size(shared)
    assert checkpoints_bytes(client, beta) == size  # beta keeps them, so beta pays for them

    # The attack: alpha runs two more seeds; it keeps one checkpoint, so it lets go of seed 0's.
    run(client, alpha, checkpointed(tiny_bert, seed=1))
    alphas_last = run(client, alpha, checkpointed(tiny_bert, seed=2))
    assert weak_stage(alphas_first).result["checkpoint"] is None  # type: ignore[index]
    assert "last 1" in weak_stage(alphas_first).result["checkpoint_removed"]  # type: ignore[index]
    assert weak_stage(betas).result["checkpoint"] == shared  # type: ignore[index]
    assert set(weights(shared)) and store().has_checkpoint(shared)  # beta's weights are all there
    kept = weak_stage(alphas_last).result["checkpoint"]  # type: ignore[index]
    # alpha pays for the one checkpoint it keeps, not for the one only beta holds now
    assert checkpoints_bytes(client, alpha) == store().checkpoint_size(kept)
    assert checkpoints_bytes(client, beta) == size
    assert missing_outputs() == []

    # Once beta lets go too, nobody holds it: the file and the stored result naming it are gone,
    # and a later job with the same key trains again instead of naming a missing checkpoint.
    run(client, beta, checkpointed(tiny_bert, seed=1))
    assert not store().has_checkpoint(shared)
    assert weak_stage(betas).result["checkpoint"] is None  # type: ignore[index]
    assert missing_outputs() == []
    again = weak_stage(run(client, gamma, checkpointed(tiny_bert, seed=0)))
    assert again.status == "succeeded" and again.result["checkpoint"] != shared  # type: ignore[index]
    assert set(weights(again.result["checkpoint"])) == set(weights(kept))  # type: ignore[index]
    assert missing_outputs() == []


def test_a_completion_that_loses_the_race_with_a_removal_runs_the_stage_instead(
    one_checkpoint_kept: None, client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    """Planning, or a worker, that read a stored result just before its checkpoint was removed does
    not complete a stage from it (it would name a missing file): the stage is computed again."""
    from w2s.stages import STAGES
    from worker.control import plan_job_task
    from worker.tasks import TransientStageError, execute_stage

    alpha, beta = make_team(), make_team()
    first = run(client, alpha, checkpointed(tiny_bert, seed=0))
    stale = dict(weak_stage(first).result)  # type: ignore[arg-type]
    run(client, alpha, checkpointed(tiny_bert, seed=1))  # nobody else holds seed 0's: removed
    assert not store().has_checkpoint(stale["checkpoint"])
    assert store().get_record(STAGES, stale["key"]) is None
    # What a reader that was a moment earlier holds: the stored result as it was.
    store().put_record(STAGES, stale["key"], stale)

    job_id = client.post("/v1/jobs", json=checkpointed(tiny_bert, seed=0), headers=beta.headers).json()["id"]
    [(planned, token)] = Steps().round().plan
    assert plan_job_task(planned, token) == "done"
    assert weak_stage(job_id).status == "pending"  # planning did not complete it from the stale result
    assert [stage_id for stage_id, _ in Steps().round().admitted] == [weak_stage(job_id).id]
    with pytest.raises(TransientStageError):  # the worker found it, the outcome was refused
        execute_stage(weak_stage(job_id).id, worker="in-process", settings=get_settings())
    assert store().get_record(STAGES, stale["key"]) is None  # ... and the stale result forgotten
    assert weak_stage(job_id).status == "queued"
    assert execute_stage(weak_stage(job_id).id, worker="in-process", settings=get_settings()) == "succeeded"
    assert Steps().run(job_id)["status"] == "succeeded"
    fresh = weak_stage(job_id)
    assert store().has_checkpoint(fresh.result["checkpoint"])  # type: ignore[index]
    with session_scope() as session:
        holders = session.scalars(select(CheckpointHold.team_id).where(CheckpointHold.stage_id == fresh.id))
        assert list(holders) == [beta.team_id]
    assert missing_outputs() == []


def test_a_team_that_only_reuses_checkpoints_keeps_its_last_n_too(
    one_checkpoint_kept: None, client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    """Checkpoints a team holds only through cached completions (no stage of its own ran, so no worker
    pruned) are released by the dispatcher's periodic sweep."""
    from service import checkpoints

    alpha, gamma, beta = make_team(), make_team(), make_team()
    run(client, alpha, checkpointed(tiny_bert, seed=0))
    run(client, gamma, checkpointed(tiny_bert, seed=1))
    betas = [run(client, beta, checkpointed(tiny_bert, seed=seed)) for seed in (0, 1)]  # both cached
    with session_scope() as session:
        assert checkpoints.teams_over(session, 1) == [beta.team_id]
    checkpoints.sweep(store(), 1)
    released = weak_stage(betas[0]).result
    assert released["checkpoint"] is None and "last 1" in released["checkpoint_removed"]  # type: ignore[index]
    assert store().has_checkpoint(weak_stage(betas[1]).result["checkpoint"])  # type: ignore[index]
    with session_scope() as session:
        assert checkpoints.teams_over(session, 1) == []
    assert missing_outputs() == []


def test_doctor_reports_a_result_that_names_a_missing_file(
    client: TestClient, make_team, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    from w2s_service.cli import main

    team = make_team()
    job_id = run(client, team, checkpointed(tiny_bert, seed=0))
    assert main(["doctor"]) == 0
    store().delete_checkpoint(weak_stage(job_id).result["checkpoint"])  # type: ignore[index]
    assert main(["doctor"]) == 2
    out = capsys.readouterr().out
    assert "missing_output" in out and weak_stage(job_id).id in out and "checkpoint" in out
    checkup = client.get("/v1/admin/doctor", headers=ADMIN).json()
    assert [f["problem"] for f in checkup["findings"]] == ["missing_output"]


# ------------------------------------------------------------------------------------------------------
# 2. The stage cache is no membership oracle
# ------------------------------------------------------------------------------------------------------


def upload(client: TestClient, team: Any, content: bytes) -> str:
    response = client.post("/v1/datasets", files={"file": ("private.jsonl", content)}, headers=team.headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def private_rows(n: int = 96) -> bytes:
    words = ["good", "bad"]
    return b"".join(
        json.dumps({"text": f"{words[i % 2]} private sentence number {i}", "label": i % 2 ^ 1}).encode()
        + b"\n"
        for i in range(n)
    )


def on_upload(model: Path, dataset_id: str, mode: str = "full") -> dict[str, Any]:
    body = tiny_job(model, model)
    body["dataset"] = {"name": f"upload:{dataset_id}", "n_train": 64, "n_test": 24}
    for role in ("weak", "strong"):
        body[role]["mode"] = mode
    return body


@pytest.mark.parametrize("mode", ["full", "probe"])
def test_results_from_a_private_upload_are_reused_only_by_its_team(
    client: TestClient, make_team, tiny_bert: Path, mode: str
) -> None:  # type: ignore[no-untyped-def]
    alpha, beta = make_team(), make_team()
    content = private_rows()
    betas = run(client, beta, on_upload(tiny_bert, upload(client, beta, content), mode))
    betas_stage_ids = [
        s["id"] for s in client.get(f"/v1/jobs/{betas}", headers=beta.headers).json()["stages"]
    ]

    # The attack: the same bytes, the same spec, another team.
    alphas = run(client, alpha, on_upload(tiny_bert, upload(client, alpha, content), mode))
    page = client.get(f"/v1/jobs/{alphas}", headers=alpha.headers)
    stages = page.json()["stages"]
    assert {stage["status"] for stage in stages} == {"succeeded"}  # computed, not beta's
    assert all(stage["gpu_seconds"] > 0 for stage in stages)
    for secret in [betas, beta.team_id, *betas_stage_ids]:
        assert secret not in page.text
    assert "original_seconds" not in page.text
    if mode == "probe":  # nor did beta's stored features spare alpha the extraction
        namespaces = {key.split("/")[0] for key in features_namespaces()}
        assert len(namespaces) == 2

    # Within a team the cache works as before, and says what the team's own run took.
    again = run(client, alpha, on_upload(tiny_bert, upload(client, alpha, content), mode))
    stages = client.get(f"/v1/jobs/{again}", headers=alpha.headers).json()["stages"]
    assert {stage["status"] for stage in stages} == {"cached"}
    assert all(stage["metrics"]["original_seconds"] > 0 for stage in stages)


def stage_ids(client: TestClient, team: Any, job_id: str) -> list[str]:
    return [stage["id"] for stage in client.get(f"/v1/jobs/{job_id}", headers=team.headers).json()["stages"]]


def features_namespaces() -> list[str]:
    root = Path(get_settings().store_uri) / "index" / "features"
    return [str(path.relative_to(root)) for path in root.glob("*/*/*.json")]


def test_public_results_are_shared_without_revealing_the_team_that_computed_them(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    alpha, beta = make_team(), make_team()
    betas = run(client, beta, tiny_job(tiny_bert, tiny_bert))
    betas_stage_ids = [
        s["id"] for s in client.get(f"/v1/jobs/{betas}", headers=beta.headers).json()["stages"]
    ]
    alphas = run(client, alpha, tiny_job(tiny_bert, tiny_bert))
    page = client.get(f"/v1/jobs/{alphas}", headers=alpha.headers)
    assert {stage["status"] for stage in page.json()["stages"]} == {"cached"}  # public: shared
    for secret in [betas, beta.team_id, *betas_stage_ids, "original_seconds"]:
        assert secret not in page.text
    metrics = client.get(f"/v1/jobs/{alphas}/metrics", headers=alpha.headers)
    assert metrics.status_code == 200 and all(secret not in metrics.text for secret in betas_stage_ids)
    html = client.get(f"/jobs/{alphas}", headers=alpha.headers)
    assert all(secret not in html.text for secret in [betas, *betas_stage_ids])


# ------------------------------------------------------------------------------------------------------
# 3. No "already stored" shortcut
# ------------------------------------------------------------------------------------------------------


def test_an_upload_writes_its_bytes_whatever_another_team_stored(
    client: TestClient, make_team, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """An upload takes the same path whatever is stored: the bytes are written in full each time,
    so its answer takes as long whether or not another team holds the same bytes."""
    written: list[int] = []
    original_put_file = ArtifactStore.put_named_file
    original_blob_put = ArtifactStore.put_file

    def counting_named(self: ArtifactStore, namespace: str, name: str, local_path: str) -> None:
        written.append(Path(local_path).stat().st_size)
        original_put_file(self, namespace, name, local_path)

    def counting_blob(self: ArtifactStore, local_path: str, digest: str) -> str:
        if not self.fs.exists(self._path("blobs", digest[:2], digest)):  # what the old code skipped
            written.append(Path(local_path).stat().st_size)
        return original_blob_put(self, local_path, digest)

    monkeypatch.setattr(ArtifactStore, "put_named_file", counting_named)
    monkeypatch.setattr(ArtifactStore, "put_file", counting_blob)
    content = private_rows(400)
    beta, alpha = make_team(), make_team()
    upload(client, beta, content)
    upload(client, alpha, content)
    assert written == [len(content), len(content)]


# ------------------------------------------------------------------------------------------------------
# The same attacks on the live service
# ------------------------------------------------------------------------------------------------------


def wait_succeeded(
    api: httpx.Client, team: Any, job_id: str, stack: Any, timeout: float = 240
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            assert job["status"] == "succeeded", f"{job}\n{stack.logs()}"
            return job
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not end in {timeout:.0f} s\n{stack.logs()}")


@pytest.mark.slow
def test_the_attacks_on_the_live_service(
    one_checkpoint_kept: None, live_api: str, stack: Any, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    alpha, beta = make_team(), make_team()
    with httpx.Client(base_url=live_api, timeout=30) as api:

        def submit(team: Any, body: dict[str, Any]) -> dict[str, Any]:
            response = api.post("/v1/jobs", json=body, headers=team.headers)
            assert response.status_code == 201, response.text
            return wait_succeeded(api, team, response.json()["id"], stack)

        # 1. alpha computes and keeps a checkpoint, beta gets it from the cache, alpha moves on.
        submit(alpha, checkpointed(tiny_bert, seed=0))
        betas = submit(beta, checkpointed(tiny_bert, seed=0))
        assert {stage["status"] for stage in betas["stages"]} == {"cached"}
        submit(alpha, checkpointed(tiny_bert, seed=1))
        submit(alpha, checkpointed(tiny_bert, seed=2))
        ref = weak_stage(betas["id"]).result["checkpoint"]  # type: ignore[index]
        assert ref and set(weights(ref))  # beta's weights are still there
        doctor_page = api.get("/v1/admin/doctor", headers=ADMIN).json()
        assert doctor_page["findings"] == [], doctor_page

        # 2. beta trains on its private upload; alpha uploads the same bytes and runs the same spec.
        content = private_rows()
        dataset = api.post("/v1/datasets", files={"file": ("d.jsonl", content)}, headers=beta.headers).json()
        betas_private = submit(beta, on_upload(tiny_bert, dataset["id"]))
        dataset = api.post("/v1/datasets", files={"file": ("d.jsonl", content)}, headers=alpha.headers).json()
        alphas = submit(alpha, on_upload(tiny_bert, dataset["id"]))
        assert {stage["status"] for stage in alphas["stages"]} == {"succeeded"}
        text = json.dumps(alphas)
        assert betas_private["id"] not in text and beta.team_id not in text
        assert "original_seconds" not in text

"""Jobs end to end through a real Celery worker process and the dispatcher process.

Postgres + Redis (the production configuration) for most tests, and the embedded default
(SQLite + filesystem transport, no servers) for one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.db import reset_caches, session_scope
from service.models import MetricPoint, Stage
from svc_support import ROOT, Stack, finished, job_status, tiny_job, wait_for
from w2s.store import ArtifactStore

pytestmark = pytest.mark.slow  # real worker and dispatcher processes


def test_full_job_through_a_celery_worker(
    stack: Stack, client: TestClient, make_team, tiny_bert: Path, tiny_gpt2: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    job_id = client.post(
        "/v1/jobs", json=tiny_job(tiny_bert, tiny_gpt2, losses=["xent", "logconf"]), headers=team.headers
    ).json()["id"]
    job = wait_for(lambda: finished(client, team.headers, job_id), 180, stack, "the job to finish")
    assert job["status"] == "succeeded", stack.logs()
    results = job["results"]
    assert set(results["students"]) == {"xent", "logconf"} and 0 <= results["weak"]["accuracy"] <= 1
    assert all(stage["status"] == "succeeded" and stage["attempts"] == 1 for stage in job["stages"])
    assert all(
        stage["worker"] and stage["gpu_class"] == "cpu" and stage["gpu_seconds"] > 0
        for stage in job["stages"]
    )
    with session_scope() as session:
        points = session.scalars(select(MetricPoint).join(Stage).where(Stage.job_id == job_id)).all()
        assert {point.name for point in points} >= {"loss", "train_accuracy", "lr"}
    metrics = client.get(f"/v1/jobs/{job_id}/metrics", headers=team.headers).json()
    assert {series["name"] for series in metrics["series"]} >= {"loss", "lr"}
    # The live stream: metrics, the stage states, and an end event once the job is over.
    sse = {**team.headers, "Accept": "text/event-stream"}
    with client.stream("GET", f"/v1/jobs/{job_id}/metrics", headers=sse) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        body = "".join(stream.iter_text())
    assert "event: metrics" in body and "event: status" in body and body.rstrip().endswith("data: {}")
    usage = client.get("/v1/teams/me/usage", headers=team.headers).json()
    assert usage["gpu_seconds_total"] == pytest.approx(sum(s["gpu_seconds"] for s in job["stages"]))
    assert job["gpu_seconds"] == pytest.approx(usage["gpu_seconds_total"])


def test_two_jobs_sharing_a_weak_stage_train_it_once(
    stack: Stack, client: TestClient, make_team, tiny_bert: Path, tiny_gpt2: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    first = tiny_job(tiny_bert, tiny_gpt2)
    second = tiny_job(tiny_bert, tiny_gpt2)
    second["strong"]["lr"] = 5e-4  # a different ceiling and student, the same weak stage
    ids = [client.post("/v1/jobs", json=body, headers=team.headers).json()["id"] for body in (first, second)]
    jobs = [wait_for(lambda i=i: finished(client, team.headers, i), 240, stack, "both jobs") for i in ids]
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"], stack.logs()
    weak = [next(s for s in job["stages"] if s["kind"] == "weak") for job in jobs]
    assert weak[0]["stage_key"] == weak[1]["stage_key"]
    assert sorted(stage["status"] for stage in weak) == ["cached", "succeeded"]
    assert sum(stage["attempts"] for stage in weak) == 1  # trained once, never started twice
    assert jobs[0]["results"]["weak"] == jobs[1]["results"]["weak"]


def test_cancel_while_running(
    stack: Stack, client: TestClient, make_team, tiny_bert: Path, service_env: dict[str, str]
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    body = tiny_job(tiny_bert, tiny_bert)
    body["weak"]["epochs"] = 400  # long enough to be caught running
    job_id = client.post("/v1/jobs", json=body, headers=team.headers).json()["id"]

    def weak_training() -> bool:
        weak = job_status(client, team.headers, job_id)["stages"][0]
        return weak["status"] == "running" and weak["step"] > 0

    wait_for(weak_training, 120, stack, "the weak stage to train")
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=team.headers).json()["status"] == "cancelled"
    weak = wait_for(
        lambda: (s := job_status(client, team.headers, job_id)["stages"][0])["status"] == "cancelled" and s,
        60,
        stack,
        "the running stage to stop",
    )
    assert weak["step"] < weak["total_steps"]
    assert ArtifactStore(service_env["W2S_ARTIFACT_STORE"]).get_record("stages", weak["stage_key"]) is None
    assert {s["status"] for s in job_status(client, team.headers, job_id)["stages"]} == {"cancelled"}


def test_retry_after_failure(
    stack: Stack, client: TestClient, make_team, tiny_bert: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    broken = tmp_path / "model-being-copied"
    broken.mkdir()  # exists, so the spec is valid, but holds no model yet
    job_id = client.post("/v1/jobs", json=tiny_job(broken, tiny_bert), headers=team.headers).json()["id"]
    job = wait_for(lambda: finished(client, team.headers, job_id), 120, stack, "the job to fail")
    # Planning reads the model's tokenizer (to find over-long rows), so the job fails before any
    # stage trains.
    assert job["status"] == "failed" and "cannot load" in job["error"], job
    assert all(stage["status"] == "cancelled" for stage in job["stages"])
    shutil.rmtree(broken)
    shutil.copytree(tiny_bert, broken)  # the model arrives: the same spec now works
    assert client.post(f"/v1/jobs/{job_id}/retry", headers=team.headers).json()["status"] == "queued"
    job = wait_for(lambda: finished(client, team.headers, job_id), 180, stack, "the retried job")
    assert job["status"] == "succeeded", stack.logs()


def test_embedded_default_runs_a_job_with_no_servers(
    tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.main import create_app
    from helpers import write_sst2_like
    from service.auth import create_api_key, create_team

    env = {
        "W2S_STATE_DIR": str(tmp_path / "state"),
        "W2S_ARTIFACT_STORE": str(tmp_path / "state" / "store"),
        "W2S_DATA_DIR": str(write_sst2_like(tmp_path / "data")),
        "W2S_DISPATCH_INTERVAL_S": "0.2",
        "W2S_ENVIRONMENT": "development",  # as `w2s-service dev` runs it
        "W2S_MODEL_ROOTS": json.dumps([str(tiny_bert.parent)]),
    }
    for key in (
        "W2S_DATABASE_URL",
        "W2S_BROKER_URL",
        "W2S_QUEUE_SLOTS",
        "W2S_ADMIN_KEY",
        "W2S_SESSION_SECRET",
    ):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_caches()
    subprocess.run(
        [sys.executable, "-m", "w2s_service.cli", "migrate"],
        env={**os.environ, **env},
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (tmp_path / "logs").mkdir()
    embedded = Stack(env, tmp_path / "logs")
    embedded.start("worker", "--queue", "cpu")
    embedded.start("worker", "--queue", "control")
    embedded.start("dispatcher")
    try:
        with session_scope() as session:
            team = create_team(session, name="laptop")
            _, key = create_api_key(session, team=team)
        headers = {"Authorization": f"Bearer {key}"}
        with TestClient(create_app()) as client:
            assert client.get("/readyz").status_code == 200
            job_id = client.post("/v1/jobs", json=tiny_job(tiny_bert, tiny_bert), headers=headers).json()[
                "id"
            ]
            job = wait_for(lambda: finished(client, headers, job_id), 180, embedded, "the embedded job")
        assert job["status"] == "succeeded", embedded.logs()
        assert (tmp_path / "state" / "service.db").is_file()
    finally:
        embedded.stop()
        reset_caches()

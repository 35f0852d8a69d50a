"""Faults: workers killed mid-stage, Redis restarted, Postgres stopped, the API restarted, and a
stage that keeps failing, each against real processes (Celery worker, dispatcher, uvicorn) on a
private Redis (and, for the outage, a private Postgres) so the shared servers are never disturbed.

Timings are shortened through settings (heartbeat, redelivery, backoff); the outage length comes
from ``W2S_FAULT_PG_OUTAGE_S`` (default 30 s, as the issue asks). bench/fault_soak.py loops these.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from alembic import command
from fastapi.testclient import TestClient
from fault_support import PG_BIN, PrivatePostgres, PrivateRedis, ServiceProcesses, free_port, wait_until
from sqlalchemy import func, select

from service.auth import create_api_key, create_team
from service.db import reset_caches, session_scope
from service.models import Artifact, LogLine, MetricPoint, Stage
from svc_support import alembic_config
from w2s.pipeline import run_experiment
from w2s.spec import JobSpec
from w2s.store import ArtifactStore

pytestmark = pytest.mark.slow  # real processes killed and restarted, private Postgres and Redis

FAST_RECOVERY = {
    "W2S_QUEUE_SLOTS": '{"cpu": 1}',
    "W2S_PROGRESS_FLUSH_S": "0.2",
    "W2S_DISPATCH_INTERVAL_S": "0.2",
    "W2S_HEARTBEAT_INTERVAL_S": "0.5",
    "W2S_HEARTBEAT_TIMEOUT_S": "4",
    "W2S_REDELIVER_AFTER_S": "4",
    "W2S_RETRY_BACKOFF_S": "0.5",
}
PG_OUTAGE_S = float(os.environ.get("W2S_FAULT_PG_OUTAGE_S", "30"))
FINAL = ("succeeded", "failed", "cancelled")


def long_job(weak: Path, strong: Path, long_stage: str = "weak") -> dict[str, Any]:
    """Tiny models; ``long_stage`` (weak, ceiling, or none) gets enough steps to be interrupted in the
    middle (a few seconds), the other stages few, to keep the test short."""
    options = {"lr": 1e-3, "batch_size": 8, "max_length": 32}
    return {
        "dataset": {"name": "sst2", "n_train": 160, "n_test": 60},
        "weak": {"model": str(weak), **options, "epochs": 25 if long_stage == "weak" else 2},
        "strong": {"model": str(strong), **options, "epochs": 25 if long_stage == "ceiling" else 2},
        "transfer": {"epochs": 2},
        "losses": ["xent"],
        "seeds": [0],
    }


class Cluster:
    """A private Redis, a worker and a dispatcher, and the API in-process, on the test's database."""

    def __init__(
        self,
        env: dict[str, str],
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        overrides: dict[str, str] | None = None,
    ):
        self.redis = PrivateRedis()
        self.env = {**env, **FAST_RECOVERY, "W2S_BROKER_URL": self.redis.url, **(overrides or {})}
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        reset_caches()
        self.processes = ServiceProcesses(self.env, tmp_path / "logs")
        from api.main import create_app

        self.client = TestClient(create_app())
        with session_scope() as session:
            team = create_team(session, name="faults")
            _, key = create_api_key(session, team=team)
        self.headers = {"Authorization": f"Bearer {key}"}

    def start_worker(self, name: str = "worker", env: dict[str, str] | None = None) -> None:
        self.processes.start(name, "worker", "--queue", "cpu", env=env)

    def start_dispatcher(self) -> None:
        self.processes.start("control", "worker", "--queue", "control")
        self.processes.start("dispatcher", "dispatcher")

    def submit(self, body: dict[str, Any]) -> str:
        response = self.client.post("/v1/jobs", json=body, headers=self.headers)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.client.get(f"/v1/jobs/{job_id}", headers=self.headers)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait_finished(self, job_id: str, timeout: float = 240) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["status"] in FINAL else None

        return dict(wait_until(finished, timeout, f"job {job_id} to finish", self.processes.logs))

    def wait_running_mid_stage(self, job_id: str, kind: str, timeout: float = 120) -> dict[str, Any]:
        """Until ``kind`` has run some steps but is far from done."""

        def mid() -> dict[str, Any] | None:
            stage = next(s for s in self.job(job_id)["stages"] if s["kind"] == kind)
            total = stage["total_steps"] or 0
            return stage if stage["status"] == "running" and 0 < stage["step"] < total / 2 else None

        return dict(wait_until(mid, timeout, f"{kind} to be mid-stage", self.processes.logs))

    def close(self) -> None:
        self.client.close()
        self.processes.stop_all()
        self.redis.stop()


@pytest.fixture
def cluster(
    service_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Cluster]:
    running = Cluster(service_env, tmp_path, monkeypatch)
    yield running
    running.close()


def reference_results(job: dict[str, Any], data_dir: str, tmp_path: Path) -> dict[str, Any]:
    """The same spec run uninterrupted by the library, in a store of its own."""
    spec = JobSpec.model_validate(job["spec"])
    experiment = run_experiment(
        spec, store=ArtifactStore(str(tmp_path / "reference")), data_dir=Path(data_dir)
    )
    return experiment.results


def figures(results: dict[str, Any]) -> dict[str, float]:
    out = {
        f"{model}.{name}": results[model][name]
        for model in ("weak", "ceiling")
        for name in ("accuracy", "auroc")
    }
    for loss, student in results["students"].items():
        out |= {f"{loss}.{name}": student[name] for name in ("accuracy", "auroc", "pgr")}
    return out


def assert_no_duplicate_rows(job: dict[str, Any]) -> None:
    stage_ids = [stage["id"] for stage in job["stages"]]
    keys = [stage["stage_key"] for stage in job["stages"]]
    with session_scope() as session:
        assert len(set(session.scalars(select(Stage.id).where(Stage.job_id == job["id"])))) == len(stage_ids)
        artifacts = session.execute(
            select(Artifact.stage_key, Artifact.name).where(Artifact.stage_key.in_(keys))
        )
        rows = list(artifacts)
        assert len(rows) == len(set(rows))
        for stage_id in stage_ids:
            points = session.execute(
                select(MetricPoint.name, MetricPoint.step).where(MetricPoint.stage_id == stage_id)
            ).all()
            assert len(points) == len(set(points)), f"duplicate metric points for stage {stage_id}"


def assert_complete_curves(job: dict[str, Any]) -> None:
    """Every step of every stage has its loss point: nothing written during a fault was lost."""
    with session_scope() as session:
        for stage in job["stages"]:
            steps = session.scalar(
                select(func.count())
                .select_from(MetricPoint)
                .where(MetricPoint.stage_id == stage["id"], MetricPoint.name == "loss")
            )
            assert steps == stage["total_steps"], (stage["kind"], steps, stage["total_steps"])


def test_worker_killed_mid_stage_is_redelivered_and_matches_an_uninterrupted_run(
    cluster: Cluster, service_env: dict[str, str], tiny_bert: Path, tiny_gpt2: Path, tmp_path: Path
) -> None:
    cluster.start_worker("worker-1")
    cluster.start_dispatcher()
    job_id = cluster.submit(long_job(tiny_bert, tiny_gpt2, long_stage="ceiling"))
    cluster.wait_running_mid_stage(job_id, "ceiling")
    cluster.processes.kill("worker-1")  # kill -9, task child included: no ack, no last write
    cluster.start_worker("worker-2")

    job = cluster.wait_finished(job_id)
    assert job["status"] == "succeeded", cluster.processes.logs()
    ceiling = next(stage for stage in job["stages"] if stage["kind"] == "ceiling")
    assert ceiling["attempts"] == 2 and ceiling["status"] == "succeeded"
    assert all(stage["attempts"] == 1 for stage in job["stages"] if stage["kind"] != "ceiling")
    with session_scope() as session:
        messages = session.scalars(select(LogLine.message).where(LogLine.stage_id == ceiling["id"])).all()
    assert any("no heartbeat" in message and "requeued" in message for message in messages), messages
    assert_no_duplicate_rows(job)
    assert_complete_curves(job)
    expected = figures(reference_results(job, service_env["W2S_DATA_DIR"], tmp_path))
    assert figures(job["results"]) == pytest.approx(expected, abs=1e-9)


def test_redis_restart_while_jobs_run(cluster: Cluster, tiny_bert: Path, tiny_gpt2: Path) -> None:
    cluster.start_worker()
    cluster.start_dispatcher()
    first = cluster.submit(long_job(tiny_bert, tiny_gpt2))
    second = cluster.submit({**long_job(tiny_gpt2, tiny_bert, long_stage="none"), "seeds": [1]})
    cluster.wait_running_mid_stage(first, "weak")
    cluster.redis.restart()  # no persistence: every queued and unacknowledged message is gone

    for job_id in (first, second):
        job = cluster.wait_finished(job_id)
        assert job["status"] == "succeeded", cluster.processes.logs()
        assert_no_duplicate_rows(job)
        assert_complete_curves(job)


def test_api_restart_mid_job_changes_nothing(cluster: Cluster, tiny_bert: Path, tiny_gpt2: Path) -> None:
    cluster.start_worker()
    cluster.start_dispatcher()
    port = free_port()
    api = f"http://127.0.0.1:{port}"

    def api_up() -> bool:
        try:
            return httpx.get(f"{api}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    cluster.processes.start("api", "api", "--port", str(port))
    wait_until(api_up, 30, "the API", cluster.processes.logs)
    # Generous timeouts: this box may be busy, and the point is the restart, not latency.
    body = long_job(tiny_bert, tiny_gpt2)
    response = httpx.post(f"{api}/v1/jobs", json=body, headers=cluster.headers, timeout=60)
    job_id = response.json()["id"]
    before = cluster.wait_running_mid_stage(job_id, "weak")
    cluster.processes.kill("api")
    cluster.processes.start("api", "api", "--port", str(port))
    wait_until(api_up, 30, "the API again", cluster.processes.logs)

    job = httpx.get(f"{api}/v1/jobs/{job_id}", headers=cluster.headers, timeout=60).json()
    assert job["status"] == "running" and job["stages"][0]["attempts"] == before["attempts"] == 1
    job = cluster.wait_finished(job_id)
    assert job["status"] == "succeeded"
    assert all(stage["attempts"] == 1 for stage in job["stages"])
    assert_complete_curves(job)


def test_a_stage_that_keeps_failing_stops_after_bounded_attempts(
    cluster: Cluster, tiny_bert: Path, tmp_path: Path
) -> None:
    # The worker's artifact store sits under a regular file: every attempt fails with an OSError,
    # the kind of error that is retried (a full or unmounted disk looks the same).
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    cluster.start_worker(env={"W2S_ARTIFACT_STORE": str(blocker / "store")})
    cluster.start_dispatcher()
    job_id = cluster.submit(long_job(tiny_bert, tiny_bert, long_stage="none"))

    job = cluster.wait_finished(job_id, timeout=120)
    assert job["status"] == "failed"
    weak = job["stages"][0]
    assert weak["status"] == "failed" and weak["attempts"] == 3  # W2S_MAX_STAGE_ATTEMPTS's default
    assert weak["error"].startswith("gave up after 3 attempts") and "Error" in weak["error"]
    assert "gave up after 3 attempts" in job["error"]
    assert all(stage["status"] == "cancelled" for stage in job["stages"][1:])


@pytest.fixture
def private_postgres(
    service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[PrivatePostgres]:
    if PG_BIN is None:
        pytest.skip("no Postgres server binaries to run a private cluster")
    server = PrivatePostgres()
    command.upgrade(alembic_config(server.url), "head")
    yield server
    reset_caches()
    server.destroy()
    # service_env's teardown truncates the shared test database: point it back there.
    monkeypatch.undo()
    for key, value in service_env.items():
        os.environ[key] = value
    reset_caches()


def test_postgres_stopped_then_back_loses_nothing(
    private_postgres: PrivatePostgres,
    service_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_bert: Path,
    tiny_gpt2: Path,
) -> None:
    # The heartbeat timeout outlasts the outage: a worker that could not report in is not presumed dead.
    overrides = {"W2S_DATABASE_URL": private_postgres.url, "W2S_HEARTBEAT_TIMEOUT_S": str(PG_OUTAGE_S + 60)}
    outage = Cluster(service_env, tmp_path, monkeypatch, overrides)
    try:
        outage.start_worker()
        outage.start_dispatcher()
        job_id = outage.submit(long_job(tiny_bert, tiny_gpt2))
        outage.wait_running_mid_stage(job_id, "weak")
        private_postgres.stop()
        for path in (f"/v1/jobs/{job_id}", "/v1/jobs", "/readyz"):
            response = outage.client.get(path, headers=outage.headers)
            assert response.status_code == 503, (path, response.text)
            body = response.json()
            assert "database" in str(body) and "Traceback" not in response.text, body
        response = outage.client.post("/v1/jobs", json=long_job(tiny_bert, tiny_gpt2), headers=outage.headers)
        assert response.status_code == 503 and response.headers.get("Retry-After")
        # The worker keeps training through the outage and holds its points; the weak stage ends in it.
        time.sleep(PG_OUTAGE_S)
        private_postgres.start()

        job = outage.wait_finished(job_id)
        assert job["status"] == "succeeded", outage.processes.logs()
        assert all(stage["attempts"] == 1 for stage in job["stages"]), job["stages"]
        assert_no_duplicate_rows(job)
        assert_complete_curves(job)
        assert np.isfinite(job["results"]["students"]["xent"]["accuracy"])
    finally:
        outage.close()


def test_a_standby_dispatcher_takes_over_when_the_other_dies(
    cluster: Cluster, tiny_bert: Path, tiny_gpt2: Path
) -> None:
    """Two dispatchers for availability: each round holds a Postgres advisory lock (never two rounds
    at once), so the standby's next round, within its interval, carries on after the other is killed."""
    cluster.start_worker()
    cluster.processes.start("control", "worker", "--queue", "control")
    cluster.processes.start("dispatcher-a", "dispatcher")
    cluster.processes.start("dispatcher-b", "dispatcher")
    job_id = cluster.submit(long_job(tiny_bert, tiny_gpt2, long_stage="weak"))
    cluster.wait_running_mid_stage(job_id, "weak")
    cluster.processes.kill("dispatcher-a")
    job = cluster.wait_finished(job_id)
    assert job["status"] == "succeeded", cluster.processes.logs()
    assert all(stage["attempts"] == 1 for stage in job["stages"])

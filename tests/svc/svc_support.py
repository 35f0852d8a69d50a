"""Shared by the service tests: where the test Postgres is, how to point Alembic at a database, a
tiny job's spec, and real service processes (``Stack``) with ways to wait on them."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.config import Config
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("W2S_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = url
    config.attributes["configure_logger"] = False
    return config


REDIS_DB = 15


def tiny_job(weak: Path, strong: Path, **overrides: Any) -> dict[str, Any]:
    options = {"epochs": 1, "lr": 1e-3, "batch_size": 16, "max_length": 32}
    body: dict[str, Any] = {
        "dataset": {"name": "sst2", "n_train": 64, "n_test": 32},
        "weak": {"model": str(weak), **options},
        "strong": {"model": str(strong), **options},
        "losses": ["xent"],
        "seeds": [0],
    }
    body.update(overrides)
    return body


class Stack:
    """A worker process and a dispatcher process with the test's settings."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env = {**os.environ, **env}
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> None:
        log = open(self.log_dir / f"{args[0]}-{len(self.processes)}.log", "wb")  # noqa: SIM115
        command = [sys.executable, "-m", "w2s_service.cli", *args]
        self.processes.append(subprocess.Popen(command, env=self.env, cwd=ROOT, stdout=log, stderr=log))

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.log_dir.glob("*.log")))


def wait_for(condition: Callable[[], Any], timeout: float, stack: Stack, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}\n{stack.logs()}")


def job_status(client: TestClient, headers: dict[str, str], job_id: str) -> dict[str, Any]:
    return client.get(f"/v1/jobs/{job_id}", headers=headers).json()


def finished(client: TestClient, headers: dict[str, str], job_id: str) -> dict[str, Any] | None:
    job = job_status(client, headers, job_id)
    return job if job["status"] in ("succeeded", "failed", "cancelled") else None


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


def login(client: TestClient, key: str, next_url: str = "/") -> Any:
    """Sign in to the dashboard with ``key`` (the response is the login form's redirect)."""
    token = csrf_of(client.get("/login").text)
    return client.post(
        "/login", data={"api_key": key, "csrf": token, "next": next_url}, follow_redirects=False
    )


class Steps:
    """Run the service's loop by hand: dispatch rounds, control tasks, stages."""

    def round(self) -> Any:
        from service.db import session_scope
        from service.dispatch import dispatch_round
        from service.settings import get_settings

        with session_scope() as session:
            return dispatch_round(session, get_settings())

    def run(self, job_id: str, rounds: int = 12) -> dict[str, Any]:
        from service.db import session_scope
        from service.models import Job
        from service.settings import get_settings
        from worker.control import finish_job_task, plan_job_task
        from worker.tasks import execute_stage

        settings = get_settings()
        for _ in range(rounds):
            report = self.round()
            for job_id_, token in report.plan:
                plan_job_task(job_id_, token)
            for job_id_, token in report.finish:
                finish_job_task(job_id_, token)
            for stage_id, _queue in report.admitted:
                execute_stage(stage_id, worker="in-process", settings=settings)
            with session_scope() as session:
                job = session.get(Job, job_id)
                if job is not None and job.status in ("succeeded", "failed", "cancelled"):
                    return {"status": job.status, "error": job.error, "results": job.results}
        raise AssertionError(f"job {job_id} did not end in {rounds} rounds")


@contextlib.contextmanager
def live_api_server(env: dict[str, str], log_path: Path, command: list[str] | None = None) -> Iterator[str]:
    """A real uvicorn serving the API with ``env``; its base URL. ``command``: how to start it (it is
    given ``--host`` and ``--port``); by default uvicorn itself, logging warnings only."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(log_path, "wb")  # noqa: SIM115 (closed below)
    if command is None:
        command = [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory"]
        command += ["--log-level", "warning"]
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the API did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def queued_weak(job_id: str) -> str:
    """A planned job's weak stage, put in the queue as the dispatcher would (the test then runs it
    with ``execute_stage``); its id."""
    from sqlalchemy import select

    from service.db import session_scope
    from service.models import Stage

    with session_scope() as session:
        weak = session.scalars(select(Stage).where(Stage.job_id == job_id, Stage.kind == "weak")).one()
        weak.status = "queued"
        return weak.id

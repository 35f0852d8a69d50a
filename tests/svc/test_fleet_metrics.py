"""Metrics for a fleet: the API's /metrics counts every server process's requests (Prometheus
multiprocess mode), and the dispatcher and each worker serve their own on W2S_METRICS_PORT (issue:
/metrics came from one API process only, and the dispatcher and workers exposed nothing)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN_KEY

from svc_support import ROOT, tiny_job

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def total(text: str, metric: str, **labels: str) -> float:
    """The sum of ``metric``'s samples whose labels include ``labels``."""
    found = 0.0
    for line in text.splitlines():
        match = re.match(rf"{metric}(\{{[^}}]*\}})? ([0-9.e+-]+)$", line)
        if match and all(f'{key}="{value}"' in (match.group(1) or "") for key, value in labels.items()):
            found += float(match.group(2))
    return found


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer")


@pytest.mark.slow
def test_every_api_process_is_counted_whichever_answers_the_scrape(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    env = {**service_env, "W2S_API_WORKERS": "2"}
    log = open(tmp_path / "api.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "w2s_service.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env={**__import__("os").environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz")
        sent = 60
        for _ in range(sent):  # a new connection each: the kernel spreads them over both processes
            assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        for _ in range(6):  # each scrape may be answered by either process: all say the same
            text = httpx.get(f"{url}/metrics", headers=ADMIN, timeout=10).text
            assert total(text, "w2s_http_requests_total", route="/healthz", status="200") >= sent
        assert "w2s_jobs" in text  # the database's counts, read at the scrape
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_the_dispatcher_and_a_worker_serve_their_metrics(
    service_env: dict[str, str], tmp_path: Path, tiny_bert: Path
) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from service.auth import create_api_key, create_team
    from service.db import session_scope
    from svc_support import Stack

    dispatcher_port, worker_port = free_port(), free_port()
    stack = Stack({**service_env}, tmp_path)
    try:
        stack.env["W2S_METRICS_PORT"] = "0"  # none
        stack.start("worker", "--queue", "control")
        stack.env["W2S_METRICS_PORT"] = str(dispatcher_port)
        stack.start("dispatcher")
        stack.env["W2S_METRICS_PORT"] = str(worker_port)
        stack.env["W2S_LOG_FORMAT"] = "json"
        stack.start("worker", "--queue", "cpu")
        wait_http(f"http://127.0.0.1:{worker_port}/metrics")
        with session_scope() as session:
            team = create_team(session, name="metrics")
            _, key = create_api_key(session, team=team)
        with TestClient(create_app()) as client:
            job_id = client.post(
                "/v1/jobs", json=tiny_job(tiny_bert, tiny_bert), headers={"Authorization": f"Bearer {key}"}
            ).json()["id"]
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                status = client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}).json()[
                    "status"
                ]
                if status in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.5)
        assert status == "succeeded", stack.logs()
        dispatcher = httpx.get(f"http://127.0.0.1:{dispatcher_port}/metrics", timeout=10).text
        assert total(dispatcher, "w2s_dispatch_rounds_total", outcome="run") > 0
        assert total(dispatcher, "w2s_stages_admitted_total", queue="cpu") >= 3
        assert total(dispatcher, "w2s_stage_admission_wait_seconds_count", queue="cpu") >= 3
        assert 'w2s_queue_ready_stages{queue="cpu"}' in dispatcher
        worker = httpx.get(f"http://127.0.0.1:{worker_port}/metrics", timeout=10).text
        assert total(worker, "w2s_stage_attempts_total", queue="cpu", outcome="succeeded") >= 3
        assert total(worker, "w2s_stage_seconds_count", queue="cpu") >= 3
        # Its log is JSON lines, each about a stage naming it.
        lines = [
            json.loads(line)
            for line in (tmp_path / "worker-2.log").read_text().splitlines()
            if line.startswith("{")
        ]
        started = [line for line in lines if "attempt 1 started" in line["message"]]
        assert len(started) >= 3 and all(line["job_id"] == job_id and line["stage_id"] for line in started)
    finally:
        stack.stop()

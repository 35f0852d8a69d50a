"""A cluster, not a host: simulated hosts (the API; the dispatcher and the control worker; two stage
workers), each a Linux mount namespace in which the whole filesystem is read-only but its own
bounded tmpfs (its state dir, caches, home and temporary files). They share only Postgres, Redis and an
S3-compatible server (moto's, behind a proxy the test can take down). The network is the machine's
(127.0.0.1): this sandbox gives the namespaces no addresses of their own.

One test, three jobs on an uploaded dataset and a pushed model:
1. the stages run on both worker hosts and the results equal a one-host run of the library;
2. one worker host cut off (frozen with SIGSTOP) for 30 s mid-stage: its stage is requeued to the
   other host and the job succeeds; the cut-off host's late writes are fenced out;
3. the store down for 60 s mid-job: the job waits and succeeds without spending an attempt.
That no host writes anything but its cache holds by construction (everything else is read-only to
it: a write would fail the host's work, and with it the test).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import ADMIN_KEY
from test_faults import figures

from helpers import OutageProxy, S3Server
from svc_support import REDIS_DB, ROOT

pytestmark = pytest.mark.slow

FINAL = ("succeeded", "failed", "cancelled")
# The host's own filesystem, a bounded tmpfs mounted on its folder ($0): the only place it may write
# (the rest of the machine's filesystem is read-only to it; the code and venv stay readable wherever
# the checkout is, /tmp included).
HOST_SETUP = (
    'mount -o remount,bind,ro / && mount -t tmpfs -o size=3g tmpfs "$0" && '
    'mkdir -p "$0/state" "$0/home" "$0/tmp" && exec "$@"'
)


def namespaces_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


class Host:
    """A process in a mount namespace of its own: read-only everywhere but its tmpfs."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, root: Path):
        self.name = name
        own = root / name  # the mount point exists before the filesystem turns read-only
        own.mkdir(parents=True)
        host_env = {
            **env,
            "HOME": f"{own}/home",
            "TMPDIR": f"{own}/tmp",
            "W2S_STATE_DIR": f"{own}/state",
            "W2S_MODEL_CACHE_DIR": f"{own}/state/models",
            "W2S_MODEL_CACHE_GB": "1",
            "HF_HOME": f"{own}/home/hf",
            "MPLCONFIGDIR": f"{own}/home/mpl",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        self.log = log_dir / f"{name}.log"
        command = ["unshare", "-m", "--propagation", "private", "sh", "-c", HOST_SETUP, str(own)]
        self.process = subprocess.Popen(
            [*command, sys.executable, "-m", "w2s_service.cli", *args],
            cwd=ROOT,
            env={**os.environ, **host_env},
            stdout=open(self.log, "wb"),  # noqa: SIM115  (the child owns it)
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:  # unshare and sh exec: the service's own pid
        return self.process.pid

    def freeze(self) -> None:
        os.killpg(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGCONT)
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def wait_until(what: str, condition: Any, timeout: float, hosts: list[Host]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    logs = "\n".join(f"== {h.name}\n{h.log.read_text(errors='replace')[-3000:]}" for h in hosts)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def rows(n: int) -> bytes:
    words = ["good", "great", "fine", "bad", "awful", "dull"]
    return "".join(
        json.dumps(
            {"text": f"the film was {words[i % 6]} and {words[(i * 7) % 6]} {i}", "label": int(i % 6 < 3)}
        )
        + "\n"
        for i in range(n)
    ).encode()


@pytest.fixture
def cluster_env(service_env: dict[str, str], s3_outage: OutageProxy, s3_env: S3Server) -> dict[str, str]:
    if not namespaces_available():
        pytest.skip("needs root and unshare (Linux mount namespaces) to simulate hosts")
    prefix = f"w2s-hosts-{uuid.uuid4().hex[:8]}:"
    yield {
        "W2S_DATABASE_URL": service_env["W2S_DATABASE_URL"],
        "W2S_BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "W2S_BROKER_KEY_PREFIX": prefix,
        "W2S_ARTIFACT_STORE": s3_env.new_bucket(),
        "W2S_STORE_ENDPOINT_URL": s3_outage.url,
        "W2S_STORE_REGION": "us-east-1",
        "W2S_STORE_RETRY_S": "3",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "W2S_ADMIN_KEY": ADMIN_KEY,
        "W2S_SESSION_SECRET": "test-session-secret",
        "W2S_MODEL_ROOTS": "[]",
        "W2S_QUEUE_SLOTS": '{"cpu": 2}',
        "W2S_PROGRESS_FLUSH_S": "0.3",
        "W2S_DISPATCH_INTERVAL_S": "0.3",
        "W2S_HEARTBEAT_INTERVAL_S": "0.5",
        "W2S_HEARTBEAT_TIMEOUT_S": "5",
        "W2S_REDELIVER_AFTER_S": "5",
        "W2S_RETRY_BACKOFF_S": "0.5",
        "HF_HUB_OFFLINE": "1",
    }
    client = redis.Redis(db=REDIS_DB)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def test_a_job_runs_across_hosts_that_share_only_postgres_redis_and_s3(
    cluster_env: dict[str, str],
    s3_outage: OutageProxy,
    tiny_bert: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from service.db import reset_caches
    from w2s.pipeline import run_experiment
    from w2s.spec import parse_spec
    from w2s.store import ArtifactStore
    from w2s_service.cli import main

    for key, value in cluster_env.items():
        monkeypatch.setenv(key, value)
    reset_caches()
    # The operator pushes the model once; no host has it on disk.
    assert main(["models", "push", str(tiny_bert)]) == 0
    model = capsys.readouterr().out.strip().splitlines()[-1]
    port = 18000 + os.getpid() % 1000
    logs = tmp_path / "logs"
    logs.mkdir()
    # Short: a host's temporary folder holds Unix sockets (the stage process's fork server), whose
    # paths may not exceed 107 bytes; pytest's tmp_path can be longer.
    roots = Path(tempfile.mkdtemp(prefix="w2s-hosts-"))
    hosts = [
        Host("api", ["api", "--host", "127.0.0.1", "--port", str(port)], cluster_env, logs, roots),
        Host("control", ["worker", "--queue", "control"], cluster_env, logs, roots),
        Host("dispatcher", ["dispatcher"], cluster_env, logs, roots),
        Host("worker-a", ["worker", "--queue", "cpu"], cluster_env, logs, roots),
        Host("worker-b", ["worker", "--queue", "cpu"], cluster_env, logs, roots),
    ]
    workers = {host.pid: host for host in hosts if host.name.startswith("worker")}
    api = f"http://127.0.0.1:{port}"
    try:
        wait_until("the API", lambda: _ok(f"{api}/readyz"), 120, hosts)
        headers = {"Authorization": f"Bearer {_team_key(api)}"}
        data = rows(120)
        upload = httpx.post(
            f"{api}/v1/datasets",
            files={"file": ("reviews.jsonl", data)},
            data={"name": "reviews"},
            headers=headers,
        )
        assert upload.status_code == 201, upload.text
        options = {"epochs": 2, "lr": 1e-3, "batch_size": 8, "max_length": 32}

        def body(seed: int, weak_epochs: int = 2) -> dict[str, Any]:
            return {
                "dataset": {
                    "name": f"upload:{upload.json()['id']}",
                    "n_train": 80,
                    "n_test": 40,
                    "seed": seed,
                },
                "weak": {"model": model, **options, "epochs": weak_epochs},
                "strong": {"model": model, **options},
                "losses": ["xent"],
                "seeds": [0],
            }

        def submit(spec: dict[str, Any]) -> str:
            response = httpx.post(f"{api}/v1/jobs", json=spec, headers=headers, timeout=60)
            assert response.status_code == 201, response.text
            return str(response.json()["id"])

        def job(job_id: str) -> dict[str, Any]:
            return dict(httpx.get(f"{api}/v1/jobs/{job_id}", headers=headers, timeout=30).json())

        def finished(job_id: str) -> dict[str, Any]:
            return dict(
                wait_until(f"job {job_id}", lambda: (j := job(job_id))["status"] in FINAL and j, 300, hosts)
            )

        # 1. Across both worker hosts, the same results as one host.
        first = finished(submit(body(seed=0)))
        assert first["status"] == "succeeded", why(first)
        ran_on = {int(stage["worker"].split("@")[0].rsplit("-", 1)[1]) for stage in first["stages"]}
        assert ran_on == set(workers), (ran_on, set(workers))  # both hosts took stages
        local_data = tmp_path / "reviews.jsonl"
        local_data.write_bytes(data)
        reference_spec = body(seed=0) | {
            "dataset": {"name": {"path": str(local_data)}, "n_train": 80, "n_test": 40, "seed": 0}
        }
        reference_spec["weak"] = reference_spec["weak"] | {"model": str(tiny_bert)}
        reference_spec["strong"] = reference_spec["strong"] | {"model": str(tiny_bert)}
        reference = run_experiment(
            parse_spec(reference_spec), store=ArtifactStore(str(tmp_path / "one-host")), data_dir=None
        ).results
        assert figures(first["results"]) == pytest.approx(figures(reference), abs=1e-9)

        # 2. A worker host cut off mid-stage: requeued to the other host; the job succeeds.
        second_id = submit(body(seed=1, weak_epochs=40))
        running = wait_until(
            "the weak stage mid-way",
            lambda: next(
                (
                    s
                    for s in job(second_id)["stages"]
                    if s["kind"] == "weak"
                    and s["status"] == "running"
                    and 0 < s["step"] < (s["total_steps"] or 1) / 2
                ),
                None,
            ),
            120,
            hosts,
        )
        cut_off = workers[int(running["worker"].split("@")[0].rsplit("-", 1)[1])]
        cut_off.freeze()
        time.sleep(30)  # cut off 30 s, past the heartbeat timeout: the dispatcher requeues it elsewhere
        cut_off.thaw()
        second = finished(second_id)
        assert second["status"] == "succeeded", why(second)
        weak = next(s for s in second["stages"] if s["kind"] == "weak")
        assert weak["attempts"] == 2 and str(cut_off.pid) not in weak["worker"]

        # 3. The store down for 60 s mid-job: the job waits, and no attempt is spent.
        third_id = submit(body(seed=2, weak_epochs=20))
        wait_until(
            "a stage running",
            lambda: any(s["status"] == "running" for s in job(third_id)["stages"]),
            120,
            hosts,
        )
        before = {h.name: len(h.log.read_bytes()) for h in hosts}
        s3_outage.down()
        outage_started = time.monotonic()
        # Down for 60 s and until a host has met it, then 20 s more: a stage computing mid-way touches
        # no store, so a fixed time could pass unnoticed on a slow machine (a CI run's weak stage
        # outlasted 30 s).
        wait_until(
            "a host to meet the outage",
            lambda: [h.name for h in hosts if b"artifact store:" in h.log.read_bytes()[before[h.name] :]],
            240,
            hosts,
        )
        time.sleep(max(20.0, 60.0 - (time.monotonic() - outage_started)))
        s3_outage.up()
        third = finished(third_id)
        assert third["status"] == "succeeded", why(third)
        assert all(stage["attempts"] == 1 for stage in third["stages"]), third["stages"]
    finally:
        for host in hosts:
            host.stop()
        shutil.rmtree(roots, ignore_errors=True)


def why(job: dict[str, Any]) -> str:
    stages = "; ".join(
        f"{s['kind']}/{s['seed']} {s['status']}: {s['error']}" for s in job["stages"] if s["error"]
    )
    return f"job {job['status']}: {job['error']}; {stages}"


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def _team_key(api: str) -> str:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    created = httpx.post(f"{api}/v1/teams", json={"name": f"hosts-{uuid.uuid4().hex[:6]}"}, headers=admin)
    assert created.status_code == 201, created.text
    key = httpx.post(f"{api}/v1/teams/{created.json()['id']}/keys", json={"name": "hosts"}, headers=admin)
    assert key.status_code == 201, key.text
    return str(key.json()["key"])

"""A real, throw-away service stack for the benchmarks that go through the service.

``RealStack`` creates a fresh Postgres database ``w2s_bench_<random>`` (migrated with Alembic), a
temporary state dir and artifact store, and a Redis key prefix of its own; it starts a real Celery
worker process and the dispatcher process, serves the API (dashboard included) with uvicorn in a
thread of this process, and creates a team with an API key. On exit it stops everything, deletes
its Redis keys and drops the database, so repeated runs never see each other's jobs or cache.

    with RealStack(data_dir=Path("../shared/data")) as stack:
        job = stack.api.post("/v1/jobs", json=spec).json()
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("W2S_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("W2S_BENCH_REDIS", "redis://127.0.0.1:6379/14")
FINAL_STATES = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def default_data_dir() -> Path:
    """W2S_DATA_DIR if set, else the shared data folder beside the checkout."""
    return Path(os.environ.get("W2S_DATA_DIR") or ROOT.parent / "shared" / "data").resolve()


class StackError(RuntimeError):
    """The stack did not come up, or a job did not finish in time; carries the process logs."""


class RealStack:
    """Postgres database, Redis prefix, worker + dispatcher processes, uvicorn API and a team key."""

    def __init__(
        self,
        data_dir: Path,
        queue_slots: str = '{"cpu": 1}',
        keep_logs: Path | None = None,
        cpu_workers: int = 1,
        extra_env: dict[str, str] | None = None,
    ):
        self.cpu_workers = cpu_workers
        self.extra_env = dict(extra_env or {})  # settings a benchmark adds or overrides
        self.data_dir = data_dir
        self.queue_slots = queue_slots
        self.keep_logs = keep_logs
        self.db_name = f"w2s_bench_{uuid.uuid4().hex[:10]}"
        self.prefix = f"w2s-bench-{uuid.uuid4().hex[:8]}:"
        self.workdir = Path(tempfile.mkdtemp(prefix="w2s_bench_"))
        self.processes: list[subprocess.Popen[bytes]] = []
        self.server: Any = None
        self.server_thread: threading.Thread | None = None
        self.base_url = ""
        self.key = ""
        self._api: httpx.Client | None = None
        self.saved_env: dict[str, str | None] = {}

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> RealStack:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    @property
    def env(self) -> dict[str, str]:
        url = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        return {
            "W2S_DATABASE_URL": f"{url}/{self.db_name}",
            "W2S_BROKER_URL": REDIS_URL,
            "W2S_BROKER_KEY_PREFIX": self.prefix,
            "W2S_STATE_DIR": str(self.workdir / "state"),
            "W2S_ARTIFACT_STORE": str(self.workdir / "store"),
            "W2S_DATA_DIR": str(self.data_dir),
            "W2S_QUEUE_SLOTS": self.queue_slots,
            "W2S_ADMIN_KEY": f"bench-admin-{uuid.uuid4().hex}",
            "W2S_SESSION_SECRET": f"bench-session-{uuid.uuid4().hex}",
            # Fast rounds and progress writes: the benchmark measures the stack, not its polling.
            "W2S_DISPATCH_INTERVAL_S": "0.2",
            "W2S_PROGRESS_FLUSH_S": "0.5",
            **self.extra_env,
        }

    def _start(self) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{self.db_name}"')
        env = self.env
        # The API runs in this process: its settings come from os.environ, restored on close.
        for key, value in env.items():
            self.saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        from service.db import reset_caches

        reset_caches()
        self._migrate(env["W2S_DATABASE_URL"])
        (self.workdir / "logs").mkdir()
        for _ in range(self.cpu_workers):  # one worker process per slot, as per GPU in production
            self._spawn("worker", "--queue", "cpu")
        self._spawn("worker", "--queue", "control")
        self._spawn("dispatcher")
        self._serve()
        self.key = self._create_team()
        self._api = httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60
        )
        self._wait(lambda: self.api.get("/readyz").status_code == 200, 60, "the API to be ready")
        self._wait(self._workers_ready, 120, "the workers to be ready")

    def _workers_ready(self) -> bool:
        """Every Celery worker has logged that it is ready to take tasks."""
        logs = sorted((self.workdir / "logs").glob("worker-*.log"))
        return bool(logs) and all(" ready." in path.read_text(errors="replace") for path in logs)

    @property
    def api(self) -> httpx.Client:
        """An HTTP client for the API, signed in as the stack's team."""
        if self._api is None:
            raise RuntimeError("the stack is not started: use it as a context manager")
        return self._api

    def _migrate(self, url: str) -> None:
        from alembic import command
        from alembic.config import Config

        config = Config(str(ROOT / "alembic.ini"))
        config.attributes["database_url"] = url
        config.attributes["configure_logger"] = False
        command.upgrade(config, "head")

    def _spawn(self, *args: str) -> None:
        name = f"worker-{args[2]}-{len(self.processes)}" if args[0] == "worker" else args[0]  # one log each
        log = open(self.workdir / "logs" / f"{name}.log", "wb")  # noqa: SIM115  (the child owns it)
        command = [sys.executable, "-m", "w2s_service.cli", *args]
        env = {**os.environ, **self.env}
        self.processes.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=log))

    def _serve(self) -> None:
        import uvicorn

        from api.main import create_app

        port = free_port()
        config = uvicorn.Config(
            create_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.server_thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.server_thread.start()
        self._wait(lambda: self.server.started, 30, "uvicorn to start")
        self.base_url = f"http://127.0.0.1:{port}"

    def _create_team(self) -> str:
        from service.auth import create_api_key, create_team
        from service.db import session_scope

        with session_scope() as session:
            team = create_team(session, name="bench")
            _, key = create_api_key(session, team=team, name="bench")
        return key

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
        if self.server is not None:
            self.server.should_exit = True
            if self.server_thread is not None:
                self.server_thread.join(timeout=10)
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.keep_logs is not None and (self.workdir / "logs").is_dir():
            shutil.copytree(self.workdir / "logs", self.keep_logs, dirs_exist_ok=True)
        self._cleanup_redis()
        self._drop_database()
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        from service.db import reset_caches

        reset_caches()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _cleanup_redis(self) -> None:
        try:
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            for key in client.scan_iter(f"{self.prefix}*"):
                client.delete(key)
        except Exception as error:  # cleanup must not hide the benchmark's own outcome
            print(f"warning: could not delete Redis keys {self.prefix}*: {error}", file=sys.stderr)

    def _drop_database(self) -> None:
        try:
            import psycopg

            from service.db import reset_caches

            reset_caches()  # closes this process's pooled connections first
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        except Exception as error:
            print(f"warning: could not drop database {self.db_name}: {error}", file=sys.stderr)

    # -- helpers -----------------------------------------------------------------------------------

    def logs(self) -> str:
        folder = self.workdir / "logs"
        if not folder.is_dir():
            return ""
        return "\n".join(
            f"== {path.name}\n{path.read_text()[-4000:]}" for path in sorted(folder.glob("*.log"))
        )

    def _wait(self, condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = condition()
            except httpx.HTTPError:
                value = None
            if value:
                return value
            for process in self.processes:
                if process.poll() is not None:
                    raise StackError(
                        f"a stack process exited ({process.args}) while waiting for {what}\n{self.logs()}"
                    )
            time.sleep(0.25)
        raise StackError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{self.logs()}")

    def wait_job(
        self, job_id: str, timeout_s: float, on_poll: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Poll GET /v1/jobs/{id} until the job is over; returns its last state."""

        def finished() -> dict[str, Any] | None:
            job = self.api.get(f"/v1/jobs/{job_id}").json()
            if on_poll is not None:
                on_poll(job)
            return job if job["status"] in FINAL_STATES else None

        return self._wait(finished, timeout_s, f"job {job_id}")

    def wait_sweep(self, sweep_id: str, timeout_s: float) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            sweep = self.api.get(f"/v1/sweeps/{sweep_id}").json()
            return sweep if sweep["status"] in FINAL_STATES else None

        return self._wait(finished, timeout_s, f"sweep {sweep_id}")

"""Load on the service, on loopback only, against the production configuration (Postgres, Redis,
the API served by uvicorn in its own process). Four sections:

- ``burst``: 1000 ``POST /v1/jobs`` from 50 concurrent clients, each with an Idempotency-Key, then
  the same 1000 again; exactly 1000 jobs must exist afterwards and no response may be a 5xx.
- ``read``: ``GET /v1/jobs/{id}`` and ``GET /v1/jobs``, each at a constant 500 requests/s for 30 s
  (open loop: requests leave on schedule whatever the server does, and latency counts from the
  scheduled send time, so a stalled server cannot hide its stall: no coordinated omission).
- ``listing``: 1,000,000 jobs (and their stages) seeded with SQL over four teams; the first and a
  deep page of ``GET /v1/jobs``, plain and filtered by status and dataset, with the plans' key lines.
- ``dispatch``: ``POST /v1/jobs`` to the first stage ``running`` on an idle worker (a real Celery
  worker and dispatcher on Postgres + Redis), with a breakdown of where the time goes.

Each section creates its own database (``w2s_bench_<random>``), migrates it, and drops it at the
end; every subprocess is stopped and every wait is bounded.

    python bench/api_load.py [burst read listing dispatch] [--quick] [--json PATH]

The load generator is a raw asyncio HTTP/1.1 keep-alive client; ``read`` first runs it against a
null server (a fixed response, no framework) in another process and reports its CPU use, to show
that the generator is not what is being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the service packages and tests/helpers.py

import psycopg  # noqa: E402

PG_ADMIN_URL = os.environ.get("W2S_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
ADMIN_KEY = "bench-admin-key"
# Two uvicorn worker processes: one per core. The generator and Postgres share the same two cores;
# a single process saturates one core at ~500 requests/s and its p99 then grows with the queue.
API_WORKERS = 2


# ---------------------------------------------------------------------------------------------
# Figures


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


def latency_summary(seconds: list[float]) -> dict[str, float]:
    """Milliseconds: p50, p90, p99, max and the count."""
    return {
        "count": len(seconds),
        "p50_ms": round(percentile(seconds, 0.50) * 1000, 2),
        "p90_ms": round(percentile(seconds, 0.90) * 1000, 2),
        "p99_ms": round(percentile(seconds, 0.99) * 1000, 2),
        "max_ms": round(max(seconds, default=0.0) * 1000, 2),
    }


def show(title: str, figures: dict[str, Any]) -> None:
    print(f"  {title}: " + ", ".join(f"{key} {value}" for key, value in figures.items()), flush=True)


# ---------------------------------------------------------------------------------------------
# Databases, settings and processes


def sqlalchemy_url(name: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"


def libpq_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@contextlib.contextmanager
def bench_database() -> Iterator[str]:
    """A fresh database migrated to head, dropped at the end whatever happens."""
    from alembic import command
    from alembic.config import Config

    name = f"w2s_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        url = sqlalchemy_url(name)
        config = Config(str(ROOT / "alembic.ini"))
        config.attributes["database_url"] = url
        config.attributes["configure_logger"] = False
        command.upgrade(config, "head")
        yield url
    finally:
        from service.db import reset_caches

        reset_caches()  # close our pooled connections before the drop
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Workspace:
    """A section's settings: its database, a private state dir, store, data dir and tiny models."""

    database_url: str
    folder: Path
    env: dict[str, str] = field(default_factory=dict)
    weak_model: Path | None = None
    strong_model: Path | None = None

    def activate(self) -> None:
        """Point this process's service settings at the workspace (for seeding and reading)."""
        from service.db import reset_caches

        os.environ.update(self.env)
        reset_caches()


def make_workspace(database_url: str, folder: Path, *, models: bool) -> Workspace:
    from helpers import build_tiny_bert, build_tiny_gpt2, write_sst2_like

    data_dir = write_sst2_like(folder / "data")
    workspace = Workspace(database_url, folder)
    workspace.env = {
        "W2S_DATABASE_URL": database_url,
        "W2S_STATE_DIR": str(folder / "state"),
        "W2S_ARTIFACT_STORE": str(folder / "store"),
        "W2S_DATA_DIR": str(data_dir),
        "W2S_ADMIN_KEY": ADMIN_KEY,
        "TZ": "UTC",  # log timestamps in UTC, like the database's
    }
    if models:
        workspace.weak_model = build_tiny_bert(folder / "models" / "tiny-bert")
        workspace.strong_model = build_tiny_gpt2(folder / "models" / "tiny-gpt2")
    workspace.activate()
    return workspace


def create_team_key(name: str) -> tuple[str, str]:
    """A team and an API key for it: (team id, key)."""
    from service.auth import create_api_key, create_team
    from service.db import session_scope

    with session_scope() as session:
        team = create_team(session, name=name)
        _, key = create_api_key(session, team=team)
        return team.id, key


def tiny_spec(workspace: Workspace, **weak_overrides: Any) -> dict[str, Any]:
    options = {"epochs": 1, "lr": 1e-3, "batch_size": 16, "max_length": 32}
    return {
        "dataset": {"name": "sst2", "n_train": 64, "n_test": 32},
        "weak": {"model": str(workspace.weak_model), **options, **weak_overrides},
        "strong": {"model": str(workspace.strong_model), **options},
        "losses": ["xent"],
        "seeds": [0],
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Processes:
    """Subprocesses started in their own process groups, stopped (then killed) at the end."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started.append(process)
        return process

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def start_api(processes: Processes, workspace: Workspace, workers: int) -> int:
    """uvicorn in its own process(es); returns the port once /healthz answers."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", str(workers), "--log-level", "warning"]
    command += ["--no-access-log"]  # one log line per request costs more than the request itself
    # As `w2s-service api` (W2S_API_KEEP_ALIVE_S): with uvicorn's own 5 s, the pool's spare connections
    # are closed while idle and the request that next takes one fails.
    from service.settings import get_settings

    command += ["--timeout-keep-alive", str(get_settings().api_keep_alive_s)]
    process = processes.start("api", command, workspace.env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the API exited: {processes.log('api')[-2000:]}")
        try:
            status, _ = asyncio.run(one_request(port, "GET", "/healthz"))
            if status == 200:
                return port
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the API did not answer within 90 s: {processes.log('api')[-2000:]}")


# ---------------------------------------------------------------------------------------------
# The load generator: raw HTTP/1.1 with keep-alive over asyncio streams


class HttpConnection:
    """One keep-alive connection; requests on it go one at a time."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> HttpConnection:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None, "open() first"
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            lowered = name.strip().lower()
            if lowered == b"content-length":
                length = int(value)
            elif lowered == b"transfer-encoding":
                raise RuntimeError("chunked responses are not expected from these endpoints")
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def one_request(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> Any:
    connection = await HttpConnection(port).open()
    try:
        return await asyncio.wait_for(connection.request(method, path, headers), 10)
    finally:
        connection.close()


class ConnectionPool:
    """Idle keep-alive connections; opens more (up to ``limit``) when all are busy."""

    def __init__(self, port: int, limit: int):
        self.port = port
        self.limit = limit
        self.opened = 0
        self.idle: asyncio.LifoQueue[HttpConnection] = asyncio.LifoQueue()

    async def warm(self, count: int) -> None:
        for _ in range(count):
            self.opened += 1
            self.idle.put_nowait(await HttpConnection(self.port).open())

    async def acquire(self) -> HttpConnection:
        if self.idle.empty() and self.opened < self.limit:
            self.opened += 1
            try:
                return await HttpConnection(self.port).open()
            except OSError:
                self.opened -= 1
                raise
        return await self.idle.get()

    def release(self, connection: HttpConnection, healthy: bool) -> None:
        if healthy:
            self.idle.put_nowait(connection)
        else:
            connection.close()
            self.opened -= 1

    def close(self) -> None:
        while not self.idle.empty():
            self.idle.get_nowait().close()


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    failures: int = 0  # connection errors and timeouts
    sample_error: str = ""

    @property
    def errors(self) -> int:
        return self.failures + sum(count for status, count in self.statuses.items() if status >= 400)

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)

    def figures(self) -> dict[str, Any]:
        return {**latency_summary(self.latencies), "errors": self.errors, "5xx": self.server_errors}


async def open_loop(
    port: int,
    target: Callable[[int], str],
    headers: dict[str, str],
    *,
    rate: float,
    duration_s: float,
    timeout_s: float = 10.0,
) -> tuple[Outcome, dict[str, float]]:
    """GETs at a constant arrival rate. Latency runs from each request's scheduled send time,
    so time spent waiting for a free connection or a late scheduler counts against the server."""
    loop = asyncio.get_running_loop()
    pool = ConnectionPool(port, limit=256)
    await pool.warm(16)
    outcome = Outcome()
    total = int(rate * duration_s)
    tasks: set[asyncio.Task[None]] = set()
    max_lag = 0.0

    async def send(index: int, due: float) -> None:
        connection: HttpConnection | None = None
        healthy = False
        try:
            connection = await asyncio.wait_for(pool.acquire(), timeout_s)
            status, _ = await asyncio.wait_for(connection.request("GET", target(index), headers), timeout_s)
            healthy = True
            outcome.statuses[status] = outcome.statuses.get(status, 0) + 1
            outcome.latencies.append(loop.time() - due)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as error:
            outcome.failures += 1
            outcome.sample_error = outcome.sample_error or repr(error)
        finally:
            if connection is not None:
                pool.release(connection, healthy)

    cpu_before = time.process_time()
    start = loop.time() + 0.05
    for index in range(total):
        due = start + index / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        max_lag = max(max_lag, loop.time() - due)
        task = loop.create_task(send(index, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s * 2 + 5)
    elapsed = loop.time() - start
    generator = {
        "offered_rps": rate,
        "achieved_rps": round(len(outcome.latencies) / elapsed, 1),
        "cpu_percent_of_one_core": round(100 * (time.process_time() - cpu_before) / elapsed, 1),
        "max_schedule_lag_ms": round(max_lag * 1000, 2),
        "connections": pool.opened,
    }
    pool.close()
    return outcome, generator


async def closed_loop(
    port: int,
    clients: int,
    count: int,
    make: Callable[[int], tuple[str, str, dict[str, str], bytes]],
    on_response: Callable[[int, int, bytes], None],
) -> tuple[Outcome, float]:
    """``count`` requests from ``clients`` connections, each sending its next as soon as the last
    returns; returns the outcome and the elapsed seconds."""
    outcome = Outcome()
    next_index = iter(range(count))

    async def client() -> None:
        connection = await HttpConnection(port).open()
        try:
            for index in next_index:
                method, path, headers, body = make(index)
                started = time.perf_counter()
                try:
                    status, payload = await asyncio.wait_for(
                        connection.request(method, path, headers, body), 30
                    )
                except (OSError, TimeoutError, asyncio.IncompleteReadError) as error:
                    outcome.failures += 1
                    outcome.sample_error = outcome.sample_error or repr(error)
                    connection.close()
                    connection = await HttpConnection(port).open()
                    continue
                outcome.latencies.append(time.perf_counter() - started)
                outcome.statuses[status] = outcome.statuses.get(status, 0) + 1
                on_response(index, status, payload)
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return outcome, time.perf_counter() - started


# ---------------------------------------------------------------------------------------------
# 1. Burst of idempotent submissions


def section_burst(quick: bool, workdir: Path) -> dict[str, Any]:
    count, clients = (300, 50) if quick else (1000, 50)
    print(f"burst: {count} POST /v1/jobs from {clients} clients, twice with the same Idempotency-Keys")
    with bench_database() as url:
        workspace = make_workspace(url, workdir / "burst", models=True)
        team_id, key = create_team_key("bench-burst")
        processes = Processes(workdir / "burst" / "logs")
        try:
            port = start_api(processes, workspace, API_WORKERS)
            body_of = [
                json.dumps({**tiny_spec(workspace), "name": f"burst-{index}"}).encode()
                for index in range(count)
            ]
            run = uuid.uuid4().hex[:6]

            def make(index: int) -> tuple[str, str, dict[str, str], bytes]:
                headers = {
                    "Authorization": f"Bearer {key}",
                    "Content-Type": "application/json",
                    "Idempotency-Key": f"burst-{run}-{index}",
                }
                return "POST", "/v1/jobs", headers, body_of[index]

            passes: list[dict[str, Any]] = []
            ids: list[dict[int, str]] = []
            for label in ("first", "repeat"):
                seen: dict[int, str] = {}

                def remember(index: int, status: int, payload: bytes, seen: dict[int, str] = seen) -> None:
                    if status in (200, 201):
                        seen[index] = json.loads(payload)["id"]

                outcome, elapsed = asyncio.run(closed_loop(port, clients, count, make, remember))
                figures = {
                    "pass": label,
                    "throughput_rps": round(count / elapsed, 1),
                    **outcome.figures(),
                    "statuses": {str(status): n for status, n in sorted(outcome.statuses.items())},
                }
                show(f"{label} pass", figures)
                passes.append(figures)
                ids.append(seen)
            jobs = count_rows(url, "SELECT count(*) FROM jobs WHERE team_id = %s", (team_id,))
            same_ids = ids[0] == ids[1] and len(ids[0]) == count
            five_xx = sum(figures["5xx"] for figures in passes)
            print(f"  jobs afterwards: {jobs} (expected {count}); repeat returned the same ids: {same_ids}")
            if jobs != count or five_xx or not same_ids:
                raise AssertionError(f"burst: {jobs} jobs, {five_xx} 5xx, same ids {same_ids}")
            return {"requests": count, "clients": clients, "passes": passes, "jobs_after": jobs}
        finally:
            processes.stop_all()


def count_rows(url: str, query: str, params: tuple[Any, ...] = ()) -> int:
    with psycopg.connect(libpq_url(url), connect_timeout=10) as connection:
        return int(connection.execute(query, params).fetchone()[0])  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# 2. Reads at a constant arrival rate


NULL_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def null_server(port: int) -> None:
    """A fixed response for every request: what the generator costs on its own."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(NULL_RESPONSE)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def seed_read_jobs(workspace: Workspace, team_name: str, count: int) -> tuple[str, list[str]]:
    """``count`` jobs through the service's own create_job, half of them finished with results,
    so reads serialise what users really fetch. Returns the key and the job ids."""
    from service import jobs as job_service
    from service.db import session_scope
    from service.models import Team
    from service.settings import get_settings

    team_id, key = create_team_key(team_name)
    ids: list[str] = []
    results = {"weak": {"accuracy": 0.8, "auroc": 0.85}, "ceiling": {"accuracy": 0.9, "auroc": 0.95}}
    with session_scope() as session:
        team = session.get(Team, team_id)
        assert team is not None
        spec = job_service.resolve_spec(session, team=team, raw=tiny_spec(workspace), settings=get_settings())
        for index in range(count):
            job, _ = job_service.create_job(session, team=team, spec=spec, name=f"read-{index}")
            if index % 2:
                job.status = "succeeded"
                job.results = {**results, "students": {"xent": {"accuracy": 0.85, "pgr": 0.5}}}
                for stage in job.stages:
                    stage.status = "succeeded"
                    stage.step = stage.total_steps = 40
                    stage.metrics = {"accuracy": 0.8, "auroc": 0.85, "loss": 0.4}
            ids.append(job.id)
    return key, ids


def section_read(quick: bool, workdir: Path, workers: int) -> dict[str, Any]:
    rate = 500.0
    duration = 8.0 if quick else 30.0
    print(f"read: GET /v1/jobs/{{id}} and GET /v1/jobs, each at {rate:.0f} requests/s for {duration:.0f} s")
    processes = Processes(workdir / "read" / "logs")
    report: dict[str, Any] = {"rate_rps": rate, "duration_s": duration, "api_workers": workers}
    try:
        # The generator alone, against a server that does nothing.
        port = free_port()
        processes.start("null-server", [sys.executable, __file__, "_null-server", str(port)], {})
        wait_for_port(port, 20)
        outcome, generator = asyncio.run(
            open_loop(port, lambda _: "/", {}, rate=rate, duration_s=min(duration, 10.0))
        )
        report["generator_vs_null_server"] = {**outcome.figures(), **generator}
        show("generator vs a null server", report["generator_vs_null_server"])
        with bench_database() as url:
            workspace = make_workspace(url, workdir / "read", models=True)
            key, ids = seed_read_jobs(workspace, "bench-read", 1000)
            port = start_api(processes, workspace, workers)
            headers = {"Authorization": f"Bearer {key}"}
            picks = random.Random(0)
            job_ids = [picks.choice(ids) for _ in range(int(rate * duration))]
            targets: dict[str, Callable[[int], str]] = {
                "GET /v1/jobs/{id}": lambda index: f"/v1/jobs/{job_ids[index]}",
                "GET /v1/jobs": lambda _: "/v1/jobs",
            }
            # A short warm-up: connections in the pool, code paths compiled into caches.
            asyncio.run(open_loop(port, targets["GET /v1/jobs"], headers, rate=100, duration_s=2))
            report["endpoints"] = {}
            report["capacity_closed_loop"] = {}
            for name, target in targets.items():
                # What the server sustains when nobody waits: 8 clients back to back, for context.
                outcome, elapsed = asyncio.run(
                    closed_loop(
                        port, 8, 1000, lambda i, t=target: ("GET", t(i), headers, b""), lambda *_: None
                    )
                )
                capacity = {"throughput_rps": round(1000 / elapsed, 1), **outcome.figures()}
                report["capacity_closed_loop"][name] = capacity
                show(f"{name} capacity (closed loop, 8 clients)", capacity)
            for name, target in targets.items():
                outcome, generator = asyncio.run(
                    open_loop(port, target, headers, rate=rate, duration_s=duration)
                )
                figures = {**outcome.figures(), **generator}
                if outcome.sample_error:
                    figures["sample_error"] = outcome.sample_error
                report["endpoints"][name] = figures
                show(name, figures)
            report["target_met"] = all(
                figures["p99_ms"] < 50 and figures["errors"] == 0 for figures in report["endpoints"].values()
            )
            print(f"  target p99 < 50 ms with zero errors: {'met' if report['target_met'] else 'MISSED'}")
    finally:
        processes.stop_all()
    return report


def wait_for_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s} s")


# ---------------------------------------------------------------------------------------------
# 3. Listing a million jobs


SEED_TEAMS = 4
DATASETS = ["sst2", "imdb", "boolq", "sciq", "cosmos_qa", "anthropic_hh", "amazon_polarity"]


def seed_million(url: str, n_jobs: int) -> tuple[dict[str, str], float]:
    """``n_jobs`` jobs with three stages each, spread over four teams, inserted with SQL. Indexes
    and constraints are dropped for the load and rebuilt after it (bulk-load practice: a sorted
    build is far cheaper than n random inserts). Returns {team id: API key} and the seconds."""
    from service.auth import create_api_key
    from service.db import session_scope
    from service.models import Team

    started = time.perf_counter()
    keys: dict[str, str] = {}
    with session_scope() as session:
        for index in range(SEED_TEAMS):
            team = Team(name=f"bench-list-{index}")
            session.add(team)
            session.flush()
            keys[team.id] = create_api_key(session, team=team)[1]
    team_array = "ARRAY[" + ",".join(f"'{team_id}'" for team_id in keys) + "]"
    dataset_array = "ARRAY[" + ",".join(f"'{name}'" for name in DATASETS) + "]"
    spec = json.dumps(
        {"dataset": {"name": "sst2"}, "weak": {"model": "gpt2"}, "strong": {"model": "gpt2-xl"}}
    )
    with psycopg.connect(libpq_url(url), autocommit=True, connect_timeout=10) as connection:
        connection.execute("SET maintenance_work_mem = '256MB'")
        connection.execute("SET synchronous_commit = off")
        saved = drop_indexes_and_constraints(connection, ["jobs", "stages"])
        # Status: 90% succeeded, 5% failed, 3% cancelled, 1% running, 1% queued. Dataset: one of
        # seven, skewed towards sst2. Two jobs share each created_at, to exercise the tie-break.
        connection.execute(
            f"""
            INSERT INTO jobs (id, team_id, name, priority, status, spec, dataset, weak_model,
                              strong_model, cancel_requested, planned, gpu_seconds, created_at)
            SELECT md5('job' || i), ({team_array})[1 + i %% {SEED_TEAMS}], 'job-' || i, 0,
                   CASE WHEN r < 0.90 THEN 'succeeded' WHEN r < 0.95 THEN 'failed'
                        WHEN r < 0.98 THEN 'cancelled' WHEN r < 0.99 THEN 'running' ELSE 'queued' END,
                   %s::jsonb,
                   ({dataset_array})[1 + least(6, floor(-ln(1 - d) * 2))::int],
                   'gpt2', 'gpt2-xl', false, true, 0,
                   timestamptz '2026-01-01' + (i / 2) * interval '1 second'
            FROM (SELECT i, hashtext('s' || i)::float8 / 4294967296 + 0.5 AS r,
                         hashtext('d' || i)::float8 / 4294967296 + 0.5 AS d
                  FROM generate_series(1, {n_jobs}) AS i) AS numbers
            """,
            (spec,),
        )
        connection.execute(
            """
            INSERT INTO stages (id, job_id, "order", kind, seed, status, attempts, step, gpu_seconds)
            SELECT md5(j.id || k), j.id, k, (ARRAY['weak', 'ceiling', 'student:xent'])[k + 1], 0,
                   CASE j.status WHEN 'succeeded' THEN 'succeeded' WHEN 'queued' THEN 'pending'
                                 WHEN 'running' THEN CASE k WHEN 0 THEN 'running' ELSE 'pending' END
                                 ELSE j.status END,
                   1, 0, 0
            FROM jobs AS j CROSS JOIN generate_series(0, 2) AS k
            """
        )
        restore_indexes_and_constraints(connection, saved)
        connection.execute("VACUUM ANALYZE jobs")
        connection.execute("VACUUM ANALYZE stages")
    return keys, time.perf_counter() - started


def drop_indexes_and_constraints(connection: psycopg.Connection[Any], tables: list[str]) -> list[str]:
    """Drop the tables' constraints (but NOT NULL) and indexes; return the SQL that recreates them."""
    restore: list[str] = []
    for table in tables:
        constraints = connection.execute(
            "SELECT conname, pg_get_constraintdef(oid), contype FROM pg_constraint "
            "WHERE conrelid = %s::regclass AND contype IN ('p', 'u', 'f') ORDER BY contype DESC",
            (table,),
        ).fetchall()
        # Foreign keys from other tables point at these primary keys: drop those first, too.
        referencing = connection.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE confrelid = %s::regclass AND contype = 'f' AND conrelid <> %s::regclass",
            (table, table),
        ).fetchall()
        for other, name, definition in referencing:
            connection.execute(f'ALTER TABLE {other} DROP CONSTRAINT "{name}"')
            restore.append(f'ALTER TABLE {other} ADD CONSTRAINT "{name}" {definition}')
        for name, _, _ in constraints:
            connection.execute(f'ALTER TABLE "{table}" DROP CONSTRAINT IF EXISTS "{name}" CASCADE')
        indexes = connection.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", (table,)
        ).fetchall()
        for name, _ in indexes:
            connection.execute(f'DROP INDEX "{name}"')
        # Primary and unique keys first (foreign keys need them), then indexes, foreign keys last.
        restore[:0] = [
            f'ALTER TABLE "{table}" ADD CONSTRAINT "{name}" {definition}'
            for name, definition, kind in constraints
            if kind in ("p", "u")
        ]
        restore += [definition for _, definition in indexes]
        restore += [
            f'ALTER TABLE "{table}" ADD CONSTRAINT "{name}" {definition}'
            for name, definition, kind in constraints
            if kind == "f"
        ]
    # Foreign keys go last whatever table they belong to.
    return sorted(restore, key=lambda statement: "FOREIGN KEY" in statement)


def restore_indexes_and_constraints(connection: psycopg.Connection[Any], statements: list[str]) -> None:
    for statement in statements:
        connection.execute(statement)


class SqlRecorder:
    """Records the statements SQLAlchemy sends, with their parameters, to EXPLAIN them later."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, Any]] = []

    def __call__(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        self.statements.append((statement, parameters))


def explain_key_lines(url: str, statements: list[tuple[str, Any]]) -> list[list[str]]:
    """EXPLAIN ANALYZE each statement; keep the lines that say how rows were found and the timing."""
    plans: list[list[str]] = []
    wanted = re.compile(r"Scan|Sort|Limit|Join|Nested Loop|Filter|Index Cond|Rows Removed|Execution Time")
    with psycopg.connect(libpq_url(url), connect_timeout=10) as connection:
        for statement, parameters in statements:
            rows = connection.execute(
                "EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters or None
            ).fetchall()
            # Long lines are the stage loader's IN (...51 ids...): the head says enough.
            plans.append([row[0].strip()[:160] for row in rows if wanted.search(row[0])])
    return plans


def cursor_at(url: str, team_id: str, offset: int, where: str = "", params: tuple[Any, ...] = ()) -> str:
    """The cursor a client holds after paging ``offset`` jobs into the listing."""
    with psycopg.connect(libpq_url(url), connect_timeout=10) as connection:
        row = connection.execute(
            f"SELECT created_at, id FROM jobs WHERE team_id = %s {where} "
            "ORDER BY created_at DESC, id DESC OFFSET %s LIMIT 1",
            (team_id, *params, offset),
        ).fetchone()
    assert row is not None, "offset past the end of the listing"
    created, job_id = row
    return base64.urlsafe_b64encode(json.dumps([created.isoformat(), job_id]).encode()).decode()


def section_listing(quick: bool, workdir: Path) -> dict[str, Any]:
    n_jobs = 200_000 if quick else 1_000_000
    print(f"listing: GET /v1/jobs over {n_jobs:,} jobs ({3 * n_jobs:,} stages) in {SEED_TEAMS} teams")
    processes = Processes(workdir / "listing" / "logs")
    report: dict[str, Any] = {"jobs": n_jobs, "teams": SEED_TEAMS}
    try:
        with bench_database() as url:
            workspace = make_workspace(url, workdir / "listing", models=False)
            keys, seconds = seed_million(url, n_jobs)
            report["seed_s"] = round(seconds, 1)
            print(f"  seeded in {seconds:.1f} s")
            team_id, key = next(iter(keys.items()))
            per_team = n_jobs // SEED_TEAMS
            deep = int(per_team * 0.9)
            filtered = "AND status = %s AND dataset = %s"
            filter_params = ("failed", "imdb")
            n_filtered = count_rows(
                url, f"SELECT count(*) FROM jobs WHERE team_id = %s {filtered}", (team_id, *filter_params)
            )
            deep_filtered = int(n_filtered * 0.9)
            cases: dict[str, dict[str, str]] = {
                "first page": {},
                f"deep page (after {deep:,} jobs)": {"cursor": cursor_at(url, team_id, deep)},
                "first page, status=failed&dataset=imdb": {"status": "failed", "dataset": "imdb"},
                f"deep page, status=failed&dataset=imdb (after {deep_filtered:,} of {n_filtered:,})": {
                    "status": "failed",
                    "dataset": "imdb",
                    "cursor": cursor_at(url, team_id, deep_filtered, filtered, filter_params),
                },
                "first page, status=running": {"status": "running"},
            }
            port = start_api(processes, workspace, 1)
            headers = {"Authorization": f"Bearer {key}"}
            report["cases"] = {}
            for name, params in cases.items():
                query = "&".join(f"{k}={v}" for k, v in params.items())
                path = "/v1/jobs" + (f"?{query}" if query else "")
                timings = asyncio.run(time_sequential(port, path, headers, repeats=5 if quick else 20))
                plans = explain_list_jobs(url, team_id, params)
                report["cases"][name] = {**latency_summary(timings), "plans": plans}
                show(name, latency_summary(timings))
                for plan in plans:
                    for line in plan:
                        print(f"      {line}")
            # p90, not max: one cold first request (plan cache, page cache) is not the steady state.
            report["target_met"] = all(case["p90_ms"] < 100 for case in report["cases"].values())
            print(f"  target < 100 ms: {'met' if report['target_met'] else 'MISSED'}")
    finally:
        processes.stop_all()
    return report


async def time_sequential(port: int, path: str, headers: dict[str, str], repeats: int) -> list[float]:
    connection = await HttpConnection(port).open()
    timings: list[float] = []
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            status, body = await asyncio.wait_for(connection.request("GET", path, headers), 30)
            timings.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"GET {path}: {status} {body[:300]!r}")
    finally:
        connection.close()
    return timings


def explain_list_jobs(url: str, team_id: str, params: dict[str, str]) -> list[list[str]]:
    """The plans of the statements GET /v1/jobs (service.jobs.list_job_summaries) sends for these
    parameters."""
    from sqlalchemy import event

    from service import jobs as job_service
    from service.db import get_engine, session_scope

    recorder = SqlRecorder()
    engine = get_engine()
    event.listen(engine, "before_cursor_execute", recorder)
    try:
        with session_scope() as session:
            job_service.list_job_summaries(session, team_id=team_id, **params)  # type: ignore[arg-type]
    finally:
        event.remove(engine, "before_cursor_execute", recorder)
    return explain_key_lines(url, recorder.statements)


# ---------------------------------------------------------------------------------------------
# 4. Submission to a running stage on an idle worker


LOG_TIME = re.compile(r"(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}[,.]\d{3})")


def log_times(text: str, marker: str) -> list[dt.datetime]:
    """UTC times of the log lines containing ``marker`` (the processes run with TZ=UTC)."""
    times = []
    for line in text.splitlines():
        if marker in line and (match := LOG_TIME.search(line)):
            stamp = match.group(1).replace(",", ".").replace("T", " ")
            times.append(dt.datetime.fromisoformat(stamp).replace(tzinfo=dt.UTC))
    return times


def first_after(times: list[dt.datetime], moment: dt.datetime) -> dt.datetime | None:
    return next((t for t in sorted(times) if t >= moment - dt.timedelta(milliseconds=5)), None)


def section_dispatch(quick: bool, workdir: Path, redis_db: int) -> dict[str, Any]:
    import redis

    n_jobs = 4 if quick else 10
    print(f"dispatch: POST /v1/jobs to the first stage running, {n_jobs} jobs on an idle worker")
    processes = Processes(workdir / "dispatch" / "logs")
    prefix = f"w2s-bench-{uuid.uuid4().hex[:8]}:"
    report: dict[str, Any] = {"jobs": n_jobs}
    try:
        with bench_database() as url:
            workspace = make_workspace(url, workdir / "dispatch", models=True)
            workspace.env.update(
                {
                    "W2S_BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}",
                    "W2S_BROKER_KEY_PREFIX": prefix,
                    "W2S_QUEUE_SLOTS": '{"cpu": 1}',
                    "W2S_PROGRESS_FLUSH_S": "0.2",  # cancellation reaches the worker within 0.2 s
                }
            )
            workspace.activate()
            report["dispatch_interval_s"] = float(os.environ.get("W2S_DISPATCH_INTERVAL_S", "0.5"))
            _, key = create_team_key("bench-dispatch")
            port = start_api(processes, workspace, 1)
            me = [sys.executable, "-m", "w2s_service.cli"]
            processes.start("worker", [*me, "worker", "--queue", "cpu"], workspace.env)
            processes.start("control", [*me, "worker", "--queue", "control"], workspace.env)
            processes.start("dispatcher", [*me, "dispatcher"], workspace.env)
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            runs: list[dict[str, Any]] = []
            for index in range(n_jobs + 1):  # the first one warms the dispatcher's imports up
                spec = tiny_spec(workspace, lr=1e-3 * (1 + index / 100))  # a new stage key each time
                run = submit_and_watch(url, port, headers, spec, processes)
                run["warm_up"] = index == 0
                runs.append(run)
                show(f"job {index}{' (warm-up)' if index == 0 else ''}", run["breakdown_ms"])
            planning_ms = measure_planning(workspace, tiny_spec(workspace, lr=7e-4))
            timed = [run["post_to_running_ms"] for run in runs if not run["warm_up"]]
            report.update(
                {
                    "warm_up_ms": runs[0]["post_to_running_ms"],
                    "median_ms": round(statistics.median(timed), 1),
                    "max_ms": round(max(timed), 1),
                    "planning_ms_measured_in_process": planning_ms,
                    "runs": runs,
                    "target_met": max(timed) < 2000,
                }
            )
            parts = runs[1]["breakdown_ms"].keys()
            report["median_breakdown_ms"] = {
                part: round(statistics.median(run["breakdown_ms"][part] for run in runs[1:]), 1)
                for part in parts
            }
            show("median breakdown", report["median_breakdown_ms"])
            print(
                f"  POST -> running: median {report['median_ms']} ms, max {report['max_ms']} ms "
                f"(warm-up job {report['warm_up_ms']} ms); planning alone {planning_ms} ms; "
                f"target < 2 s: {'met' if report['target_met'] else 'MISSED'}"
            )
    finally:
        processes.stop_all()
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=redis_db)
        for stale in client.scan_iter(f"{prefix}*"):
            client.delete(stale)
    return report


def submit_and_watch(
    url: str, port: int, headers: dict[str, str], spec: dict[str, Any], processes: Processes
) -> dict[str, Any]:
    """POST a job, wait for its first stage to run, then cancel it and wait for the worker to be
    idle again. Returns the time to running and where it went."""

    async def post() -> tuple[int, bytes]:
        connection = await HttpConnection(port).open()
        try:
            return await connection.request("POST", "/v1/jobs", headers, json.dumps(spec).encode())
        finally:
            connection.close()

    posted = dt.datetime.now(dt.UTC)
    status, body = asyncio.run(post())
    if status != 201:
        raise RuntimeError(f"POST /v1/jobs: {status} {body[:300]!r}")
    job_id = json.loads(body)["id"]
    query = (
        "SELECT j.created_at, s.queued_at, s.started_at FROM jobs j JOIN stages s ON s.job_id = j.id "
        'WHERE j.id = %s AND s."order" = 0'
    )
    with psycopg.connect(libpq_url(url), autocommit=True, connect_timeout=10) as connection:
        deadline = time.monotonic() + 120
        invisible_polls = 0
        while True:
            row = connection.execute(query, (job_id,)).fetchone()
            if row is not None and row[2] is not None:
                created, queued, started = row
                break
            if row is None:
                invisible_polls += 1  # the 201 arrived before the job's commit was visible
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"job {job_id} did not start in 120 s\n{processes.log('dispatcher')[-3000:]}\n"
                    f"{processes.log('worker')[-3000:]}"
                )
            time.sleep(0.02)
        # The worker must be idle for the next job: cancel this one and wait for its slot.
        asyncio.run(one_request(port, "POST", f"/v1/jobs/{job_id}/cancel", headers))
        idle_query = "SELECT count(*) FROM stages WHERE status IN ('queued', 'running')"
        while connection.execute(idle_query).fetchone()[0]:  # type: ignore[index]
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id}'s stage did not stop\n{processes.log('worker')[-3000:]}")
            time.sleep(0.05)
    # The cancelled task's pool process still has to return and exit, and the worker to fork the
    # next one (max-tasks-per-child 1): without this pause the next job would wait for that too.
    time.sleep(3.0)
    enqueued = first_after(log_times(processes.log("dispatcher"), "round: planned"), queued)
    received = first_after(log_times(processes.log("worker"), "received"), queued)

    def ms(start: dt.datetime | None, end: dt.datetime | None) -> float:
        return round((end - start).total_seconds() * 1000, 1) if start and end else float("nan")

    return {
        "job_id": job_id,
        "post_to_running_ms": ms(posted, started),
        "polls_before_the_job_was_visible": invisible_polls,
        "breakdown_ms": {
            "post_to_committed": ms(posted, created),
            "wait_and_plan_in_dispatcher": ms(created, queued),
            "commit_and_enqueue": ms(queued, enqueued),
            "worker_pickup": ms(enqueued, received),
            "claim_in_pool_process": ms(received, started),
        },
    }


def measure_planning(workspace: Workspace, spec: dict[str, Any]) -> dict[str, float]:
    """What plan_job costs in a warm process: loading the dataset splits and computing stage keys."""
    from service.dispatch import stage_plans
    from service.settings import get_settings
    from w2s.spec import parse_spec

    parsed = parse_spec(spec)
    started = time.perf_counter()
    stage_plans(parsed, get_settings())
    cold = time.perf_counter() - started
    started = time.perf_counter()
    stage_plans(parse_spec({**spec, "seeds": [1]}), get_settings())
    warm = time.perf_counter() - started
    return {"first_in_process_ms": round(cold * 1000, 1), "warm_ms": round(warm * 1000, 1)}


# ---------------------------------------------------------------------------------------------


SECTIONS = ("burst", "read", "listing", "dispatch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sections", nargs="*", help=f"any of {', '.join(SECTIONS)}; default: all four")
    parser.add_argument("--quick", action="store_true", help="fewer requests, jobs and seconds")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--api-workers", type=int, default=API_WORKERS, help="uvicorn workers for 'read'")
    parser.add_argument("--redis-db", type=int, default=14, help="a Redis database of its own for 'dispatch'")
    args = parser.parse_args(argv)
    sections = args.sections or list(SECTIONS)
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    report: dict[str, Any] = {
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    runners: dict[str, Callable[[Path], dict[str, Any]]] = {
        "burst": lambda folder: section_burst(args.quick, folder),
        "read": lambda folder: section_read(args.quick, folder, args.api_workers),
        "listing": lambda folder: section_listing(args.quick, folder),
        "dispatch": lambda folder: section_dispatch(args.quick, folder, args.redis_db),
    }
    failed = False
    with tempfile.TemporaryDirectory(prefix="w2s-bench-") as folder:
        for name in sections:
            started = time.perf_counter()
            try:
                report[name] = runners[name](Path(folder))
            except Exception as error:  # report it, and still run the other sections
                failed = True
                report[name] = {"error": f"{type(error).__name__}: {error}"}
                print(f"{name} FAILED: {error}", file=sys.stderr)
            report[name]["wall_s"] = round(time.perf_counter() - started, 1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"figures written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_null-server":
        asyncio.run(null_server(int(sys.argv[2])))
    else:
        sys.exit(main())

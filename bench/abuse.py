"""A hostile tenant against the production configuration: what one team's streams, guesses and giant
requests cost the others.

The stack: a fresh Postgres database, Redis, the API in a uvicorn process of its own (no workers: the
jobs here stay queued, which keeps their streams open). Two teams: a hostile one and a reader. Phases:

1. **Streams.** The hostile team opens ``--streams`` (500) live metric streams (SSE) on its job: first
   under the default per-team cap (how many are refused with 429), then with the cap raised so that
   all of them are open. While they are open, the reader team reads its job and its job list, and a
   probe reads ``/healthz``, each ten times a second for ``--seconds`` (20); Postgres is sampled every
   0.1 s for the connections the API holds busy (active or idle in transaction). Goals: reader p99
   < 200 ms, ``/healthz`` p99 < 100 ms, database connections busy for the streams ≤ 2.
2. **Oversized sweep.** A sweep of 20 × 20 models, 50 losses and 20 seeds (4 KB asking for 416,000
   stages): the time to its refusal, over 20 tries (goal < 50 ms).
3. **A million-step curve.** The worker's progress writer is fed one million training steps of a stage
   (four curves) exactly as a training run feeds it; then ``GET /v1/jobs/{id}/metrics`` is read 50
   times (goal p99 < 100 ms), with the rows stored and points returned.
4. **Guessed keys**, last (the throttle then refuses this address's made-up keys for a minute;
   a valid key from it is still served): 2,000 requests with made-up keys from one address; the
   first 429 comes within the first 100 (goal), and how many of the 2,000 were refused.
5. **A dead tracking server**, on a stack of its own with the production workers (CPU, control,
   exports, dispatcher): one team's MLflow URI accepts connections and never answers, and
   ``--dead-exports`` (50) of its jobs (free: cached duplicates) finish, each with an export to it.
   Another team's new job: its time to planning (goal < 5 s) and to its end, beside those exports
   and on the quiet stack before; the most connections to the dead server at once (goal: at most
   ``W2S_EXPORTS_PER_TEAM``).
6. **Hostile YAML** (on phase 1's API, before phase 4): for ``--seconds``, three clients post YAML
   bodies to ``/v1/jobs`` in turn, one without a key, one with a made-up key, one with the hostile
   team's key (its rate limit raised): ``a: [[[...]]]`` 5,000 and 10,000 levels deep (10 and 20 KB)
   and a flat list of 1 MiB. Meanwhile ``/healthz`` and the reader's job list are read ten times a
   second. Goals: ``/healthz`` p99 < 100 ms during the attack, every refusal p99 < 100 ms, no 5xx.
7. **"Already stored" on S3**, on an API of its own over an S3 store (moto's server, a process of
   its own): ``--upload-pairs`` (20) times, beta uploads ``--upload-mb`` (40) MB; alpha then uploads
   the same bytes and fresh bytes, in random order. Goal: alpha's two answer times overlap (an
   upload that skipped writing bytes another team stored answered ~1 s per 40 MB sooner).
8. **A quadratic upload** (on phase 1's API, before phase 4): the hostile team uploads
   ``--overlap-rows`` (200,000; 12 MB) rows that all share their longest word, which made the
   overlap check compare every row with every other (issue 28, item 6), and submits a job on all of
   them; it is planned in this process as the control worker plans it. Goal: planned within a tenth
   of ``W2S_CONTROL_TIMEOUT_S``.

    python bench/abuse.py
    python bench/abuse.py --exports-only     # phase 5 alone
    python bench/abuse.py --yaml-only        # phase 6 alone
    python bench/abuse.py --uploads-only     # phase 7 alone
    python bench/abuse.py --overlap-only     # phase 8 alone
    python bench/abuse.py --quick            # 100 streams, 1e5 steps, 8 s of reads
    python bench/abuse.py --json /tmp/abuse.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import httpx  # noqa: E402
from race_storm import StormStack, percentile  # noqa: E402
from real_stack import PG_ADMIN_URL, RealStack  # noqa: E402


class ApiOnlyStack(StormStack):
    """A fresh database and Redis prefix and the API in a process of its own; nothing else runs."""

    def _start(self) -> None:
        import os

        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{self.db_name}"')
        for key, value in self.env.items():
            self.saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        from service.db import reset_caches

        reset_caches()
        self._migrate(self.env["W2S_DATABASE_URL"])
        (self.workdir / "logs").mkdir()
        self._serve()
        self._wait(self._ready, 90, "the API to be ready")

    def _ready(self) -> bool:
        return httpx.get(f"{self.base_url}/readyz", timeout=5).status_code == 200


def ms(values: list[float]) -> dict[str, Any]:
    values_ms = [v * 1000 for v in values]
    if not values_ms:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "n": len(values_ms),
        "p50_ms": round(statistics.median(values_ms), 1),
        "p99_ms": round(percentile(values_ms, 99), 1),
        "max_ms": round(max(values_ms), 1),
    }


def make_team(name: str) -> tuple[str, str]:
    from service.auth import create_api_key, create_team
    from service.db import session_scope

    with session_scope() as session:
        team = create_team(session, name=f"{name}-{uuid.uuid4().hex[:6]}")
        _, key = create_api_key(session, team=team, name=name)
        return team.id, key


def tiny_job_body(models: Path) -> dict[str, Any]:
    options = {"epochs": 1, "lr": 1e-3, "batch_size": 16, "max_length": 32}
    return {
        "dataset": {"name": "sst2", "n_train": 64, "n_test": 32},
        "weak": {"model": str(models), **options},
        "strong": {"model": str(models), **options},
        "losses": ["xent"],
        "seeds": [0],
    }


# -- 1. streams ------------------------------------------------------------------------------------


async def open_streams(
    base_url: str, key: str, job_id: str, n: int, hold: asyncio.Event, answered: threading.Event
) -> dict[str, Any]:
    """Open ``n`` streams at once (``answered`` is set once each got its answer) and keep those that
    open until ``hold`` is set. Returns the status counts and the events the open ones received."""
    statuses: dict[str, int] = {}
    events = 0
    opened = asyncio.Event()
    pending = n

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal events, pending
        headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
        try:
            async with client.stream("GET", f"/v1/jobs/{job_id}/metrics", headers=headers) as response:
                statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
                pending -= 1
                if pending == 0:
                    opened.set()
                if response.status_code != 200:
                    return
                async for line in response.aiter_lines():
                    if line.startswith("event:"):
                        events += 1
                    if hold.is_set():
                        return
        except httpx.HTTPError as error:
            name = type(error).__name__
            statuses[name] = statuses.get(name, 0) + 1
            pending -= 1
            if pending == 0:
                opened.set()

    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=httpx.Timeout(60, read=None), limits=limits
    ) as client:
        tasks = [asyncio.create_task(one(client)) for _ in range(n)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(opened.wait(), timeout=120)
        answered.set()
        await hold.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"statuses": statuses, "events": events}


def busy_connections(db_name: str) -> tuple[int, int]:
    """(connections busy: active or idle in transaction, all connections) to the bench database,
    this sampler's own excluded."""
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT state FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (db_name,)
        ).fetchall()
    busy = sum(1 for (state,) in rows if state in ("active", "idle in transaction"))
    return busy, len(rows)


def read_loop(
    url: str, headers: dict[str, str], seconds: float, out: list[float], failures: list[str]
) -> None:
    """GET ``url`` ten times a second for ``seconds``; latencies into ``out``."""
    with httpx.Client(timeout=30, headers=headers) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started_at = time.perf_counter()
            try:
                response = client.get(url)
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {url}")
            except httpx.HTTPError as error:
                failures.append(f"{type(error).__name__} {url}")
            out.append(time.perf_counter() - started_at)
            time.sleep(max(0.0, 0.1 - (time.perf_counter() - started_at)))


def measure_under_streams(
    stack: ApiOnlyStack, hostile_key: str, job_id: str, reader: tuple[str, str], streams: int, seconds: float
) -> dict[str, Any]:
    reader_job, reader_key = reader
    headers = {"Authorization": f"Bearer {reader_key}"}
    reads: list[float] = []
    lists: list[float] = []
    health: list[float] = []
    failures: list[str] = []
    samples: list[tuple[int, int]] = []
    baseline = busy_connections(stack.db_name)
    loop = asyncio.new_event_loop()
    hold = asyncio.Event()
    answered = threading.Event()
    result: dict[str, Any] = {}

    def streams_thread() -> None:
        asyncio.set_event_loop(loop)
        opened = open_streams(stack.base_url, hostile_key, job_id, streams, hold, answered)
        result.update(loop.run_until_complete(opened))

    thread = threading.Thread(target=streams_thread, daemon=True)
    thread.start()
    answered.wait(timeout=150)
    time.sleep(2.0)  # every stream has had its first tick
    readers = [
        threading.Thread(
            target=read_loop,
            args=(f"{stack.base_url}/v1/jobs/{reader_job}", headers, seconds, reads, failures),
        ),
        threading.Thread(
            target=read_loop, args=(f"{stack.base_url}/v1/jobs?limit=20", headers, seconds, lists, failures)
        ),
        threading.Thread(target=read_loop, args=(f"{stack.base_url}/healthz", {}, seconds, health, failures)),
    ]
    for reader_thread in readers:
        reader_thread.start()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(busy_connections(stack.db_name))
        time.sleep(0.1)
    for reader_thread in readers:
        reader_thread.join()
    loop.call_soon_threadsafe(hold.set)
    thread.join(timeout=60)
    return {
        "streams_asked": streams,
        "stream_statuses": result.get("statuses", {}),
        "stream_events": result.get("events", 0),
        "reader_job": ms(reads),
        "reader_list": ms(lists),
        "reader_all": ms(reads + lists),
        "healthz": ms(health),
        "failures": len(failures),
        "failure_sample": failures[:5],
        "db_busy_before": baseline[0],
        "db_busy_max": max((busy for busy, _ in samples), default=None),
        "db_busy_mean": round(statistics.mean(busy for busy, _ in samples), 2) if samples else None,
        "db_connections_before": baseline[1],
        "db_connections_max": max((total for _, total in samples), default=None),
        "db_samples": len(samples),
    }


# -- 2. guessed keys -------------------------------------------------------------------------------


async def guess_keys(base_url: str, n: int) -> dict[str, Any]:
    codes: list[int] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        for start in range(0, n, 20):  # 20 at a time, in order
            batch = [
                client.get("/v1/teams/me", headers={"Authorization": f"Bearer w2s_{uuid.uuid4().hex}"})
                for _ in range(min(20, n - start))
            ]
            codes += [response.status_code for response in await asyncio.gather(*batch)]
    first = next((i + 1 for i, code in enumerate(codes) if code == 429), None)
    return {
        "attempts": n,
        "first_429_at": first,
        "refused_429": codes.count(429),
        "answered_401": codes.count(401),
        "other": len(codes) - codes.count(429) - codes.count(401),
    }


# -- 3. oversized sweep ----------------------------------------------------------------------------


def oversized_sweep(base_url: str, key: str, tries: int) -> dict[str, Any]:
    body = {
        "name": "giant",
        "dataset": {"name": "sst2", "n_train": 4000},
        "weak_models": [{"model": f"gpt2-variant-{i}", "mode": "probe"} for i in range(20)],
        "strong_models": [{"model": f"gpt2-large-variant-{i}", "mode": "probe"} for i in range(20)],
        "losses": [{"name": "logconf", "aux_coef": round(0.01 * i, 2)} for i in range(50)],
        "seeds": list(range(20)),
    }
    size = len(json.dumps(body))
    times: list[float] = []
    statuses: dict[str, int] = {}
    with httpx.Client(base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
        client.get("/v1/teams/me")  # a warm connection: the refusal is timed, not the handshake
        for _ in range(tries):
            started_at = time.perf_counter()
            response = client.post("/v1/sweeps", json=body)
            times.append(time.perf_counter() - started_at)
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
            detail = response.text[:300]
    return {"body_bytes": size, "statuses": statuses, "refusal": ms(times), "detail": detail}


# -- 4. a million-step curve -----------------------------------------------------------------------


def million_step_curves(
    base_url: str, team: tuple[str, str], job_id: str, steps: int, reads: int
) -> dict[str, Any]:
    from sqlalchemy import func, select

    from service.db import session_scope
    from service.models import MetricPoint, Stage
    from service.settings import get_settings
    from w2s.train import Progress
    from worker.tasks import ProgressWriter

    with session_scope() as session:
        stage = session.scalars(select(Stage).where(Stage.job_id == job_id, Stage.kind == "weak")).one()
        stage.status, stage.attempts, stage.fence = "running", 1, 1
        stage_id = stage.id
    settings = get_settings()
    writer = ProgressWriter(stage_id, flush_s=2.0, fence=1, max_points=settings.metric_points_per_series)
    started_at = time.perf_counter()
    for step in range(1, steps + 1):
        loss = (
            0.7 * math.exp(-step / (steps / 5))
            + 0.05 * math.sin(step / 97.0)
            + (2.0 if step == steps // 3 else 0.0)
        )
        evaluation = 0.5 + 0.4 * step / steps if step % 10_000 == 0 else None
        writer(Progress(step, steps, loss, 0.5 + 0.4 * step / steps, 1e-5, evaluation))
    writer.final_flush(30.0)
    feed_s = time.perf_counter() - started_at
    with session_scope() as session:
        rows = session.scalar(select(func.count()).where(MetricPoint.stage_id == stage_id))
    times: list[float] = []
    with httpx.Client(
        base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {team[1]}"}
    ) as client:
        body = client.get(f"/v1/jobs/{job_id}/metrics").json()  # warm
        for _ in range(reads):
            started_at = time.perf_counter()
            response = client.get(f"/v1/jobs/{job_id}/metrics")
            times.append(time.perf_counter() - started_at)
            assert response.status_code == 200, response.text
    loss = next(series for series in body["series"] if series["name"] == "loss")
    return {
        "steps": steps,
        "curves": len(body["series"]),
        "rows_stored": rows,
        "points_returned": sum(len(series["steps"]) for series in body["series"]),
        "response_bytes": len(response.content),
        "spike_kept": max(loss["values"]) > 2.0,
        "exact_max": loss["max"],
        "feed_s": round(feed_s, 1),
        "get": ms(times),
    }


# -- 5. a dead tracking server --------------------------------------------------------------------


class ExportsStack(RealStack):
    """The production workers: a CPU worker, the control worker (planning, finishing), the exports
    worker and the dispatcher as processes; the API in this process."""

    def _start(self) -> None:
        super()._start()
        self._spawn("worker", "--queue", "exports")
        self._wait(self._workers_ready, 120, "the exports worker to be ready")


def job_in(team_key: str, base_url: str, body: dict[str, Any]) -> str:
    response = httpx.post(
        f"{base_url}/v1/jobs", headers={"Authorization": f"Bearer {team_key}"}, json=body, timeout=60
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def time_to_plan_and_finish(base_url: str, team_key: str, body: dict[str, Any]) -> dict[str, Any]:
    """Submit a job; seconds until it is planned (its stages known) and until it ends."""
    from service.db import session_scope
    from service.models import Job

    started_at = time.perf_counter()
    job_id = job_in(team_key, base_url, body)
    planned_s: float | None = None
    while time.perf_counter() - started_at < 600:
        with session_scope() as session:
            job = session.get(Job, job_id)
            assert job is not None
            if planned_s is None and job.planned:
                planned_s = time.perf_counter() - started_at
            if job.status in ("succeeded", "failed", "cancelled"):
                return {
                    "status": job.status,
                    "planned_s": round(planned_s or time.perf_counter() - started_at, 2),
                    "finished_s": round(time.perf_counter() - started_at, 2),
                }
        time.sleep(0.02)
    return {"status": "timed out", "planned_s": planned_s, "finished_s": None}


def dead_tracking_server(models: Path, data_dir: Path, exports: int) -> dict[str, Any]:
    """One team's MLflow server accepts connections and never answers; that team's ``exports`` free
    (cached) jobs finish, each with an export to it. Another team's new job: its time to planning and
    to its end, on the quiet stack first and then beside the stuck exports."""
    from sqlalchemy import func, select

    from export_support import silent_server
    from service.db import session_scope
    from service.models import Job, JobExport

    env = {"W2S_MODEL_ROOTS": json.dumps([str(models.parent)]), "W2S_API_WORKERS": "1"}
    body = tiny_job_body(models)
    body["weak"]["mode"] = body["strong"]["mode"] = "probe"
    with ExportsStack(data_dir=data_dir, extra_env=env) as stack, silent_server() as server:
        alpha_id, alpha_key = make_team("alpha")
        _beta_id, beta_key = make_team("beta")
        warm_up = time_to_plan_and_finish(stack.base_url, beta_key, body)  # computes what alpha reuses
        quiet = time_to_plan_and_finish(stack.base_url, beta_key, {**body, "seeds": [1]})

        _set_team(alpha_id, mlflow_tracking_uri=server.uri)
        flood_started = time.perf_counter()
        flood = [job_in(alpha_key, stack.base_url, body) for _ in range(exports)]

        def flood_done() -> bool:
            with session_scope() as session:
                done = session.scalar(
                    select(func.count()).where(Job.id.in_(flood), Job.status == "succeeded")
                )
            return done == exports

        stack._wait(flood_done, 600, f"alpha's {exports} jobs")
        flood_s = time.perf_counter() - flood_started
        beside = time_to_plan_and_finish(stack.base_url, beta_key, {**body, "seeds": [2]})
        with session_scope() as session:
            rows = session.execute(
                select(JobExport.attempts, JobExport.token).where(JobExport.team_id == alpha_id)
            ).all()
        return {
            "exports_to_dead_server": len(rows),
            "exports_per_team": _setting("exports_per_team"),
            "export_request_timeout_s": _setting("export_request_timeout_s"),
            "alpha_jobs_all_succeeded_s": round(flood_s, 1),
            "dead_server_connections_open": server.open,
            "dead_server_connections_most_at_once": server.most,
            "dead_server_tries_ended": server.accepted - server.open,
            "alpha_exports_in_flight": sum(token is not None for _, token in rows),
            "alpha_exports_never_tried": sum(attempts == 0 for attempts, _ in rows),
            "beta_warm_up": warm_up,
            "beta_quiet": quiet,
            "beta_beside_dead_exports": beside,
        }


# -- 6. hostile YAML ------------------------------------------------------------------------------

MIB = 1024 * 1024
HOSTILE_YAML = {
    "depth 5,000": b"a: " + b"[" * 5_000 + b"]" * 5_000,
    "depth 10,000": b"a: " + b"[" * 10_000 + b"]" * 10_000,
    "flat 1 MiB list": b"[" + b"1," * ((MIB - 100) // 2) + b"1]",  # just under the 1 MiB body limit
}
YAML_HEADERS = {"Content-Type": "application/yaml"}


def post_yaml_loop(base_url: str, headers: dict[str, str], seconds: float, out: dict[str, Any]) -> None:
    """Post each of HOSTILE_YAML's bodies in turn for ``seconds``; per body, statuses and times."""
    with httpx.Client(base_url=base_url, timeout=120, headers=headers) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for name, body in HOSTILE_YAML.items():
                record = out.setdefault(name, {"statuses": {}, "times": []})
                started_at = time.perf_counter()
                try:
                    status = str(client.post("/v1/jobs", content=body, headers=YAML_HEADERS).status_code)
                except httpx.HTTPError as error:
                    status = type(error).__name__
                record["times"].append(time.perf_counter() - started_at)
                record["statuses"][status] = record["statuses"].get(status, 0) + 1


def hostile_yaml(
    base_url: str, reader: tuple[str, str], hostile: tuple[str, str], seconds: float
) -> dict[str, Any]:
    """/healthz and a reader, quiet and then while three clients post hostile YAML (no key, a
    made-up key, a valid key) for ``seconds``."""
    reader_key, (hostile_id, hostile_key) = reader[1], hostile
    _set_team(hostile_id, requests_per_minute=1_000_000)  # its refusals timed, not its rate limit
    reader_headers = {"Authorization": f"Bearer {reader_key}"}

    def readers(duration: float) -> dict[str, Any]:
        healthz: list[float] = []
        jobs: list[float] = []
        failures: list[str] = []
        threads = [
            threading.Thread(target=read_loop, args=(f"{base_url}/healthz", {}, duration, healthz, failures)),
            threading.Thread(
                target=read_loop, args=(f"{base_url}/v1/jobs", reader_headers, duration, jobs, failures)
            ),
        ]
        for thread in threads:
            thread.start()
        return {"threads": threads, "healthz": healthz, "jobs": jobs, "failures": failures}

    quiet = readers(3.0)
    for thread in quiet["threads"]:
        thread.join()
    attackers = {
        "no key": {},
        "made-up key": {"Authorization": f"Bearer w2s_{uuid.uuid4().hex}"},
        "valid key": {"Authorization": f"Bearer {hostile_key}"},
    }
    answers: dict[str, dict[str, Any]] = {who: {} for who in attackers}
    attack = [
        threading.Thread(target=post_yaml_loop, args=(base_url, headers, seconds, answers[who]))
        for who, headers in attackers.items()
    ]
    for thread in attack:
        thread.start()
    during = readers(seconds)
    for thread in [*attack, *during["threads"]]:
        thread.join()
    refusals = {
        who: {
            name: {"statuses": record["statuses"], **ms(record["times"])} for name, record in bodies.items()
        }
        for who, bodies in answers.items()
    }
    return {
        "healthz_quiet": ms(quiet["healthz"]),
        "healthz_during": ms(during["healthz"]),
        "reader_jobs_quiet": ms(quiet["jobs"]),
        "reader_jobs_during": ms(during["jobs"]),
        "reader_failures": during["failures"][:5],
        "refusals": refusals,
    }


def yaml_goals(figures: dict[str, Any]) -> dict[str, bool]:
    refusals = [body for bodies in figures["refusals"].values() for body in bodies.values()]
    statuses = {status for body in refusals for status in body["statuses"]}
    return {
        "/healthz p99 < 100 ms while hostile YAML arrives": figures["healthz_during"]["p99_ms"] is not None
        and figures["healthz_during"]["p99_ms"] < 100,
        "hostile YAML refused, p99 < 100 ms": bool(refusals)
        and all(body["p99_ms"] is not None and body["p99_ms"] < 100 for body in refusals),
        "hostile YAML: no 5xx, every answer a 4xx": bool(statuses)
        and all(s.startswith("4") for s in statuses),
    }


def run_hostile_yaml(base_url: str, reader: tuple[str, str], hostile: tuple[str, str], seconds: float) -> Any:
    print(f"6. hostile YAML bodies for {seconds:.0f} s (no key, a made-up key, a valid key)", flush=True)
    figures = hostile_yaml(base_url, reader, hostile, seconds)
    print(f"    {json.dumps(figures)}", flush=True)
    return figures


# -- the run ---------------------------------------------------------------------------------------


# -- 7. "already stored" timing on S3 -----------------------------------------------------------


def jsonl_of_size(megabytes: float, seed: int) -> bytes:
    """A valid upload of about ``megabytes``: text rows that no two calls share."""
    import random

    rng = random.Random(seed)
    words = [f"w{rng.randrange(10**6)}" for _ in range(2_000)]
    rows, size = [], 0
    while size < megabytes * 2**20:
        row = json.dumps({"text": " ".join(rng.choices(words, k=60)), "label": rng.randint(0, 1)}) + "\n"
        rows.append(row)
        size += len(row)
    return "".join(rows).encode()


def upload_timing(data_dir: Path, pairs: int, megabytes: float) -> dict[str, Any]:
    """On an S3 store (moto's server in a process of its own), beta uploads bytes; alpha then uploads
    the same bytes ("stored": another team holds them) and fresh bytes ("fresh"), in random order,
    ``pairs`` times. An upload that skips the write when the bytes are already there answers sooner
    for "stored": the distributions would not overlap."""
    import os
    import random
    import socket
    import subprocess

    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    os.environ.update(credentials)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
                    Bucket="w2s-abuse"
                )
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        env = {
            "W2S_API_WORKERS": "1",
            "W2S_ARTIFACT_STORE": "s3://w2s-abuse/store",
            "W2S_STORE_ENDPOINT_URL": endpoint,
            "W2S_STORE_REGION": "us-east-1",
            "W2S_MAX_UPLOADS": str(4 * pairs + 10),
            "W2S_UPLOAD_QUOTA_MB": str(int(4 * pairs * megabytes) + 100),
            "W2S_STORAGE_QUOTA_MB": str(int(4 * pairs * megabytes) + 100),
            **credentials,
        }
        timings: dict[str, list[float]] = {"stored": [], "fresh": []}
        rng = random.Random(0)
        with ApiOnlyStack(data_dir=data_dir, extra_env=env) as stack:
            teams = {name: make_team(name)[1] for name in ("alpha", "beta")}

            def post(team: str, content: bytes) -> float:
                started = time.perf_counter()
                answer = httpx.post(
                    f"{stack.base_url}/v1/datasets",
                    files={"file": ("data.jsonl", content)},
                    headers={"Authorization": f"Bearer {teams[team]}"},
                    timeout=600,
                )
                answer.raise_for_status()
                return time.perf_counter() - started

            for pair in range(pairs):
                shared, fresh = jsonl_of_size(megabytes, 2 * pair), jsonl_of_size(megabytes, 2 * pair + 1)
                post("beta", shared)
                order = [("stored", shared), ("fresh", fresh)]
                rng.shuffle(order)
                for kind, content in order:
                    timings[kind].append(post("alpha", content))
    finally:
        moto.terminate()
        moto.wait(timeout=20)
    stored, fresh = timings["stored"], timings["fresh"]
    return {
        "pairs": pairs,
        "megabytes": megabytes,
        "stored_by_another_team": ms(stored) | {"min_ms": round(min(stored) * 1000, 1)},
        "fresh": ms(fresh) | {"min_ms": round(min(fresh) * 1000, 1)},
        "median_difference_ms": round((statistics.median(fresh) - statistics.median(stored)) * 1000, 1),
        # The ranges overlap, and neither is faster in most pairs.
        "overlap": min(fresh) <= max(stored) and min(stored) <= max(fresh),
        "stored_faster_in_pairs": sum(s < f for s, f in zip(stored, fresh, strict=True)),
    }


def upload_timing_goals(timing: dict[str, Any]) -> dict[str, bool]:
    faster = timing["stored_faster_in_pairs"]
    return {
        "uploads: another team's bytes give no faster answer (distributions overlap)": timing["overlap"]
        and 0.2 * timing["pairs"] <= faster <= 0.8 * timing["pairs"],
    }


# -- 8. a quadratic upload -------------------------------------------------------------------------


def run_quadratic_upload(base_url: str, models: Path, rows: int) -> dict[str, Any]:
    """A team uploads ``rows`` rows whose longest word is the same ("incomprehensibilities film 7",
    "... film 7 again") and submits a job on every row; the job is planned here, as the control
    worker plans it (w2s.splits prepares the rows: the draw, token lengths, the overlap check)."""
    from service.db import session_scope
    from service.models import Job
    from worker.control import plan_job_task

    print(f"8. {rows:,} uploaded rows sharing their longest word, planned", flush=True)
    _, key = make_team("quadratic")
    lines = "".join(
        json.dumps(
            {
                "text": f"incomprehensibilities film {i // 2}" + (" again" if i % 2 else ""),
                "label": i // 2 % 2,
            }
        )
        + "\n"
        for i in range(rows)
    ).encode()
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as client:
        uploaded = client.post(
            "/v1/datasets", files={"file": ("longest-word.jsonl", lines)}, data={"name": "longest-word"}
        )
        uploaded.raise_for_status()
        body = {**tiny_job_body(models), "dataset": {"name": f"upload:{uploaded.json()['id']}"}}
        submitted = client.post("/v1/jobs", json=body)
        submitted.raise_for_status()
    job_id = submitted.json()["id"]
    started_at = time.perf_counter()
    outcome = plan_job_task(job_id)
    plan_s = time.perf_counter() - started_at
    with session_scope() as session:
        job = session.get_one(Job, job_id)
        splits = (job.data_summary or {}).get("datasets", {}).get("0", {}).get("splits", {})
        figures = {
            "rows": rows,
            "upload_mb": round(len(lines) / 1e6, 1),
            "outcome": outcome,
            "planned": job.planned,
            "error": job.error,
            "plan_s": round(plan_s, 1),
            "control_timeout_s": _setting("control_timeout_s"),
            "rows_used": {name: split["rows"] for name, split in splits.items()},
            "overlap_removed": {name: split["overlap_removed"] for name, split in splits.items()},
        }
    print(f"    {json.dumps(figures)}", flush=True)
    return figures


def quadratic_upload_goals(upload: dict[str, Any]) -> dict[str, bool]:
    return {
        "an upload of rows sharing their longest word planned in < a tenth of the control limit": bool(
            upload["planned"]
        )
        and upload["plan_s"] < upload["control_timeout_s"] / 10
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="how long the readers read under the streams"
    )
    parser.add_argument("--keys", type=int, default=2_000)
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="100 streams, 1e5 steps, 8 s of reads")
    parser.add_argument(
        "--dead-exports", type=int, default=50, help="exports to the dead tracking server (phase 5)"
    )
    parser.add_argument(
        "--exports-only", action="store_true", help="run phase 5 (dead tracking server) alone"
    )
    parser.add_argument("--yaml-only", action="store_true", help="run phase 6 (hostile YAML) alone")
    parser.add_argument("--upload-pairs", type=int, default=20, help="phase 7: upload pairs on S3")
    parser.add_argument("--upload-mb", type=float, default=40.0, help="phase 7: each upload's size")
    parser.add_argument("--uploads-only", action="store_true", help="run phase 7 (upload timing on S3) alone")
    parser.add_argument(
        "--overlap-rows", type=int, default=200_000, help="phase 8: rows sharing their longest word"
    )
    parser.add_argument("--overlap-only", action="store_true", help="run phase 8 (quadratic upload) alone")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.streams, args.steps, args.seconds = 100, 100_000, 8.0

    from helpers import build_tiny_bert, write_sst2_like

    folder = Path(__import__("tempfile").mkdtemp(prefix="w2s_abuse_"))
    data_dir = write_sst2_like(folder / "data")
    models = build_tiny_bert(folder / "models" / "tiny-bert")
    env = {"W2S_MODEL_ROOTS": json.dumps([str(folder / "models")]), "W2S_API_WORKERS": "1"}
    figures: dict[str, Any] = {"quick": args.quick}
    if args.uploads_only:
        print(f"7. {args.upload_pairs} pairs of {args.upload_mb:g} MB uploads on S3", flush=True)
        figures["upload_timing"] = upload_timing(data_dir, args.upload_pairs, args.upload_mb)
        print(f"    {json.dumps(figures['upload_timing'])}", flush=True)
        figures["goals"] = upload_timing_goals(figures["upload_timing"])
        print(json.dumps(figures["goals"], indent=2))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        return 0 if all(figures["goals"].values()) else 1
    if args.exports_only:
        print(f"5. {args.dead_exports} exports to a tracking server that never answers", flush=True)
        figures["dead_tracking_server"] = dead_tracking_server(models, data_dir, args.dead_exports)
        print(f"    {json.dumps(figures['dead_tracking_server'])}", flush=True)
        figures["goals"] = dead_server_goals(figures["dead_tracking_server"])
        print(json.dumps(figures["goals"], indent=2))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        return 0 if all(figures["goals"].values()) else 1
    if args.overlap_only:
        with ApiOnlyStack(data_dir=data_dir, extra_env=env) as stack:
            figures["quadratic_upload"] = run_quadratic_upload(stack.base_url, models, args.overlap_rows)
        figures["goals"] = quadratic_upload_goals(figures["quadratic_upload"])
        print(json.dumps(figures["goals"], indent=2))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        return 0 if all(figures["goals"].values()) else 1
    if args.yaml_only:
        with ApiOnlyStack(data_dir=data_dir, extra_env=env) as stack:
            hostile, reader = make_team("hostile"), make_team("reader")
            httpx.post(
                f"{stack.base_url}/v1/jobs",
                headers={"Authorization": f"Bearer {reader[1]}"},
                json=tiny_job_body(models),
                timeout=60,
            ).raise_for_status()
            figures["hostile_yaml"] = run_hostile_yaml(stack.base_url, reader, hostile, args.seconds)
        figures["goals"] = yaml_goals(figures["hostile_yaml"])
        print(json.dumps(figures["goals"], indent=2))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        return 0 if all(figures["goals"].values()) else 1
    with ApiOnlyStack(data_dir=data_dir, extra_env=env) as stack:
        hostile_id, hostile_key = make_team("hostile")
        reader_id, reader_key = make_team("reader")
        submit = {"json": tiny_job_body(models)}
        hostile_job = httpx.post(
            f"{stack.base_url}/v1/jobs",
            headers={"Authorization": f"Bearer {hostile_key}"},
            timeout=60,
            **submit,
        ).json()["id"]
        reader_job = httpx.post(
            f"{stack.base_url}/v1/jobs",
            headers={"Authorization": f"Bearer {reader_key}"},
            timeout=60,
            **submit,
        ).json()["id"]

        print(f"1a. {args.streams} streams under the default cap", flush=True)
        capped = measure_under_streams(
            stack, hostile_key, hostile_job, (reader_job, reader_key), args.streams, 3.0
        )
        figures["streams_capped"] = {
            "statuses": capped["stream_statuses"],
            "cap": _setting("max_streams_per_team"),
        }
        print(f"    {capped['stream_statuses']}", flush=True)

        _set_team(hostile_id, max_streams_per_team=args.streams + 100)
        print(f"1b. {args.streams} streams open (cap raised), readers for {args.seconds:.0f} s", flush=True)
        time.sleep(3.0)  # the capped streams' slots are released
        figures["streams"] = measure_under_streams(
            stack, hostile_key, hostile_job, (reader_job, reader_key), args.streams, args.seconds
        )
        print(f"    {json.dumps(figures['streams'])}", flush=True)

        print("2. oversized sweep", flush=True)
        figures["oversized_sweep"] = oversized_sweep(stack.base_url, reader_key, 20)
        print(
            f"    {figures['oversized_sweep']['refusal']} {figures['oversized_sweep']['statuses']}",
            flush=True,
        )

        print(f"3. a {args.steps:,}-step stage's curves", flush=True)
        figures["metrics"] = million_step_curves(
            stack.base_url, (reader_id, reader_key), reader_job, args.steps, 50
        )
        print(f"    {figures['metrics']}", flush=True)

        figures["hostile_yaml"] = run_hostile_yaml(
            stack.base_url, (reader_id, reader_key), (hostile_id, hostile_key), args.seconds
        )

        figures["quadratic_upload"] = run_quadratic_upload(stack.base_url, models, args.overlap_rows)

        # Last: the throttle then refuses this address's made-up keys for a minute.
        print(f"4. {args.keys} made-up keys", flush=True)
        figures["guessed_keys"] = asyncio.run(guess_keys(stack.base_url, args.keys))
        print(f"    {figures['guessed_keys']}", flush=True)

    print(f"5. {args.dead_exports} exports to a tracking server that never answers", flush=True)
    figures["dead_tracking_server"] = dead_tracking_server(models, data_dir, args.dead_exports)
    print(f"    {json.dumps(figures['dead_tracking_server'])}", flush=True)

    print(f"7. {args.upload_pairs} pairs of {args.upload_mb:g} MB uploads on S3", flush=True)
    figures["upload_timing"] = upload_timing(data_dir, args.upload_pairs, args.upload_mb)
    print(f"    {json.dumps(figures['upload_timing'])}", flush=True)

    streams, keys = figures["streams"], figures["guessed_keys"]
    figures["goals"] = {
        "other teams' read p99 < 200 ms": streams["reader_all"]["p99_ms"] is not None
        and streams["reader_all"]["p99_ms"] < 200,
        "/healthz p99 < 100 ms": streams["healthz"]["p99_ms"] is not None
        and streams["healthz"]["p99_ms"] < 100,
        "database connections busy for streams ≤ 2": (streams["db_busy_max"] or 0) - streams["db_busy_before"]
        <= 2,
        "made-up keys: 429 within the first 100": keys["first_429_at"] is not None
        and keys["first_429_at"] <= 100,
        "oversized sweep refused < 50 ms": figures["oversized_sweep"]["statuses"] == {"422": 20}
        and figures["oversized_sweep"]["refusal"]["p99_ms"] < 50,
        "metric GET of a 1M-step stage < 100 ms": figures["metrics"]["get"]["p99_ms"] < 100,
        **yaml_goals(figures["hostile_yaml"]),
        **dead_server_goals(figures["dead_tracking_server"]),
        **upload_timing_goals(figures["upload_timing"]),
        **quadratic_upload_goals(figures["quadratic_upload"]),
    }
    print(json.dumps(figures["goals"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if all(figures["goals"].values()) else 1


def dead_server_goals(dead: dict[str, Any]) -> dict[str, bool]:
    beside = dead["beta_beside_dead_exports"]
    return {
        "another team's job planned < 5 s beside exports to a dead server": beside["status"] == "succeeded"
        and beside["planned_s"] < 5,
        "exports to the dead server at once ≤ the per-team cap": dead["dead_server_connections_most_at_once"]
        <= dead["exports_per_team"],
    }


def _setting(name: str) -> Any:
    from service.settings import get_settings

    return getattr(get_settings(), name)


def _set_team(team_id: str, **values: Any) -> None:
    from sqlalchemy import update

    from service.db import session_scope
    from service.models import Team

    with session_scope() as session:
        session.execute(update(Team).where(Team.id == team_id).values(**values))


if __name__ == "__main__":
    raise SystemExit(main())

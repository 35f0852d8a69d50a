"""Admission under a shared cluster's load: 50 teams, 100,000 queued stages, a 20,000-stage sweep.

Four measurements, against a fresh Postgres database (and Redis under a key prefix of its own):

1. **round** — dispatch rounds (``service.dispatch.dispatch_round``) with 50 teams x 2,000 ready
   stages: p50 / p99 / max per round while two slots free up before each round (so each round
   admits), and while every slot is full (the idle round).
2. **idle_cpu** — the real dispatcher process over that backlog with every slot full, for 30 s:
   its CPU time as a share of one core.
3. **newcomer** — the real stack (API, dispatcher, control worker, CPU worker): one team submits a
   20,800-stage sweep (4 weak x 5 strong models, 20 seeds, 50 losses); while it is being planned,
   a new team submits a tiny job; the time from that POST to its first stage running.
4. **planning_failure** — a job whose planning fails (a model directory without weights) fails
   alone with its message, and the next team's job still runs to the end.

    python bench/dispatch_load.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from real_stack import PG_ADMIN_URL, REDIS_URL, RealStack  # noqa: E402

KEEP_LOGS = Path(os.environ["W2S_BENCH_KEEP_LOGS"]) if os.environ.get("W2S_BENCH_KEEP_LOGS") else None
HOLD_QUEUE = "hold"  # a queue no worker consumes: the backlog's stages wait there


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# -- a database with a backlog --------------------------------------------------------------------


class BacklogDatabase:
    """A fresh, migrated Postgres database with ``teams`` teams of ``per_team`` ready stages each,
    all in the ``hold`` queue, each team with some GPU-seconds used today."""

    def __init__(self, teams: int, per_team: int):
        self.name = f"w2s_bench_{uuid.uuid4().hex[:10]}"
        self.teams, self.per_team = teams, per_team
        base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        self.url = f"{base}/{self.name}"

    def __enter__(self) -> BacklogDatabase:
        import psycopg
        from alembic import command
        from alembic.config import Config

        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{self.name}"')
        config = Config(str(ROOT / "alembic.ini"))
        config.attributes["database_url"] = self.url
        config.attributes["configure_logger"] = False
        command.upgrade(config, "head")
        self._seed()
        return self

    def __exit__(self, *exc: object) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def _seed(self) -> None:
        from sqlalchemy import create_engine, insert

        from service.models import Job, Stage, Team, TeamUsage, new_id, utcnow

        engine = create_engine(self.url)
        now = utcnow()
        hour = now.replace(minute=0, second=0, microsecond=0)
        rng = random.Random(0)
        with engine.begin() as connection:
            for t in range(self.teams):
                team_id = new_id()
                connection.execute(
                    insert(Team).values(id=team_id, name=f"team-{t}", weight=1.0, created_at=now)
                )
                connection.execute(
                    insert(TeamUsage).values(team_id=team_id, hour=hour, gpu_seconds=rng.uniform(100, 10_000))
                )
                for j in range(self.per_team // 100):  # jobs of 100 stages
                    job_id, created = new_id(), now
                    connection.execute(
                        insert(Job).values(
                            id=job_id,
                            team_id=team_id,
                            status="queued",
                            spec={},
                            dataset="sst2",
                            weak_model="weak",
                            strong_model="strong",
                            planned=True,
                            priority=rng.choice([0, 0, 10, 100]),
                            created_at=created,
                        )
                    )
                    connection.execute(
                        insert(Stage),
                        [
                            {
                                "id": new_id(),
                                "job_id": job_id,
                                "team_id": team_id,
                                "priority": 0,
                                "job_created_at": created,
                                "order": i,
                                "kind": f"student:l{i}",
                                "seed": j,
                                "stage_key": uuid.uuid4().hex,
                                "gpu_class": HOLD_QUEUE,
                                "ready": True,
                            }
                            for i in range(100)
                        ],
                    )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            # What autovacuum does to a table that grew by a hundred thousand rows: fresh statistics.
            connection.exec_driver_sql("ANALYZE")
        engine.dispose()

    def env(self, slots: int) -> dict[str, str]:
        return {
            "W2S_DATABASE_URL": self.url,
            "W2S_QUEUE_SLOTS": json.dumps({HOLD_QUEUE: slots}),
            "W2S_GPU_CLASSES": "{}",
            "W2S_DEFAULT_GPU_QUOTA": "1000",
        }


def _use(env: dict[str, str]) -> None:
    os.environ.update(env)
    from service.db import reset_caches

    reset_caches()


def measure_rounds(db: BacklogDatabase, rounds: int, slots: int = 16) -> dict[str, Any]:
    """Round latency while each round admits (two slots freed before it) and when all are full."""
    from sqlalchemy import select, update

    from service.db import session_scope
    from service.dispatch import dispatch_round
    from service.models import Stage
    from service.settings import get_settings

    _use(db.env(slots))
    settings = get_settings()
    admitting, idle, admitted = [], [], 0
    with session_scope() as session:  # fill the slots once
        dispatch_round(session, settings)
    for _ in range(rounds):
        with session_scope() as session:  # two stages finish: two free slots
            done = session.scalars(select(Stage.id).where(Stage.status == "queued").limit(2)).all()
            session.execute(update(Stage).where(Stage.id.in_(done)).values(status="succeeded"))
        started = time.perf_counter()
        with session_scope() as session:
            report = dispatch_round(session, settings)
        admitting.append((time.perf_counter() - started) * 1000)
        admitted += len(report.admitted)
        started = time.perf_counter()
        with session_scope() as session:
            dispatch_round(session, settings)
        idle.append((time.perf_counter() - started) * 1000)
    return {
        "stages": db.teams * db.per_team,
        "teams": db.teams,
        "slots": slots,
        "rounds": rounds,
        "admitted": admitted,
        "admitting_ms": {
            "p50": percentile(admitting, 50),
            "p99": percentile(admitting, 99),
            "max": max(admitting),
        },
        "idle_ms": {"p50": percentile(idle, 50), "p99": percentile(idle, 99), "max": max(idle)},
    }


def measure_idle_cpu(db: BacklogDatabase, seconds: float, slots: int = 16) -> dict[str, Any]:
    """The dispatcher process's CPU share over ``seconds`` with every slot full."""
    import subprocess

    from service.db import session_scope
    from service.dispatch import dispatch_round
    from service.settings import get_settings

    prefix = f"w2s-bench-{uuid.uuid4().hex[:8]}:"
    env = {**os.environ, **db.env(slots), "W2S_BROKER_URL": REDIS_URL, "W2S_BROKER_KEY_PREFIX": prefix}
    _use(db.env(slots))
    with session_scope() as session:
        dispatch_round(session, get_settings())  # every slot full before it starts
    process = subprocess.Popen(
        [sys.executable, "-m", "w2s_service.cli", "dispatcher"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(8)  # imports and the first rounds
        ticks = os.sysconf("SC_CLK_TCK")

        def cpu_s() -> float:
            fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks

        before, started = cpu_s(), time.monotonic()
        time.sleep(seconds)
        used, wall = cpu_s() - before, time.monotonic() - started
    finally:
        process.terminate()
        process.wait(timeout=30)
        _cleanup_redis(prefix)
    return {"seconds": round(wall, 1), "cpu_s": round(used, 2), "share_of_a_core": used / wall}


def _cleanup_redis(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


# -- the real stack --------------------------------------------------------------------------------


def _models(root: Path, count: int) -> list[str]:
    from helpers import build_tiny_bert

    return [str(build_tiny_bert(root / f"tiny-bert-{i}")) for i in range(count)]


def _stage_running(stack: RealStack, job_id: str, timeout_s: float, headers: dict[str, str]) -> float:
    """Seconds until some stage of the job runs (or has run)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        job = stack.api.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if any(stage["status"] in ("running", "succeeded", "cached") for stage in job["stages"]):
            return time.monotonic() - started
        if job["status"] in ("failed", "cancelled"):
            raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
        time.sleep(0.05)
    raise TimeoutError(f"no stage of {job_id} ran within {timeout_s:.0f} s\n{stack.logs()}")


def _when(stamp: str) -> Any:
    import datetime as dt

    moment = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _wait_job(stack: RealStack, job_id: str, headers: dict[str, str], timeout_s: float) -> dict[str, Any]:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        job = stack.api.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return dict(job)
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not end within {timeout_s:.0f} s\n{stack.logs()}")


def measure_newcomer(workdir: Path, quick: bool) -> dict[str, Any]:
    from helpers import write_sst2_like

    models = _models(workdir / "models", 9)
    data_dir = write_sst2_like(workdir / "data")
    os.environ["W2S_MODEL_ROOTS"] = json.dumps([str(workdir / "models")])
    seeds, losses = (4, 10) if quick else (20, 50)
    grid = {
        "dataset": {"name": "sst2", "n_train": 64, "n_test": 32},
        "weak_models": [{"model": m, "epochs": 1, "max_length": 32} for m in models[:4]],
        "strong_models": [{"model": m, "epochs": 1, "max_length": 32} for m in models[4:]],
        "losses": ["xent"] + [{"name": "logconf", "aux_coef": round(0.01 * i, 2)} for i in range(1, losses)],
        "seeds": list(range(seeds)),
    }
    tiny = {
        "dataset": {"name": "sst2", "n_train": 32, "n_test": 16},
        "weak": {"model": models[0], "epochs": 1, "max_length": 32, "batch_size": 16},
        "strong": {"model": models[0], "epochs": 1, "max_length": 32, "batch_size": 16},
        "losses": ["xent"],
    }
    with RealStack(data_dir=data_dir, queue_slots='{"cpu": 2}', cpu_workers=2, keep_logs=KEEP_LOGS) as stack:
        admin = {"Authorization": f"Bearer {os.environ['W2S_ADMIN_KEY']}"}

        def new_team(name: str) -> dict[str, str]:
            team = stack.api.post("/v1/teams", json={"name": name}, headers=admin).json()
            key = stack.api.post(f"/v1/teams/{team['id']}/keys", json={}, headers=admin).json()["key"]
            return {"Authorization": f"Bearer {key}"}

        # The sweeping team may use one of the two slots at a time (its quota): the other is free.
        stack.api.patch(
            f"/v1/admin/teams/{stack.api.get('/v1/teams/me').json()['id']}",
            json={"max_stages_per_sweep": 30_000, "max_queued_stages": 30_000, "gpu_quota": 1},
            headers=admin,
        )
        # Steady state: each control process has planned a job before (the first job a fresh process
        # plans pays seconds of imports: the model's tokenizer and config code). Two teams, so the two
        # processes each take one.
        warmup = new_team("warm-up")
        warm = [
            (stack.api.post("/v1/jobs", json=tiny | {"seeds": [100 + i]}, headers=h).json()["id"], h)
            for i, h in enumerate([dict(stack.api.headers), warmup])
        ]
        for job_id, headers in warm:
            stack._wait(
                lambda job_id=job_id, headers=headers: any(
                    s["stage_key"]
                    for s in stack.api.get(f"/v1/jobs/{job_id}", headers=headers).json()["stages"]
                ),
                300,
                "the warm-up jobs to be planned",
            )
            stack.api.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
        for job_id, headers in warm:  # until their stages are out of the slots: the newcomer's is free
            _wait_job(stack, job_id, headers, 300)
        posted = time.monotonic()
        sweep = stack.api.post("/v1/sweeps", json=grid, timeout=300)
        sweep.raise_for_status()
        sweep_post_s = time.monotonic() - posted
        jobs = sweep.json()["jobs"]
        stages = sum(len(stack.api.get(f"/v1/jobs/{j}").json()["stages"]) for j in jobs)
        time.sleep(2.0)  # the sweep's planning is under way
        newcomer = new_team("newcomer")
        posted = time.monotonic()
        job_id = stack.api.post("/v1/jobs", json=tiny, headers=newcomer).json()["id"]
        _stage_running(stack, job_id, 600, newcomer)
        first_stage_s = time.monotonic() - posted
        job = stack.api.get(f"/v1/jobs/{job_id}", headers=newcomer).json()
        created = _when(job["created_at"])
        timeline = [
            (round((_when(line["created_at"]) - created).total_seconds(), 2), line["message"][:80])
            for line in stack.api.get(f"/v1/jobs/{job_id}/logs", headers=newcomer).json()["data"]
        ]
        planned = sum(
            1 for j in jobs if any(s["stage_key"] for s in stack.api.get(f"/v1/jobs/{j}").json()["stages"])
        )
        for j in jobs:
            stack.api.post(f"/v1/jobs/{j}/cancel")

        # A job whose planning fails fails alone; the next team's job still runs.
        broken = workdir / "models" / "no-weights"
        broken.mkdir()
        shutil.copy(Path(models[0]) / "config.json", broken / "config.json")
        failing = stack.api.post(
            "/v1/jobs", json=tiny | {"weak": tiny["weak"] | {"model": str(broken)}}
        ).json()
        after = stack.api.post("/v1/jobs", json=tiny | {"seeds": [1]}, headers=newcomer).json()
        failed = stack.wait_job(failing["id"], 300)
        succeeded = _wait_job(stack, after["id"], newcomer, 600)
    return {
        "sweep": {
            "jobs": len(jobs),
            "stages": stages,
            "post_s": sweep_post_s,
            "planned_when_newcomer_ran": planned,
        },
        "newcomer_first_stage_running_s": first_stage_s,
        "newcomer_timeline": timeline,
        "planning_failure": {
            "failed_job": failed["status"],
            "error": failed.get("error"),
            "next_teams_job": succeeded["status"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 teams x 500 stages, a 320-stage sweep")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--only", choices=["backlog", "newcomer"], help="run one part")
    args = parser.parse_args()
    os.environ.setdefault("W2S_ENVIRONMENT", "")
    teams, per_team, rounds, idle_s = (10, 500, 50, 10.0) if args.quick else (50, 2_000, 300, 30.0)
    figures: dict[str, Any] = {"quick": args.quick}
    if args.only != "newcomer":
        with BacklogDatabase(teams, per_team) as db:
            figures["round"] = measure_rounds(db, rounds)
            print(
                f"round with {teams * per_team:,} queued stages of {teams} teams:",
                json.dumps(figures["round"]),
            )
            figures["idle_cpu"] = measure_idle_cpu(db, idle_s)  # over the same backlog
            print("idle dispatcher:", json.dumps(figures["idle_cpu"]))
    workdir = Path(tempfile.mkdtemp(prefix="w2s_dispatch_"))
    try:
        if args.only != "backlog":
            figures["newcomer"] = measure_newcomer(workdir, args.quick)
            print("newcomer during a sweep's planning:", json.dumps(figures["newcomer"]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    figures["targets"] = {
        "round_p99_ms": 50,
        "idle_share_of_a_core": 0.05,
        "newcomer_first_stage_running_s": 2.0,
    }
    print(json.dumps(figures))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""A storm of careless clients and dying processes, on the production stack (Postgres + Redis).

For ``--minutes`` (10), ``--clients`` (20) clients of four teams submit small jobs (sometimes
repeating an Idempotency-Key), cancel, retry, cancel-then-retry a few seconds later, and read, at
random, against a team backlog quota (``max_queued_stages``) that most submissions hit. Meanwhile a
chaos thread kills (SIGKILL, the whole process group) a stage worker, the control worker or the
dispatcher every 10-40 s and starts it again 1-5 s later. The API runs in a process of its own; a
fifth team reads (``GET /v1/teams/me`` and its job list) ten times a second all along.

Then the chaos stops, every process runs, and the storm's jobs are left to settle. Figures:

- stuck jobs: still open ``--settle-s`` after the storm (goal 0), with the doctor's findings;
- stages run twice concurrently: attempts of one stage that overlapped in time (from the workers'
  "attempt N started/ended" log lines), split by cause; goal 0 that no retry, requeue or lost worker
  explains, and 0 outcomes accepted from a superseded attempt;
- quota overshoot: the most stages a team had waiting or running over its quota, and the most
  stages in flight on a queue over its slots, sampled every 0.25 s (goal 0);
- 5xx answers and transport errors (goal 0);
- the other team's read latency during the storm, p50 / p99 / max (goal p99 < 200 ms);
- retried afterwards: failed and cancelled jobs retried by a careful client; all should succeed.

    python bench/race_storm.py                         # 10 minutes, 20 clients
    python bench/race_storm.py --quick                 # 2 minutes
    python bench/race_storm.py --minutes 3 --json /tmp/storm.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from real_stack import RealStack, free_port  # noqa: E402

TEAMS = 4
BACKLOG_QUOTA = 12  # stages waiting or running per storm team: four 3-stage jobs
SLOTS = {"cpu": 2}
VICTIMS = ("worker-cpu-0", "worker-cpu-1", "worker-control", "dispatcher")
ATTEMPT_LINE = re.compile(  # worker.tasks' lines, as the worker's log format writes them
    r"(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*?stage (?P<stage>[0-9a-f]{32}) "
    r"attempt (?P<fence>\d+) (?P<what>started|ended)"
)
DISCARDED = "outcome of superseded attempt"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class StormStack(RealStack):
    """RealStack with the API in a process of its own, and processes that can be killed by name (the
    whole group: Celery's pool children die with their parent) and started again."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.named: dict[str, tuple[tuple[str, ...], subprocess.Popen[bytes]]] = {}
        self.incarnations: Counter[str] = Counter()
        self.killed_at: dict[str, float] = {}  # log file -> wall time its process was killed

    def _spawn(self, *args: str) -> None:
        name = args[0]
        if args[0] == "worker":
            name = f"worker-{args[2]}"
            if args[2] == "cpu":
                name += f"-{sum(other.startswith('worker-cpu') for other in self.named)}"
        self.start(name, args)

    def start(self, name: str, args: tuple[str, ...]) -> None:
        self.incarnations[name] += 1
        log_path = self.workdir / "logs" / f"{name}.{self.incarnations[name]}.log"
        log = open(log_path, "wb")  # noqa: SIM115  (the child owns it)
        process = subprocess.Popen(
            [sys.executable, "-m", "w2s_service.cli", *args],
            env={**os.environ, **self.env},
            cwd=ROOT,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        self.named[name] = (args, process)
        self.processes = [process for _, process in self.named.values()]

    def kill(self, name: str) -> None:
        _args, process = self.named[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self.killed_at[f"{name}.{self.incarnations[name]}.log"] = time.time()

    def restart(self, name: str) -> None:
        args, _ = self.named[name]
        self.start(name, args)

    def revive_all(self) -> None:
        for name, (args, process) in list(self.named.items()):
            if process.poll() is not None:
                self.start(name, args)

    def _serve(self) -> None:
        port = free_port()
        self.start("api", ("api", "--host", "127.0.0.1", "--port", str(port)))
        self.base_url = f"http://127.0.0.1:{port}"

    def _workers_ready(self) -> bool:
        logs = [self.workdir / "logs" / f"{name}.1.log" for name in self.named if name.startswith("worker")]
        return bool(logs) and all(" ready." in path.read_text(errors="replace") for path in logs)


# -- the storm's clients ---------------------------------------------------------------------------


def job_body(models: Path, rng: random.Random) -> dict[str, Any]:
    options = {"epochs": 2, "lr": 1e-3, "batch_size": 16, "max_length": 32}
    return {
        "dataset": {"name": "sst2", "n_train": 192, "n_test": 64},
        "weak": {"model": str(models), **options},
        "strong": {"model": str(models), **options},
        "losses": rng.choice([["xent"], ["xent"], ["logconf"]]),
        # Mostly a seed of its own, so its stages train; sometimes one of three shared seeds, so stages
        # with equal keys (run once, completed from each other's results) are in the storm too.
        "seeds": [rng.randrange(3) if rng.random() < 0.3 else rng.randrange(1_000_000)],
    }


async def client_loop(
    index: int,
    base_url: str,
    key: str,
    models: Path,
    stop: asyncio.Event,
    codes: Counter[str],
    errors: list[str],
) -> list[str]:
    import httpx

    rng = random.Random(index)
    headers = {"Authorization": f"Bearer {key}"}
    jobs: list[str] = []
    last: tuple[str, dict[str, Any]] | None = None  # (idempotency key, body)

    async def call(client: httpx.AsyncClient, action: str, method: str, url: str, **kw: Any) -> Any:
        try:
            response = await client.request(method, url, headers={**headers, **kw.pop("headers", {})}, **kw)
        except httpx.HTTPError as error:
            codes[f"{action} transport error"] += 1
            errors.append(f"{action} {url}: {type(error).__name__}: {error}")
            return None
        codes[f"{action} {response.status_code}"] += 1
        if response.status_code >= 500:
            errors.append(f"{action} {url}: {response.status_code} {response.text[:300]}")
        return response

    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        while not stop.is_set():
            action = rng.choices(["submit", "cancel", "retry", "cancel_retry", "read"], [4, 2, 2, 2, 1])[0]
            if action == "submit":
                if last is not None and rng.random() < 0.25:
                    idempotency_key, body = last  # a careless client sends the same request again
                else:
                    idempotency_key, body = uuid.uuid4().hex, job_body(models, rng)
                    last = (idempotency_key, body)
                response = await call(
                    client,
                    "submit",
                    "POST",
                    "/v1/jobs",
                    json=body,
                    headers={"Idempotency-Key": idempotency_key},
                )
                if response is not None and response.status_code in (200, 201):
                    job_id = response.json()["id"]
                    if job_id not in jobs:
                        jobs.append(job_id)
            elif jobs:
                job_id = rng.choice(jobs[-8:])
                if action in ("cancel", "cancel_retry"):
                    await call(client, "cancel", "POST", f"/v1/jobs/{job_id}/cancel")
                if action == "cancel_retry":
                    await asyncio.sleep(rng.uniform(0.5, 3.0))  # the retry lands while a stage trains
                if action in ("retry", "cancel_retry"):
                    await call(client, "retry", "POST", f"/v1/jobs/{job_id}/retry")
                if action == "read":
                    await call(client, "read", "GET", f"/v1/jobs/{job_id}")
            await asyncio.sleep(rng.uniform(0.1, 1.0))
    return jobs


def observe(base_url: str, key: str, seconds: float, out: Path) -> None:
    """Another team's reads, 10 a second, in a process of its own: latency in seconds per read."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        turn = 0
        while time.monotonic() < deadline:
            url = "/v1/teams/me" if turn % 2 == 0 else "/v1/jobs?limit=20"
            turn += 1
            started = time.perf_counter()
            try:
                response = client.get(url)
                if response.status_code != 200:
                    failures.append(f"{url}: {response.status_code}")
            except httpx.HTTPError as error:
                failures.append(f"{url}: {type(error).__name__}")
            latencies.append(time.perf_counter() - started)
            time.sleep(max(0.0, 0.1 - (time.perf_counter() - started)))
    out.write_text(json.dumps({"latencies": latencies, "failures": failures}))


# -- what runs beside the clients --------------------------------------------------------------------


def chaos(stack: StormStack, stop: threading.Event, kills: list[dict[str, Any]], seed: int) -> None:
    rng = random.Random(seed)
    while not stop.wait(rng.uniform(10, 40)):
        victim = rng.choice(VICTIMS)
        stack.kill(victim)
        down_s = rng.uniform(1, 5)
        kills.append({"process": victim, "at": time.time(), "down_s": round(down_s, 1)})
        print(f"  killed {victim}; back in {down_s:.1f} s", flush=True)
        stop.wait(down_s)
        stack.restart(victim)


def monitor(stop: threading.Event, teams: list[str], peaks: dict[str, Any]) -> None:
    """Every 0.25 s: stages waiting or running per storm team against its quota, in flight per queue
    against its slots (committed state, read as any client would)."""
    from sqlalchemy import func, select

    from service.db import session_scope
    from service.limits import WAITING
    from service.models import Stage
    from service.states import STAGE_ACTIVE

    active = [str(status) for status in STAGE_ACTIVE]
    while not stop.wait(0.25):
        with session_scope(read_only=True) as session:
            backlog = dict(
                session.execute(
                    select(Stage.team_id, func.count())
                    .where(Stage.status.in_(WAITING), Stage.team_id.in_(teams))
                    .group_by(Stage.team_id)
                ).all()
            )
            in_flight = dict(
                session.execute(
                    select(Stage.gpu_class, func.count())
                    .where(Stage.status.in_(active))
                    .group_by(Stage.gpu_class)
                ).all()
            )
        peaks["samples"] += 1
        peaks["backlog_max"] = max(peaks["backlog_max"], *backlog.values(), 0)
        peaks["in_flight_max"] = max(peaks["in_flight_max"], *in_flight.values(), 0)
        peaks["backlog_overshoot"] = max(
            peaks["backlog_overshoot"], *(n - BACKLOG_QUOTA for n in backlog.values()), 0
        )
        peaks["slot_overshoot"] = max(
            peaks["slot_overshoot"], *(n - SLOTS.get(queue or "cpu", 0) for queue, n in in_flight.items()), 0
        )


# -- afterwards --------------------------------------------------------------------------------------


def open_jobs(job_ids: list[str]) -> list[tuple[str, str]]:
    from sqlalchemy import select

    from service.db import session_scope
    from service.models import Job
    from service.states import JOB_OPEN

    with session_scope(read_only=True) as session:
        return list(
            session.execute(
                select(Job.id, Job.status).where(
                    Job.id.in_(job_ids), Job.status.in_([str(s) for s in JOB_OPEN])
                )
            ).all()
        )


def statuses(job_ids: list[str]) -> Counter[str]:
    from sqlalchemy import select

    from service.db import session_scope
    from service.models import Job

    with session_scope(read_only=True) as session:
        return Counter(session.scalars(select(Job.status).where(Job.id.in_(job_ids))))


def settle(job_ids: list[str], timeout_s: float) -> tuple[float, list[tuple[str, str]]]:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        still = open_jobs(job_ids)
        if not still:
            return time.monotonic() - started, []
        time.sleep(2)
    return time.monotonic() - started, open_jobs(job_ids)


def doctor_findings() -> list[dict[str, Any]]:
    from service import doctor
    from service.db import session_scope
    from service.settings import get_settings

    with session_scope(read_only=True) as session:
        return [finding.to_dict() for finding in doctor.checkup(session, get_settings()).findings]


def retry_afterwards(
    stack: StormStack,
    keys: dict[str, str],
    job_ids_by_team: dict[str, list[str]],
    sample: int,
    timeout_s: float,
) -> dict[str, Any]:
    """A careful client retries failed and cancelled jobs (waiting out 429s); all should succeed."""
    import httpx
    from sqlalchemy import select

    from service.db import session_scope
    from service.models import Job

    chosen: list[tuple[str, str]] = []
    with session_scope(read_only=True) as session:
        for team_id, job_ids in job_ids_by_team.items():
            ended = session.scalars(
                select(Job.id)
                .where(Job.id.in_(job_ids), Job.status.in_(["failed", "cancelled"]))
                .order_by(Job.id)
            ).all()
            chosen += [(team_id, job_id) for job_id in ended[: max(1, sample // len(job_ids_by_team))]]
    deadline = time.monotonic() + timeout_s
    pending = list(chosen)
    while pending and time.monotonic() < deadline:
        team_id, job_id = pending.pop(0)
        response = httpx.post(
            f"{stack.base_url}/v1/jobs/{job_id}/retry",
            headers={"Authorization": f"Bearer {keys[team_id]}"},
            timeout=60,
        )
        if response.status_code == 429:
            pending.append((team_id, job_id))
            time.sleep(1)
    waited, still_open = settle([job_id for _, job_id in chosen], max(0.0, deadline - time.monotonic()))
    outcome = statuses([job_id for _, job_id in chosen])
    return {
        "retried": len(chosen),
        "not_sent_in_time": len(pending),
        "succeeded": outcome.get("succeeded", 0),
        "outcomes": dict(outcome),
        "still_open": len(still_open),
        "seconds": round(waited, 1),
    }


def attempt_overlaps(stack: StormStack) -> dict[str, Any]:
    """Attempts per stage from every worker log (start, end; a killed worker's attempts end when it
    was killed), and the pairs of one stage's attempts that overlapped, by what the job's log says
    superseded the earlier one."""
    from sqlalchemy import select

    from service.db import session_scope
    from service.models import LogLine, Stage

    attempts: dict[tuple[str, int], dict[str, float]] = {}
    discarded = 0
    for path in sorted((stack.workdir / "logs").glob("worker-*.log")):
        text = path.read_text(errors="replace")
        discarded += text.count(DISCARDED)
        for match in ATTEMPT_LINE.finditer(text):
            at = dt.datetime.strptime(match["at"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            attempt = attempts.setdefault((match["stage"], int(match["fence"])), {"log": path.name})  # type: ignore[dict-item]
            attempt[match["what"]] = at
    for attempt in attempts.values():
        if "ended" not in attempt:
            attempt["ended"] = stack.killed_at.get(str(attempt["log"]), time.time())
    by_stage: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for (stage_id, fence), attempt in attempts.items():
        if "started" in attempt:
            by_stage.setdefault(stage_id, []).append((fence, attempt))
    causes: Counter[str] = Counter()
    longest = 0.0
    with session_scope(read_only=True) as session:
        for stage_id, runs in by_stage.items():
            runs.sort()
            for (_, first), (_, second) in itertools.pairwise(runs):
                overlap = min(first["ended"], second["ended"]) - second["started"]
                if overlap <= 0:
                    continue
                longest = max(longest, overlap)
                job_id = session.scalar(select(Stage.job_id).where(Stage.id == stage_id))
                messages = session.scalars(
                    select(LogLine.message).where(
                        LogLine.job_id == job_id,
                        LogLine.created_at >= dt.datetime.fromtimestamp(first["started"] - 1, dt.UTC),
                        LogLine.created_at <= dt.datetime.fromtimestamp(second["started"] + 1, dt.UTC),
                    )
                ).all()
                if any("retry requested" in m for m in messages):
                    causes["the job was retried (the old attempt stops at its next step)"] += 1
                elif any("no heartbeat" in m or "was lost" in m for m in messages):
                    causes["its heartbeat lapsed (requeued as lost)"] += 1
                else:
                    causes["unexplained"] += 1
    return {
        "attempts": len(attempts),
        "overlapping_pairs": sum(causes.values()),
        "by_cause": dict(causes),
        "unexplained": causes.get("unexplained", 0),
        "longest_overlap_s": round(longest, 2),
        "superseded_outcomes_discarded": discarded,
    }


# -- the run -----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument(
        "--settle-s", type=float, default=600.0, help="how long the storm's jobs may take to end"
    )
    parser.add_argument(
        "--retry-sample", type=int, default=20, help="failed/cancelled jobs retried afterwards"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 minutes")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep-logs", type=Path, help="copy the processes' logs here")
    parser.add_argument(
        "--observe", nargs=4, metavar=("URL", "KEY", "SECONDS", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.observe:
        url, key, seconds, out = args.observe
        observe(url, key, float(seconds), Path(out))
        return 0
    minutes = 2.0 if args.quick else args.minutes

    from helpers import build_tiny_bert, write_sst2_like

    folder = Path(tempfile.mkdtemp(prefix="w2s_storm_"))
    models = build_tiny_bert(folder / "models" / "tiny-bert")
    data = write_sst2_like(folder / "data", n_train=400, n_test=100)
    extra = {
        "W2S_MODEL_ROOTS": json.dumps([str(folder / "models")]),
        # Faults are found in seconds here, not minutes: the storm kills a process every 10-40 s.
        "W2S_HEARTBEAT_INTERVAL_S": "2",
        "W2S_HEARTBEAT_TIMEOUT_S": "10",
        "W2S_CLAIM_LEASE_S": "5",
        "W2S_CONTROL_LEASE_S": "5",
        "W2S_REDELIVER_AFTER_S": "30",
        "W2S_RETRY_BACKOFF_S": "1",
    }
    stack = StormStack(
        data_dir=data, queue_slots=json.dumps(SLOTS), cpu_workers=2, extra_env=extra, keep_logs=args.keep_logs
    )
    with stack:
        from sqlalchemy import update

        from service.auth import create_api_key, create_team
        from service.db import session_scope
        from service.models import Team

        keys: dict[str, str] = {}
        with session_scope() as session:
            for index in range(TEAMS + 1):
                team = create_team(session, name=f"storm-{index}" if index < TEAMS else "reader")
                _, keys[team.id] = create_api_key(session, team=team)
            storm_teams = list(keys)[:TEAMS]
            session.execute(
                update(Team).where(Team.id.in_(storm_teams)).values(max_queued_stages=BACKLOG_QUOTA)
            )
        reader = list(keys)[TEAMS]
        print(
            f"storm: {args.clients} clients of {TEAMS} teams for {minutes:g} min; API {stack.base_url}",
            flush=True,
        )

        storm_s = minutes * 60
        observer_out = folder / "observer.json"
        observer = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--observe",
                stack.base_url,
                keys[reader],
                str(storm_s),
                str(observer_out),
            ],
            cwd=ROOT,
        )
        stop = threading.Event()
        kills: list[dict[str, Any]] = []
        peaks: dict[str, Any] = {
            "samples": 0,
            "backlog_max": 0,
            "in_flight_max": 0,
            "backlog_overshoot": 0,
            "slot_overshoot": 0,
        }
        threads = [
            threading.Thread(target=chaos, args=(stack, stop, kills, args.seed), daemon=True),
            threading.Thread(target=monitor, args=(stop, storm_teams, peaks), daemon=True),
        ]
        for thread in threads:
            thread.start()
        codes: Counter[str] = Counter()
        errors: list[str] = []

        async def storm() -> list[list[str]]:
            stop_clients = asyncio.Event()
            loops = [
                asyncio.create_task(
                    client_loop(
                        i, stack.base_url, keys[storm_teams[i % TEAMS]], models, stop_clients, codes, errors
                    )
                )
                for i in range(args.clients)
            ]
            await asyncio.sleep(storm_s)
            stop_clients.set()
            return list(await asyncio.gather(*loops))

        started = time.monotonic()
        per_client = asyncio.run(storm())
        storm_wall = time.monotonic() - started
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        stack.revive_all()
        observer.wait(timeout=120)
        jobs_by_team: dict[str, list[str]] = {team: [] for team in storm_teams}
        for index, job_ids in enumerate(per_client):
            jobs_by_team[storm_teams[index % TEAMS]] += job_ids
        all_jobs = sorted({job_id for job_ids in jobs_by_team.values() for job_id in job_ids})
        print(f"storm over after {storm_wall:.0f} s: {len(all_jobs)} jobs; settling", flush=True)

        settle_s, stuck = settle(all_jobs, args.settle_s)
        findings = doctor_findings()
        end_states = statuses(all_jobs)
        print(
            f"settled in {settle_s:.0f} s: {dict(end_states)}; stuck {len(stuck)}; doctor {len(findings)}",
            flush=True,
        )
        retried = retry_afterwards(stack, keys, jobs_by_team, args.retry_sample, args.settle_s)
        print(f"retried afterwards: {retried}", flush=True)
        overlaps = attempt_overlaps(stack)
        findings_after = doctor_findings()

    seen = json.loads(observer_out.read_text())
    latencies = [s * 1000 for s in seen["latencies"]]
    server_errors = sum(n for code, n in codes.items() if code.split()[-1].startswith("5"))
    transport_errors = sum(n for code, n in codes.items() if code.endswith("transport error"))
    figures = {
        "minutes": minutes,
        "clients": args.clients,
        "teams": TEAMS,
        "backlog_quota": BACKLOG_QUOTA,
        "slots": SLOTS,
        "requests": sum(codes.values()),
        "responses": dict(sorted(codes.items())),
        "server_errors": server_errors,
        "transport_errors": transport_errors,
        "errors_sample": errors[:10],
        "kills": Counter(kill["process"] for kill in kills),
        "kills_total": len(kills),
        "jobs": len(all_jobs),
        "end_states": dict(end_states),
        "settle_s": round(settle_s, 1),
        "stuck_jobs": len(stuck),
        "stuck_sample": stuck[:10],
        "doctor_findings": len(findings),
        "doctor_sample": findings[:10],
        "doctor_findings_at_end": len(findings_after),
        "quota": peaks,
        "attempts": overlaps,
        "retried_afterwards": retried,
        "reader": {
            "reads": len(latencies),
            "failures": len(seen["failures"]),
            "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
            "p99_ms": round(percentile(latencies, 99), 1) if latencies else None,
            "max_ms": round(max(latencies), 1) if latencies else None,
        },
    }
    figures["goals"] = {
        "stuck jobs = 0": figures["stuck_jobs"] == 0,
        "stages run twice concurrently (unexplained overlaps) = 0": overlaps["unexplained"] == 0,
        "quota overshoot = 0": peaks["backlog_overshoot"] == 0 and peaks["slot_overshoot"] == 0,
        "5xx = 0": server_errors == 0 and transport_errors == 0,
        "another team's read p99 < 200 ms": bool(latencies) and percentile(latencies, 99) < 200,
        "retried failures succeed": retried["succeeded"] == retried["retried"],
    }
    print(json.dumps(figures, indent=2, default=str))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0 if all(figures["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

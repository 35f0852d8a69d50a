"""A long run on the embedded default (SQLite and the filesystem broker): ``w2s-service dev`` on a
fresh state directory runs ``--stages`` probe stages back to back (tiny random-initialised BERTs on
generated sst2-like rows; jobs of ``--losses`` losses x up to 40 seeds, each job its own seeds, so
no stage is a cached copy of another; two jobs open at once, so the queue never runs dry between
jobs). It prints the stages run, the crashes (dev's children restarted, Celery's "Unrecoverable
error", broker messages set aside as undecodable), the stages that failed or needed a second
attempt, and the time between consecutive stage finishes (median, p99, longest).

Issue 28, item 7: a 280-stage job once stopped ``dev`` (a message file read while kombu's writer
had created it but not written it yet); the bar is 10,000 stages with no crash.

    python bench/embedded_soak.py [--stages 10000] [--losses 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import httpx  # noqa: E402

SEEDS_PER_JOB = 40
OPEN_JOBS = 2
TERMINAL = ("succeeded", "failed", "cancelled")


def start_dev(work: Path, model: Path, data: Path) -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    """``w2s-service dev`` with nothing but the state, data and model folders set; its API and a key."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("W2S_")},
        "W2S_STATE_DIR": str(work / "state"),
        "W2S_DATA_DIR": str(data),
        "W2S_MODEL_ROOTS": json.dumps([str(model.parent)]),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    log = open(work / "dev.log", "w")  # noqa: SIM115  (the child writes it)
    dev = subprocess.Popen(
        [sys.executable, "-m", "w2s_service.cli", "dev", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    key = None
    while key is None:
        if dev.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"dev did not start:\n{(work / 'dev.log').read_text()[-3000:]}")
        text = (work / "dev.log").read_text()
        key = next((line.rsplit(" ", 1)[1] for line in text.splitlines() if "(shown once):" in line), None)
        time.sleep(0.5)
    while True:
        try:
            if httpx.get(f"{api}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"dev was not ready:\n{(work / 'dev.log').read_text()[-3000:]}")
        time.sleep(0.5)
    return dev, api, {"Authorization": f"Bearer {key}"}


def job_spec(model: Path, losses: int, seeds: list[int]) -> dict[str, Any]:
    options = {"mode": "probe", "epochs": 2, "batch_size": 16, "max_length": 32}
    return {
        "dataset": {"name": "sst2", "n_train": 100, "n_test": 40},
        "weak": {"model": str(model), **options},
        "strong": {"model": str(model), **options, "weight_decay": 0.01},
        "losses": [
            "xent",
            "product",
            {"name": "logconf", "aux_coef": 0.5},
            {"name": "logconf", "aux_coef": 0.25},
            {"name": "logconf", "aux_coef": 0.75},
        ][:losses],
        "seeds": seeds,
    }


def tally(database: Path) -> dict[str, Any]:
    """What ran, read from the embedded database itself: exact even when dev died mid-job."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        stages = dict(db.execute("SELECT status, count(*) FROM stages GROUP BY status").fetchall())
        jobs = dict(db.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())
        retried = db.execute("SELECT count(*) FROM stages WHERE attempts > 1").fetchone()[0]
        finished = db.execute(
            "SELECT finished_at FROM stages WHERE status = 'succeeded' ORDER BY finished_at"
        ).fetchall()
    finishes = [dt.datetime.fromisoformat(at) for (at,) in finished]
    return {"stages": stages, "jobs": jobs, "retried": retried, "finishes": finishes}


def crash_lines(log: str) -> dict[str, list[str]]:
    lines = log.splitlines()
    return {
        "restarts": [line for line in lines if re.search(r"w2s-service: .* exited with code", line)],
        "unrecoverable": [line for line in lines if "Unrecoverable error" in line],
        "set_aside": [line for line in lines if "did not decode" in line],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", type=int, default=10_000, help="stages to run (10,000)")
    parser.add_argument("--losses", type=int, default=5, choices=range(1, 6))
    parser.add_argument("--time-limit-s", type=float, default=3 * 3600, help="stop submitting after this")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from helpers import build_tiny_bert, write_sst2_like

    work = Path(tempfile.mkdtemp(prefix="w2s_soak_"))
    model = build_tiny_bert(work / "models" / "tiny-bert")
    data = write_sst2_like(work / "data")
    per_seed = 2 + args.losses  # the weak model, the strong ceiling, one student per loss
    dev, api, headers = start_dev(work, model, data)
    print(f"dev running; state in {work / 'state'}; log {work / 'dev.log'}", flush=True)
    started = time.monotonic()
    open_jobs: list[str] = []
    submitted = next_seed = ran = 0
    last_report = 0
    timed_out = False
    try:
        while True:
            if dev.poll() is not None:
                print("dev exited", flush=True)
                break
            out_of_time = time.monotonic() - started > args.time_limit_s
            timed_out = timed_out or out_of_time
            try:
                while len(open_jobs) < OPEN_JOBS and submitted < args.stages and not out_of_time:
                    seeds = min(SEEDS_PER_JOB, math.ceil((args.stages - submitted) / per_seed))
                    spec = job_spec(model, args.losses, list(range(next_seed, next_seed + seeds)))
                    answer = httpx.post(f"{api}/v1/jobs", json=spec, headers=headers, timeout=60)
                    answer.raise_for_status()
                    open_jobs.append(answer.json()["id"])
                    next_seed += seeds
                    submitted += seeds * per_seed
                for job_id in list(open_jobs):
                    job = httpx.get(f"{api}/v1/jobs/{job_id}", headers=headers, timeout=60).json()
                    if job["status"] in TERMINAL:
                        open_jobs.remove(job_id)
                        ran += sum(stage["status"] == "succeeded" for stage in job["stages"])
            except httpx.TransportError:  # the API went away: dev is stopping (checked above)
                time.sleep(2)
                continue
            if not open_jobs:
                break
            if ran - last_report >= 500:
                last_report = ran
                elapsed = time.monotonic() - started
                print(f"{elapsed:7.0f} s: {ran} stages run, {ran / elapsed:.2f}/s", flush=True)
            time.sleep(2)
        wall = time.monotonic() - started
        ran_what = tally(work / "state" / "service.db")
        stages, jobs, finishes = ran_what["stages"], ran_what["jobs"], ran_what["finishes"]
        gaps = sorted((b - a).total_seconds() for a, b in itertools.pairwise(finishes))
        crashes = crash_lines((work / "dev.log").read_text())
        set_aside = list((work / "state" / "broker" / "broken").glob("*"))
        figures = {
            "stages_asked": args.stages,
            "stages_run": len(finishes),
            "stages_cached": stages.get("cached", 0),
            "stages_failed": stages.get("failed", 0),
            "stages_not_run": sum(n for status, n in stages.items() if status not in ("succeeded", "cached")),
            "stages_attempted_twice": ran_what["retried"],
            "jobs": sum(jobs.values()),
            "jobs_succeeded": jobs.get("succeeded", 0),
            "child_restarts": len(crashes["restarts"]),
            "unrecoverable_errors": len(crashes["unrecoverable"]),
            "messages_set_aside": len(set_aside),
            "crash_lines": [*crashes["restarts"], *crashes["unrecoverable"], *crashes["set_aside"]][:10],
            "dev_alive": dev.poll() is None,
            "stopped_at_time_limit": timed_out,
            "wall_s": round(wall, 1),
            "per_stage_median_s": round(statistics.median(gaps), 3) if gaps else None,
            "per_stage_p99_s": round(gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], 3) if gaps else None,
            "per_stage_longest_s": round(gaps[-1], 3) if gaps else None,
            "per_stage_mean_s": round(statistics.mean(gaps), 3) if gaps else None,
            "load_average": os.getloadavg(),
        }
        print(json.dumps(figures, indent=2), flush=True)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        healthy = (
            figures["stages_run"] >= args.stages
            and figures["child_restarts"] == figures["unrecoverable_errors"] == 0
            and figures["stages_failed"] == figures["stages_not_run"] == 0
            and figures["dev_alive"]
        )
        return 0 if healthy else 1
    finally:
        with contextlib.suppress(ProcessLookupError):  # none left when dev stopped them all itself
            os.killpg(dev.pid, signal.SIGTERM)
        try:
            dev.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)


if __name__ == "__main__":
    raise SystemExit(main())

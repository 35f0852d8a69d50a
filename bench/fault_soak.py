"""Soak the fault cases: run each test of tests/svc/test_faults.py N times (10 by default) and
print how often each passed, with its wall times.

    python bench/fault_soak.py                    # 10 loops of every case, Postgres outage 30 s
    python bench/fault_soak.py --loops 3 --only killed --json bench/results/fault_soak.json

Each loop is a fresh pytest process: fresh private Redis/Postgres, fresh workers, fresh database.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "killed": "test_worker_killed_mid_stage_is_redelivered_and_matches_an_uninterrupted_run",
    "redis": "test_redis_restart_while_jobs_run",
    "postgres": "test_postgres_stopped_then_back_loses_nothing",
    "api": "test_api_restart_mid_job_changes_nothing",
    "failing": "test_a_stage_that_keeps_failing_stops_after_bounded_attempts",
}


def run_case(test: str, outage_s: float) -> tuple[bool, float, str]:
    env = {**os.environ, "W2S_FAULT_PG_OUTAGE_S": str(outage_s)}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    started = time.perf_counter()
    done = subprocess.run(
        [*command, f"tests/svc/test_faults.py::{test}"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    return done.returncode == 0, time.perf_counter() - started, done.stdout[-2000:]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loops", type=int, default=10)
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="cases to run (default: all)")
    parser.add_argument("--outage-s", type=float, default=30.0, help="how long Postgres stays stopped")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    names = args.only or list(CASES)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    failures: dict[str, list[str]] = {name: [] for name in names}
    figures: dict[str, Any] = {"loops": args.loops, "postgres_outage_s": args.outage_s, "cases": {}}
    # Round-robin over the cases, figures written after every run: a soak cut short still reports
    # every case, over the loops it finished.
    for loop in range(args.loops):
        for name in names:
            passed, elapsed, output = run_case(CASES[name], args.outage_s)
            seconds[name].append(elapsed)
            if not passed:
                failures[name].append(f"loop {loop}: {output[-600:]}")
            print(f"{name:9s} loop {loop + 1}/{args.loops}: {'pass' if passed else 'FAIL'} ({elapsed:.0f} s)")
            figures["cases"][name] = {
                "test": CASES[name],
                "passed": len(seconds[name]) - len(failures[name]),
                "failed": len(failures[name]),
                "median_s": statistics.median(seconds[name]),
                "max_s": max(seconds[name]),
                "failures": failures[name],
            }
            figures["loops_done"] = loop + 1 if name == names[-1] else loop
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print()
    print(f"{'case':10s} {'passed':>8s} {'median s':>9s} {'max s':>7s}")
    for name, case in figures["cases"].items():
        passed = f"{case['passed']}/{case['passed'] + case['failed']}"
        print(f"{name:10s} {passed:>8s} {case['median_s']:9.0f} {case['max_s']:7.0f}")
    return 0 if all(case["failed"] == 0 for case in figures["cases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

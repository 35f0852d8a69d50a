"""The README's figures of the example job, from a recorded run rather than by hand.

    python scripts/readme_results.py record --job runs/job.json --watch runs/job-watch.json \\
        --out runs/example-record.json --wall-s install=95 models=14 stack=9 job=190 total=310
    python scripts/readme_results.py render          # README.md's generated blocks, from RECORD
    python scripts/readme_results.py render --check  # exit 1 if README.md differs from RECORD

`bash scripts/run-example.sh` runs ``record`` after every run (runs/example-record.json);
`bash scripts/run-example.sh --record` copies that record to RECORD and runs ``render``.
tests/test_readme_results.py renders RECORD and compares it with README.md, so the README's
figures cannot drift from the recorded run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLE = "examples/sst2_minilm_to_mpnet.json"
RECORD = ROOT / "examples" / "results" / "sst2_minilm_to_mpnet.json"


# ---------------------------------------------------------------------------------------------
# record: what a run of scripts/run-example.sh measured, as a small JSON document (figures, no data)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _machine() -> dict[str, Any]:
    cpuinfo, meminfo = _read("/proc/cpuinfo").splitlines(), _read("/proc/meminfo").splitlines()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    memory_kib = next((int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:")), 0)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 2**20, 1) if memory_kib else None,
        "system": f"{platform.system()} {platform.release()}",
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds(), 1)


def _load_now() -> float | None:
    fields = _read("/proc/loadavg").split()
    return float(fields[0]) if fields else None


def make_record(
    job: dict[str, Any], watch: dict[str, Any], wall_s: dict[str, float], load_at_start: float | None
) -> dict[str, Any]:
    """The record of one run: ``job`` as GET /v1/jobs/{id} returned it at the end, ``watch`` what the
    script's progress lines saw (texts per feature extraction, load samples), the script's phase
    times and the load average when it started."""
    if job.get("status") != "succeeded" or not job.get("results"):
        raise SystemExit(f"readme_results: job {job.get('status')}: nothing to record ({job.get('error')})")
    features_seen = watch.get("features_seen", {})
    stages = [
        {
            "kind": stage["kind"],
            "seed": stage["seed"],
            "status": stage["status"],
            "stage_key": stage["stage_key"],
            "run_s": stage.get("duration_s")
            or _seconds_between(stage.get("started_at"), stage.get("finished_at")),
            "train_steps": stage.get("total_steps") if stage["status"] == "succeeded" else None,
            # The texts whose features the stage computed, per split, as the progress lines saw them
            # (a split done between two looks, 2 s apart, is missing).
            "features_computed": features_seen.get(f"{stage['kind']} {stage['seed']}", {}),
            "gpu": stage.get("gpu"),
        }
        for stage in job["stages"]
    ]
    loads = [load for load in watch.get("load_1min", []) if load is not None]
    commit = _git("rev-parse", "HEAD")
    return {
        "example": EXAMPLE,
        "command": "bash scripts/run-example.sh",
        "recorded_at": job.get("finished_at"),
        "machine": _machine()
        | {
            "gpus": sorted({stage["gpu"] for stage in stages if stage["gpu"]}),
            "load_1min": {
                "at_start": load_at_start,
                "during_job_mean": round(sum(loads) / len(loads), 2) if loads else None,
                "during_job_max": max(loads) if loads else None,
                "at_end": _load_now(),
            },
        },
        "versions": {
            "commit": commit,
            # Uncommitted changes to tracked files when it ran (a shared working tree, say).
            "commit_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None,
            "python": platform.python_version(),
            "torch": _version("torch"),
            "transformers": _version("transformers"),
        },
        "wall_s": wall_s,
        "job": {
            "status": job["status"],
            "wall_s": _seconds_between(job.get("created_at"), job.get("finished_at")),
            "stages": stages,
        },
        "spec": job["spec"],
        "results": job["results"],
    }


def _wall_times(pairs: list[str]) -> dict[str, float]:
    times = {}
    for pair in pairs:
        name, _, seconds = pair.partition("=")
        if not name or not seconds:
            raise SystemExit(f"readme_results: --wall-s takes NAME=SECONDS pairs, not {pair!r}")
        times[name] = float(seconds)
    return times


def cmd_record(args: argparse.Namespace) -> int:
    job = json.loads(Path(args.job).read_text())
    watch = json.loads(Path(args.watch).read_text()) if args.watch and Path(args.watch).is_file() else {}
    load = float(args.load_at_start) if args.load_at_start else None
    record = make_record(job, watch, _wall_times(args.wall_s), load)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    record = commands.add_parser("record", help="write the record of a run of scripts/run-example.sh")
    record.add_argument("--job", required=True, help="GET /v1/jobs/{id}'s answer at the end (runs/job.json)")
    record.add_argument("--watch", help="what the script's progress lines saw (runs/job-watch.json)")
    record.add_argument("--out", required=True)
    record.add_argument("--load-at-start", default="", help="the 1-minute load average at the script's start")
    record.add_argument("--wall-s", nargs="*", default=[], metavar="PHASE=SECONDS")
    record.set_defaults(handler=cmd_record)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())

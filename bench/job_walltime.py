"""Wall time of the main job through the real service, from a cold and from a warm stage cache.

The MiniLM-L6 -> MPNet sst2 probe job (examples/sst2_minilm_to_mpnet.json: 3 losses x 3 seeds)
is submitted to a real stack (see bench/real_stack.py: a fresh Postgres database, a Redis key
prefix of its own, a fresh artifact store, a real Celery worker process with one slot and the
dispatcher process, the API served by uvicorn). Its wall time is split by stage from the API's
timestamps: the queue wait before the first stage starts, each stage's run time (per kind and
seed), and the remainder (dispatch rounds, broker hand-over, worker child start-up). Then the
identical job is submitted again: every stage key is in the store, so each stage completes as
cached, and the same split is reported. The results of the cold run (weak, ceiling, each student
accuracy and PGR with its 95% interval) are reported too.

    python bench/job_walltime.py [--n-train 4000] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

from real_stack import ROOT, RealStack, default_data_dir

EXAMPLE = ROOT / "examples" / "sst2_minilm_to_mpnet.json"
QUICK_N_TRAIN, QUICK_N_TEST = 400, 300


def job_spec(n_train: int | None, n_test: int | None) -> dict[str, Any]:
    """The example job with absolute model paths (the API may run from any directory)."""
    spec = json.loads(EXAMPLE.read_text())
    for role in ("weak", "strong"):
        spec[role]["model"] = str((ROOT / spec[role]["model"]).resolve())
    if n_train is not None:
        spec["dataset"]["n_train"] = n_train
    if n_test is not None:
        spec["dataset"]["n_test"] = n_test
    return spec


def _time(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    moment = dt.datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    return None if start is None or end is None else (end - start).total_seconds()


def stage_split(job: dict[str, Any]) -> dict[str, Any]:
    """The job's wall time split by stage, from the API's timestamps."""
    created, finished = _time(job["created_at"]), _time(job["finished_at"])
    stages = []
    for stage in job["stages"]:
        queued, started, done = (_time(stage[k]) for k in ("queued_at", "started_at", "finished_at"))
        stages.append(
            {
                "kind": stage["kind"],
                "seed": stage["seed"],
                "status": stage["status"],
                # admitted by the dispatcher -> claimed by the worker's child process
                "handover_s": _seconds(queued, started),
                "run_s": _seconds(started, done),
                "done_after_s": _seconds(created, done),
            }
        )
    first_start = min((t for s in job["stages"] if (t := _time(s["started_at"]))), default=None)
    run_total = sum(stage["run_s"] or 0.0 for stage in stages)
    wall = _seconds(created, finished)
    by_kind: dict[str, dict[str, float]] = {}
    for stage in stages:
        entry = by_kind.setdefault(stage["kind"], {"stages": 0, "run_s": 0.0})
        entry["stages"] += 1
        entry["run_s"] += stage["run_s"] or 0.0
    return {
        "job_id": job["id"],
        "status": job["status"],
        "wall_s": wall,
        "queue_wait_s": _seconds(created, first_start),
        "run_total_s": run_total,
        # With one worker slot stages run one after another: what is left is the service's own time.
        "overhead_s": None if wall is None else wall - run_total,
        "stages_cached": sum(stage["status"] == "cached" for stage in stages),
        "by_kind": by_kind,
        "stages": stages,
    }


def results_summary(results: dict[str, Any]) -> dict[str, Any]:
    def figure(section: dict[str, Any]) -> dict[str, Any]:
        return {
            "accuracy": section["accuracy"],
            "accuracy_std": section.get("accuracy_std"),
            "accuracy_ci": section.get("accuracy_ci"),
            "auroc": section.get("auroc"),
        }

    students = {
        loss: {**figure(section), "pgr": section.get("pgr"), "pgr_ci": section.get("pgr_ci")}
        for loss, section in results["students"].items()
    }
    return {
        "weak": figure(results["weak"]),
        "ceiling": figure(results["ceiling"]),
        "students": students,
        "flags": results.get("flags", []),
        "seeds": results.get("seeds"),
    }


def run_job(stack: RealStack, spec: dict[str, Any], label: str, timeout_s: float) -> dict[str, Any]:
    submitted = time.perf_counter()
    response = stack.api.post("/v1/jobs", json={"name": f"bench {label}", **spec})
    if response.status_code != 201:
        raise SystemExit(f"{label}: POST /v1/jobs answered {response.status_code}: {response.text}")
    job_id = response.json()["id"]
    last_line = [""]

    def show(job: dict[str, Any]) -> None:
        done = sum(s["status"] in ("succeeded", "cached") for s in job["stages"])
        line = f"  {label}: {job['status']}, {done}/{len(job['stages'])} stages done"
        if line != last_line[0]:
            print(line, flush=True)
            last_line[0] = line

    job = stack.wait_job(job_id, timeout_s, on_poll=show)
    client_wall = time.perf_counter() - submitted
    if job["status"] != "succeeded":
        raise SystemExit(f"{label}: job {job['status']}: {job.get('error')}\n{stack.logs()}")
    return {**stage_split(job), "client_wall_s": client_wall, "results": job["results"]}


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_split(label: str, split: dict[str, Any]) -> None:
    print(f"\n{label}: wall {_fmt(split['wall_s'])} s (client saw {_fmt(split['client_wall_s'])} s)")
    print(
        f"  queue wait {_fmt(split['queue_wait_s'])} s, stage run time {_fmt(split['run_total_s'])} s, "
        f"service overhead {_fmt(split['overhead_s'])} s, {split['stages_cached']} stages cached"
    )
    width = max(len(kind) for kind in split["by_kind"])
    for kind, entry in split["by_kind"].items():
        print(f"  {kind:<{width}} {entry['stages']} stages  run {entry['run_s']:7.1f} s")
    print(f"  {'stage':<{width}} {'seed':>4} {'status':<10} {'handover s':>10} {'run s':>8} {'done at s':>9}")
    for stage in split["stages"]:
        print(
            f"  {stage['kind']:<{width}} {stage['seed']:>4} {stage['status']:<10} "
            f"{_fmt(stage['handover_s'], 2):>10} {_fmt(stage['run_s']):>8} {_fmt(stage['done_after_s']):>9}"
        )


def print_results(results: dict[str, Any]) -> None:
    def ci(pair: list[float] | None) -> str:
        return "" if not pair else f"[{pair[0]:.3f}, {pair[1]:.3f}]"

    print("\nresults of the cold run:")
    for name in ("weak", "ceiling"):
        section = results[name]
        print(f"  {name:<16} accuracy {section['accuracy']:.3f} {ci(section['accuracy_ci'])}")
    for loss, section in results["students"].items():
        pgr = "-" if section["pgr"] is None else f"{section['pgr']:.2f}"
        print(f"  student {loss:<8} accuracy {section['accuracy']:.3f}  PGR {pgr} {ci(section['pgr_ci'])}")
    print(f"  flags: {results['flags'] or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--n-train", type=int, default=None, help="train examples (default: the example's 4000)"
    )
    parser.add_argument("--n-test", type=int, default=None, help="test examples (default: all 1821)")
    parser.add_argument(
        "--quick", action="store_true", help=f"n_train {QUICK_N_TRAIN}, n_test {QUICK_N_TEST}"
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="default: W2S_DATA_DIR or ../shared/data")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for each job")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args()
    n_train = args.n_train or (QUICK_N_TRAIN if args.quick else None)
    n_test = args.n_test or (QUICK_N_TEST if args.quick else None)
    spec = job_spec(n_train, n_test)
    data_dir = (args.data_dir or default_data_dir()).resolve()
    if not (data_dir / "sst2").is_dir():
        raise SystemExit(f"no sst2 under {data_dir}: set W2S_DATA_DIR or --data-dir")
    for role in ("weak", "strong"):
        if not Path(spec[role]["model"]).is_dir():
            raise SystemExit(f"missing {spec[role]['model']}: run `w2s models prepare-offline models`")

    started = time.perf_counter()
    with RealStack(data_dir=data_dir) as stack:
        print(f"stack up in {time.perf_counter() - started:.1f} s (database {stack.db_name})", flush=True)
        cold = run_job(stack, spec, "cold", args.timeout)
        warm = run_job(stack, spec, "warm", args.timeout)
    results = results_summary(cold.pop("results"))
    warm.pop("results")
    print(f"job: {EXAMPLE.relative_to(ROOT)}, dataset {spec['dataset']}, one worker slot")
    print_split("cold cache", cold)
    print_split("warm cache (identical job again)", warm)
    print_results(results)
    if args.json:
        shown = json.loads(json.dumps(spec))
        for role in ("weak", "strong"):  # as in the example file, not this machine's absolute path
            shown[role]["model"] = "./" + Path(spec[role]["model"]).relative_to(ROOT).as_posix()
        figures = {
            "spec_file": EXAMPLE.relative_to(ROOT).as_posix(),
            "spec": shown,
            "quick": args.quick,
            "worker_slots": 1,
            "cold": cold,
            "warm": warm,
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()

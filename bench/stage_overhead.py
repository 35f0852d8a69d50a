"""Fixed cost per stage: probe stages on cached features, through the real service.

Against a real stack (bench/real_stack.py: a fresh Postgres database, Redis under a key prefix of
its own, one Celery worker process with one slot, the control worker, the dispatcher, the API under
uvicorn), with two tiny random-initialised models built from a config (as the tests build them) and
a small sst2-like dataset written for the run:

0. **warm-up** (not timed): a 2 x 2 probe sweep over every row with seed 0, so both models' features
   of every text are in the artifact store. Every later stage finds its features cached.
1. **per stage**: one probe job of ``--stages`` stages (seeds x weak, ceiling and 8 students). One
   slot runs them one after another, so a stage's *cycle* is its finish minus the previous stage's
   finish, and its **overhead** is the cycle minus its head training (``train_seconds`` of its
   result): dispatch (previous finish -> admitted), hand-over (admitted -> claimed by the worker)
   and the worker's own time (claimed -> finished, less training).
2. **sweep**: a 5 weak x 2 strong probe sweep of ``--sweep-stages`` stages (8 losses, stages / 100
   seeds: the service takes at most 20 seeds, so the weak side lists the two models with weight decay
   0, 0.01 and, for BERT, 0.1: five entries, as a sweep that varies an option does) on the cached
   features: wall time from the POST to the last job finished (planning, every stage, finishing).
   With ``--sweep-stages`` under 1,000 the 1,000-stage time is also given as a linear
   extrapolation, and labelled so.

The load average is recorded beside each phase: this runs on shared machines.

    python bench/stage_overhead.py [--stages 60] [--sweep-stages 1000] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from real_stack import RealStack  # noqa: E402

# 8 losses: with weak, ceiling and one student each, a seed of one job is 10 stages, of a 5 x 2 sweep 100.
LOSSES: list[Any] = [
    "xent",
    "logconf",
    "product",
    "window",
    "entropy",
    "kl",
    {"name": "logconf", "aux_coef": 0.25},
    {"name": "window", "radius": 0.3},
]
STAGES_PER_SEED = 2 + len(LOSSES)
PAIRS = 10  # the sweep's 5 weak x 2 strong entries
WEAK_DECAYS = [("bert", 0.0), ("gpt2", 0.0), ("bert", 0.01), ("gpt2", 0.01), ("bert", 0.1)]
TARGET_OVERHEAD_S = 0.3
TARGET_SWEEP_S = 300.0
TARGET_SWEEP_STAGES = 1000


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "mean": round(statistics.fmean(values), 4),
        "p50": round(percentile(values, 50), 4),
        "p90": round(percentile(values, 90), 4),
        "max": round(max(values), 4),
    }


# -- the models, the data and the specs ------------------------------------------------------------


def build_inputs(folder: Path, rows: int, test_rows: int) -> tuple[dict[str, Path], Path]:
    from helpers import build_tiny_bert, build_tiny_gpt2, write_sst2_like

    models = {"bert": build_tiny_bert(folder / "models" / "tiny-bert")}
    models["gpt2"] = build_tiny_gpt2(folder / "models" / "tiny-gpt2")
    return models, write_sst2_like(folder / "data", n_train=rows, n_test=test_rows)


def model_spec(path: Path, epochs: int) -> dict[str, Any]:
    return {
        "model": str(path),
        "mode": "probe",
        "epochs": epochs,
        "lr": 1e-3,
        "batch_size": 32,
        "max_length": 32,
    }


def dataset(n_train: int | None, n_test: int) -> dict[str, Any]:
    return {"name": "sst2", "n_test": n_test, **({"n_train": n_train} if n_train else {})}


# -- reading the run back ----------------------------------------------------------------------------


def _utc(moment: dt.datetime | None) -> dt.datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def stage_rows(job_ids: list[str]) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from service.db import session_scope
    from service.models import Stage

    with session_scope() as session:
        rows = session.execute(
            select(
                Stage.job_id,
                Stage.kind,
                Stage.seed,
                Stage.status,
                Stage.attempts,
                Stage.queued_at,
                Stage.started_at,
                Stage.finished_at,
                Stage.result,
            ).where(Stage.job_id.in_(job_ids))
        ).all()
    return [
        {
            "job_id": r.job_id,
            "kind": r.kind,
            "seed": r.seed,
            "status": r.status,
            "attempts": r.attempts,
            "queued_at": _utc(r.queued_at),
            "started_at": _utc(r.started_at),
            "finished_at": _utc(r.finished_at),
            "result": r.result or {},
        }
        for r in rows
    ]


def job_times(job_ids: list[str]) -> list[tuple[dt.datetime | None, dt.datetime | None, str]]:
    from sqlalchemy import select

    from service.db import session_scope
    from service.models import Job

    with session_scope() as session:
        rows = session.execute(
            select(Job.created_at, Job.finished_at, Job.status).where(Job.id.in_(job_ids))
        ).all()
    return [(_utc(created), _utc(finished), status) for created, finished, status in rows]


def cycle_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage the worker ran (not those completed from a duplicate's result), in the order they
    ran: cycle, head training and the overhead between, split into its parts."""
    ran = sorted((r for r in rows if r["status"] == "succeeded"), key=lambda r: r["started_at"])
    parts: dict[str, list[float]] = {
        "cycle_s": [],
        "train_s": [],
        "overhead_s": [],
        "dispatch_s": [],
        "handover_s": [],
        "in_worker_s": [],
        "in_library_s": [],
    }
    for previous, stage in itertools.pairwise(ran):
        train = float(stage["result"].get("train_seconds", 0.0))
        cycle = (stage["finished_at"] - previous["finished_at"]).total_seconds()
        parts["cycle_s"].append(cycle)
        parts["train_s"].append(train)
        parts["overhead_s"].append(cycle - train)
        parts["dispatch_s"].append((stage["queued_at"] - previous["finished_at"]).total_seconds())
        parts["handover_s"].append((stage["started_at"] - stage["queued_at"]).total_seconds())
        parts["in_worker_s"].append((stage["finished_at"] - stage["started_at"]).total_seconds() - train)
        # run_stage's own time around training: plan lookups, features, evaluation, the store
        parts["in_library_s"].append(float(stage["result"].get("seconds", 0.0)) - train)
    return {
        "stages_ran": len(ran),
        "stages_measured": len(parts["cycle_s"]),
        "attempts_above_1": sum(r["attempts"] > 1 for r in rows),
        **{name: summary(values) for name, values in parts.items()},
    }


# -- the phases ------------------------------------------------------------------------------------


def wait_jobs(stack: RealStack, job_ids: list[str], label: str, timeout_s: float) -> None:
    """Until every job is over, printing progress; a job that did not succeed ends the benchmark."""
    deadline = time.monotonic() + timeout_s
    shown = ""
    while time.monotonic() < deadline:
        rows = stage_rows(job_ids)
        done = sum(r["status"] in ("succeeded", "cached") for r in rows)
        jobs = job_times(job_ids)
        over = sum(status not in ("queued", "running") for *_, status in jobs)
        line = f"  {label}: {done}/{len(rows)} stages done, {over}/{len(jobs)} jobs over"
        if line != shown:
            print(line, flush=True)
            shown = line
        if all(status in ("succeeded", "failed", "cancelled") for *_, status in jobs):
            bad = [status for *_, status in jobs if status != "succeeded"]
            if bad:
                raise SystemExit(f"{label}: jobs ended {bad}\n{stack.logs()}")
            return
        time.sleep(1.0)
    raise SystemExit(f"{label}: not finished after {timeout_s:.0f} s\n{stack.logs()}")


def post_sweep(stack: RealStack, body: dict[str, Any]) -> tuple[str, list[str]]:
    response = stack.api.post("/v1/sweeps", json=body)
    if response.status_code != 201:
        raise SystemExit(f"POST /v1/sweeps answered {response.status_code}: {response.text}")
    sweep = response.json()
    return sweep["id"], list(sweep["jobs"])


def warm_up(stack: RealStack, models: dict[str, Path], epochs: int, n_test: int, timeout_s: float) -> float:
    started = time.perf_counter()
    grid = [model_spec(path, epochs) for path in models.values()]
    _, job_ids = post_sweep(
        stack,
        {
            "name": "warm-up",
            "dataset": dataset(None, n_test),
            "weak_models": grid,
            "strong_models": grid,
            "losses": ["xent"],
            "seeds": [0],
        },
    )
    wait_jobs(stack, job_ids, "warm-up", timeout_s)
    return time.perf_counter() - started


def per_stage(stack: RealStack, models: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    seeds = list(range(1, args.stages // STAGES_PER_SEED + 1))
    load_before = load()
    body = {
        "name": "per-stage",
        "dataset": dataset(args.n_train, args.n_test),
        "weak": model_spec(models["bert"], args.epochs),
        "strong": model_spec(models["gpt2"], args.epochs),
        "losses": LOSSES,
        "seeds": seeds,
    }
    started = time.perf_counter()
    response = stack.api.post("/v1/jobs", json=body)
    if response.status_code != 201:
        raise SystemExit(f"POST /v1/jobs answered {response.status_code}: {response.text}")
    job_id = response.json()["id"]
    wait_jobs(stack, [job_id], "per stage", args.timeout)
    wall = time.perf_counter() - started
    return {
        "stages": len(seeds) * STAGES_PER_SEED,
        "seeds": len(seeds),
        "client_wall_s": round(wall, 2),
        "load_avg_before": load_before,
        "load_avg_after": load(),
        **cycle_figures(stage_rows([job_id])),
    }


def sweep(stack: RealStack, models: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    n_seeds = args.sweep_stages // (PAIRS * STAGES_PER_SEED)
    seeds = list(range(101, 101 + n_seeds))  # none shared with the per-stage job
    grid = [model_spec(path, args.epochs) for path in models.values()]
    weak_grid = [
        {**model_spec(models[name], args.epochs), "weight_decay": decay} for name, decay in WEAK_DECAYS
    ]
    load_before = load()
    started = time.perf_counter()
    sweep_id, job_ids = post_sweep(
        stack,
        {
            "name": "sweep",
            "dataset": dataset(args.n_train, args.n_test),
            "weak_models": weak_grid,
            "strong_models": grid,
            "losses": LOSSES,
            "seeds": seeds,
        },
    )
    wait_jobs(stack, job_ids, "sweep", args.timeout)
    client_wall = time.perf_counter() - started
    rows = stage_rows(job_ids)
    jobs = job_times(job_ids)
    created = min(c for c, _, _ in jobs if c is not None)
    finished = max(f for _, f, _ in jobs if f is not None)
    starts = [r["started_at"] for r in rows if r["started_at"] is not None]
    last_stage = max(r["finished_at"] for r in rows if r["finished_at"] is not None)
    wall = (finished - created).total_seconds()
    train_total = sum(
        float(r["result"].get("train_seconds", 0.0)) for r in rows if r["status"] == "succeeded"
    )
    figures: dict[str, Any] = {
        "sweep_id": sweep_id,
        "jobs": len(job_ids),
        "stages": len(rows),
        "stages_ran": sum(r["status"] == "succeeded" for r in rows),
        "stages_cached": sum(r["status"] == "cached" for r in rows),
        "seeds": n_seeds,
        "wall_s": round(wall, 2),
        "client_wall_s": round(client_wall, 2),
        "to_first_stage_s": round((min(starts) - created).total_seconds(), 2),
        "last_stage_to_last_job_s": round((finished - last_stage).total_seconds(), 2),
        "train_total_s": round(train_total, 2),
        "service_s": round(wall - train_total, 2),
        "load_avg_before": load_before,
        "load_avg_after": load(),
        "cycles": cycle_figures(rows),
    }
    if len(rows) != TARGET_SWEEP_STAGES:
        figures["extrapolated_1000_stages_s"] = round(wall * TARGET_SWEEP_STAGES / len(rows), 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--stages", type=int, default=60, help="stages of the per-stage job (a multiple of 10)"
    )
    parser.add_argument(
        "--sweep-stages",
        type=int,
        default=TARGET_SWEEP_STAGES,
        help="stages of the sweep (a multiple of 40; 0: none)",
    )
    parser.add_argument("--quick", action="store_true", help="20 per-stage stages and a 200-stage sweep")
    parser.add_argument("--rows", type=int, default=400, help="train rows of the dataset written for the run")
    parser.add_argument("--test-rows", type=int, default=100, help="test rows of that dataset")
    parser.add_argument("--n-train", type=int, default=200, help="train rows each seed draws (both halves)")
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each probe head")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds to wait for each phase")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy the service's logs here")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args()
    if args.quick:
        args.stages, args.sweep_stages = 20, 200
    if args.stages % STAGES_PER_SEED or args.sweep_stages % (PAIRS * STAGES_PER_SEED):
        parser.error(
            f"--stages must be a multiple of {STAGES_PER_SEED}, --sweep-stages of {PAIRS * STAGES_PER_SEED}"
        )
    os.environ.setdefault("W2S_ENVIRONMENT", "")

    folder = Path(tempfile.mkdtemp(prefix="w2s_stage_overhead_"))
    figures: dict[str, Any] = {
        "config": {
            "models": "tiny random-initialised BERT and GPT-2 (tests/helpers.py), probe mode",
            "rows": args.rows,
            "test_rows": args.test_rows,
            "n_train": args.n_train,
            "n_test": args.n_test,
            "epochs": args.epochs,
            "losses": len(LOSSES),
            "worker_slots": 1,
        },
        "quick": args.quick,
        "load_avg_start": load(),
    }
    try:
        models, data_dir = build_inputs(folder, args.rows, args.test_rows)
        extra = {"W2S_MODEL_ROOTS": json.dumps([str(folder / "models")])}
        started = time.perf_counter()
        with RealStack(data_dir=data_dir, extra_env=extra, keep_logs=args.keep_logs) as stack:
            print(f"stack up in {time.perf_counter() - started:.1f} s (database {stack.db_name})", flush=True)
            figures["warm_up_s"] = round(warm_up(stack, models, args.epochs, args.n_test, args.timeout), 1)
            if args.stages:
                figures["per_stage"] = per_stage(stack, models, args)
                print("per stage:", json.dumps(figures["per_stage"]), flush=True)
            if args.sweep_stages:
                figures["sweep"] = sweep(stack, models, args)
                print("sweep:", json.dumps(figures["sweep"]), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    figures["targets"] = {
        "overhead_per_stage_s": TARGET_OVERHEAD_S,
        "sweep_1000_stages_s": TARGET_SWEEP_S,
    }
    report(figures)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


def report(figures: dict[str, Any]) -> None:
    print(f"\nload average at the start {figures['load_avg_start']}; warm-up {figures.get('warm_up_s')} s")
    stage = figures.get("per_stage")
    if stage:
        print(
            f"per stage ({stage['stages_measured']} probe stages on cached features, one slot; "
            f"load {stage['load_avg_before']} -> {stage['load_avg_after']}):"
        )
        for name in (
            "cycle_s",
            "train_s",
            "overhead_s",
            "dispatch_s",
            "handover_s",
            "in_worker_s",
            "in_library_s",
        ):
            print(f"  {name:<13} " + "  ".join(f"{k} {v:.3f}" for k, v in stage[name].items()))
    swept = figures.get("sweep")
    if swept:
        print(
            f"sweep: {swept['stages']} stages ({swept['stages_ran']} run, {swept['stages_cached']} from a "
            f"duplicate's result) in {swept['jobs']} jobs: wall {swept['wall_s']} s (client saw "
            f"{swept['client_wall_s']} s), head training {swept['train_total_s']} s, first stage after "
            f"{swept['to_first_stage_s']} s, last job finished {swept['last_stage_to_last_job_s']} s after "
            f"the last stage; load {swept['load_avg_before']} -> {swept['load_avg_after']}"
        )
        if "extrapolated_1000_stages_s" in swept:
            print(f"  1,000 stages, extrapolated linearly: {swept['extrapolated_1000_stages_s']} s")
        print(
            "  overhead per stage: "
            + "  ".join(f"{k} {v:.3f}" for k, v in swept["cycles"]["overhead_s"].items())
        )


if __name__ == "__main__":
    main()

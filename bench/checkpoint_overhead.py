"""What resume checkpoints cost a full fine-tuning stage: the strong ceiling of the sst2 example
(examples/sst2_minilm_to_mpnet.json) in ``mode: full``, trained once without checkpoints and once
with one every ``--every`` steps, on this machine, into a local artifact store.

Prints the step time, each checkpoint's size and write time, the overhead measured with checkpoints
that often, and the overhead at the default policy (one every W2S_CHECKPOINT_EVERY_S = 600 s): the
write time over 600 s. Also checks that the run with checkpoints ends with the same weights.

    W2S_DATA_DIR=../shared/data python bench/checkpoint_overhead.py [--model models/all-MiniLM-L6-v2]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from real_stack import ROOT, default_data_dir

from w2s.resume import CheckpointPolicy, CheckpointSaved
from w2s.spec import parse_spec
from w2s.splits import prepare_seed_data
from w2s.stages import plan_seed, run_stage
from w2s.store import ArtifactStore
from w2s.train import Progress

DEFAULT_EVERY_S = 600.0


def ceiling_plan(model: Path, data_dir: Path, n_train: int, max_length: int, batch_size: int) -> Any:
    spec_dict = json.loads((ROOT / "examples" / "sst2_minilm_to_mpnet.json").read_text())
    spec_dict["dataset"] |= {"n_train": n_train, "n_test": 200}
    full = {
        "model": str(model),
        "mode": "full",
        "max_length": max_length,
        "epochs": 1,
        "batch_size": batch_size,
    }
    spec_dict["weak"] |= full
    spec_dict["strong"] |= full | {"save_checkpoint": True}
    spec_dict["losses"], spec_dict["seeds"] = ["xent"], [0]
    spec = parse_spec(spec_dict)
    _, ceiling, _ = plan_seed(spec, prepare_seed_data(spec, 0, data_dir), device_kind="cpu")
    return ceiling


def timed_run(plan: Any, policy: CheckpointPolicy) -> dict[str, Any]:
    saved: list[CheckpointSaved] = []
    step_times: list[float] = []
    last = [time.perf_counter()]

    def watch(progress: Any) -> None:
        if isinstance(progress, CheckpointSaved):
            saved.append(progress)
        elif isinstance(progress, Progress):
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now

    with tempfile.TemporaryDirectory(prefix="w2s-ckpt-bench-") as folder:
        store = ArtifactStore(folder)
        started = time.perf_counter()
        result = run_stage(plan, store, callback=watch, checkpoint_policy=policy)
        wall = time.perf_counter() - started
        weights = torch.load(io.BytesIO(store.get_checkpoint(result.checkpoint)), weights_only=True)
    return {
        "train_s": result.train_seconds,
        "wall_s": wall,
        "steps": result.steps,
        "step_s_median": statistics.median(step_times[1:] or step_times),
        "checkpoints": len(saved),
        "checkpoint_s": [round(c.seconds, 3) for c in saved],
        "checkpoint_mb": round(saved[0].size_bytes / 1e6, 1) if saved else None,
        "accuracy": result.accuracy,
        "weights": weights,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "all-mpnet-base-v2")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: W2S_DATA_DIR or ../shared/data")
    parser.add_argument("--n-train", type=int, default=800, help="rows of sst2 (the ceiling trains on half)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--every", type=int, default=4, help="checkpoint every N steps in the second run")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    data_dir = (args.data_dir or default_data_dir()).resolve()
    plan = ceiling_plan(args.model.resolve(), data_dir, args.n_train, args.max_length, args.batch_size)

    plain = timed_run(plan, CheckpointPolicy(every_steps=0, every_s=0))
    often = timed_run(plan, CheckpointPolicy(every_steps=args.every, every_s=0))
    write_s = statistics.median(often["checkpoint_s"]) if often["checkpoint_s"] else 0.0
    measured = (often["train_s"] - plain["train_s"]) / plain["train_s"]
    figures = {
        "model": args.model.name,
        "steps": plain["steps"],
        "step_s": round(plain["step_s_median"], 3),
        "train_s_without": round(plain["train_s"], 1),
        "train_s_with": round(often["train_s"], 1),
        "checkpoint_every_steps": args.every,
        "checkpoints": often["checkpoints"],
        "checkpoint_mb": often["checkpoint_mb"],
        "checkpoint_write_s_median": round(write_s, 3),
        "overhead_measured_pct": round(100 * measured, 1),
        "overhead_by_write_time_pct": round(100 * often["checkpoints"] * write_s / plain["train_s"], 1),
        "overhead_at_default_600s_pct": round(100 * write_s / DEFAULT_EVERY_S, 3),
        "steps_between_checkpoints_for_5pct": int(write_s / (0.05 * plain["step_s_median"])) + 1,
        "same_weights": plain["weights"].keys() == often["weights"].keys()
        and all(torch.equal(plain["weights"][k], often["weights"][k]) for k in plain["weights"]),
        "same_accuracy": plain["accuracy"] == often["accuracy"],
    }
    for name, value in figures.items():
        print(f"{name:40} {value}")
    print(json.dumps({"checkpoint_overhead": figures}))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

"""How much probe-mode W2S figures depend on the head's regularisation.

Runs a probe-mode spec (by default examples/sst2_minilm_to_mpnet.json: all-MiniLM-L6-v2 -> all-mpnet-
base-v2 on sst2, 3 seeds) once per setting: weight decay 0 / 0.01 / 0.1 / 1 for every model, and the
same with early stopping on a held-out tenth of each stage's training rows (patience 3 epochs). The
backbone features are computed once and cached in the store, so every setting after the first costs
only head training. Prints weak, ceiling and per-loss student accuracy and PGR with its 95% interval.

    python bench/probe_regularisation.py [--data-dir ../shared/data] [--store DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from w2s.pipeline import run_experiment
from w2s.spec import load_spec, parse_spec
from w2s.store import ArtifactStore

ROOT = Path(__file__).resolve().parent.parent
DECAYS = (0.0, 0.01, 0.1, 1.0)
EARLY_STOPPING = {"holdout_frac": 0.1, "early_stopping_patience": 3}


def settings() -> list[tuple[str, dict[str, Any]]]:
    rows = [(f"weight_decay {decay:g}", {"weight_decay": decay}) for decay in DECAYS]
    rows += [
        (f"weight_decay {decay:g} + early stopping", {"weight_decay": decay, **EARLY_STOPPING})
        for decay in DECAYS
    ]
    return rows


def run(spec_path: Path, data_dir: Path, store: ArtifactStore) -> list[dict[str, Any]]:
    base = load_spec(spec_path).model_dump(mode="json", exclude_none=True)
    rows = []
    for label, options in settings():
        raw = json.loads(json.dumps(base))
        for role in ("weak", "strong"):
            raw[role].update(options)
        started = time.perf_counter()
        results = run_experiment(parse_spec(raw), store=store, data_dir=data_dir).results
        rows.append(
            {
                "setting": label,
                "options": options,
                "seconds": round(time.perf_counter() - started, 1),
                "weak": results["weak"]["accuracy"],
                "ceiling": results["ceiling"]["accuracy"],
                "gap_ci": results["gap"]["ceiling_minus_weak_ci"],
                "students": {
                    loss: {"accuracy": f["accuracy"], "pgr": f["pgr"], "pgr_ci": f["pgr_ci"]}
                    for loss, f in results["students"].items()
                },
                "flags": results["flags"],
            }
        )
        print(line(rows[-1]), flush=True)
    return rows


def _pgr(figures: dict[str, Any]) -> str:
    if figures["pgr"] is None:
        return "undefined"
    interval = figures["pgr_ci"]
    return f"{figures['pgr']:+.2f}" + (f" [{interval[0]:+.2f}, {interval[1]:+.2f}]" if interval else " [—]")


def line(row: dict[str, Any]) -> str:
    students = "; ".join(f"{loss} {f['accuracy']:.3f} PGR {_pgr(f)}" for loss, f in row["students"].items())
    return (
        f"{row['setting']:<36} weak {row['weak']:.3f} ceiling {row['ceiling']:.3f} | {students} "
        f"({row['seconds']:.0f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "examples" / "sst2_minilm_to_mpnet.json")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("W2S_DATA_DIR") or ROOT.parent / "shared" / "data"),
        help="<dataset>/<split>.jsonl files (default: $W2S_DATA_DIR, else ../shared/data)",
    )
    parser.add_argument("--store", default="/tmp/w2s_bench_regularisation")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = run(args.spec, args.data_dir, ArtifactStore(args.store))
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"spec": str(args.spec), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Per-stage pace on the embedded default (SQLite and the filesystem broker, what the README's main
command runs): one probe job of tiny models with ``--losses`` losses x ``--seeds`` seeds through
``w2s-service dev``, and the time between consecutive stage finishes (one slot runs them one after
another), beside the heads' own training time.

    python bench/embedded_pace.py [--losses 5] [--seeds 40] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import httpx  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--losses", type=int, default=5, choices=range(1, 6))
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from helpers import build_tiny_bert, write_sst2_like

    work = Path(tempfile.mkdtemp(prefix="w2s_pace_"))
    model = build_tiny_bert(work / "models" / "tiny-bert")
    data = write_sst2_like(work / "data")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "W2S_STATE_DIR": str(work / "state"),
        "W2S_DATA_DIR": str(data),
        "W2S_MODEL_ROOTS": json.dumps([str(work / "models")]),
        "W2S_ENVIRONMENT": "development",
    }
    env.pop("W2S_DATABASE_URL", None)
    env.pop("W2S_BROKER_URL", None)
    log = open(work / "dev.log", "w")  # noqa: SIM115
    dev = subprocess.Popen(
        [sys.executable, "-m", "w2s_service.cli", "dev", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        key = None
        while time.monotonic() < deadline and key is None:
            text = (work / "dev.log").read_text()
            key = next(
                (line.rsplit(" ", 1)[1] for line in text.splitlines() if "(shown once):" in line), None
            )
            time.sleep(0.5)
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{api}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        headers = {"Authorization": f"Bearer {key}"}
        options = {"mode": "probe", "epochs": 2, "batch_size": 16, "max_length": 32}
        losses = [
            "xent",
            "product",
            {"name": "logconf", "aux_coef": 0.5},
            {"name": "logconf", "aux_coef": 0.25},
            {"name": "logconf", "aux_coef": 0.75},
        ][: args.losses]
        body = {
            "dataset": {"name": "sst2", "n_train": 100, "n_test": 40},
            "weak": {"model": str(model), **options},
            "strong": {"model": str(model), **options, "weight_decay": 0.01},
            "losses": losses,
            "seeds": list(range(args.seeds)),
        }
        started = time.monotonic()
        job = httpx.post(f"{api}/v1/jobs", json=body, headers=headers, timeout=60).json()
        while time.monotonic() - started < 3600:
            job = httpx.get(f"{api}/v1/jobs/{job['id']}", headers=headers, timeout=30).json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1)
        wall = time.monotonic() - started
        stages = [s for s in job["stages"] if s["finished_at"]]
        finishes = sorted(dt.datetime.fromisoformat(s["finished_at"].replace("Z", "+00:00")) for s in stages)
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(finishes)]
        figures = {
            "status": job["status"],
            "stages": len(job["stages"]),
            "wall_s": round(wall, 1),
            "per_stage_median_s": round(statistics.median(gaps), 3) if gaps else None,
            "per_stage_mean_s": round(statistics.mean(gaps), 3) if gaps else None,
            "load_average": os.getloadavg(),
        }
        print(json.dumps(figures, indent=2))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        return 0 if job["status"] == "succeeded" else 1
    finally:
        os.killpg(dev.pid, signal.SIGTERM)
        try:
            dev.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)


if __name__ == "__main__":
    raise SystemExit(main())

"""A real model ladder as one sweep through the service: accuracies, PGR per pair, the Burns plot.

Against a real stack (bench/real_stack.py: a fresh Postgres database, Redis under a key prefix of
its own, one Celery worker with one slot, the control worker, the dispatcher, the API under
uvicorn), it POSTs the sweep body of ``--spec`` (default ``examples/sst2_decoder_ladder_sweep.json``:
all-MiniLM-L6-v2 and the three decoders as weak models; the decoders and all-mpnet-base-v2 as
strong; probe mode on sst2), waits for every job, prints the sweep's table, then signs in to the
dashboard with the team's key and saves the sweep page's figure (``/sweeps/{id}/plot.svg``, the Burns
plot the dashboard shows) and a PNG of the same figure. ``--spec`` may also be a job spec (weak and
strong): it runs as the one-pair sweep of it (``examples/sst2_decoder_lora.json``: a LoRA job on a
real decoder pair).

The models must be under models/ (``w2s models prepare-offline models --decoders``). Long on 2 CPU
cores (feature extraction of ~2,900 texts per model); run it as a benchmark, never in the tests.

    python bench/ladder_sweep.py [--spec PATH] [--plot docs/screenshots/ladder_sweep] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from real_stack import RealStack, default_data_dir  # noqa: E402


def absolute_models(body: dict[str, Any]) -> dict[str, Any]:
    """Relative model paths (``./models/...``) as the checkout's, whatever this process's cwd."""

    def fix(entry: Any) -> Any:
        entry = {"model": entry} if isinstance(entry, str) else dict(entry)
        if entry["model"].startswith("."):
            entry["model"] = str((ROOT / entry["model"]).resolve())
        return entry

    return {
        **body,
        "weak_models": [fix(e) for e in body["weak_models"]],
        "strong_models": [fix(e) for e in body["strong_models"]],
    }


def wait_sweep(stack: RealStack, sweep_id: str, timeout_s: float) -> dict[str, Any]:
    deadline, shown = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        sweep = stack.api.get(f"/v1/sweeps/{sweep_id}").json()
        statuses = [row["status"] for row in sweep["table"]]
        line = (
            f"  {sum(s == 'succeeded' for s in statuses)}/{len(statuses)} jobs succeeded ({sweep['status']})"
        )
        if line != shown:
            print(time.strftime("%H:%M:%S"), line, flush=True)
            shown = line
        if sweep["status"] in ("succeeded", "failed", "cancelled"):
            return dict(sweep)
        time.sleep(5)
    raise SystemExit(f"the sweep did not finish in {timeout_s:.0f} s")


def dashboard_plot(stack: RealStack, sweep_id: str) -> str:
    """Sign in to the dashboard with the team's key and fetch the sweep page's figure."""
    import httpx

    with httpx.Client(base_url=stack.base_url, timeout=120, follow_redirects=True) as browser:
        form = browser.get("/login").text
        match = re.search(r'name="csrf" value="([^"]+)"', form)
        assert match, "no CSRF field on the login page"
        signed_in = browser.post("/login", data={"api_key": stack.key, "csrf": match.group(1), "next": "/"})
        signed_in.raise_for_status()
        answer = browser.get(f"/sweeps/{sweep_id}/plot.svg")
        answer.raise_for_status()
        return answer.text


def print_table(sweep: dict[str, Any]) -> None:
    losses = list(sweep["pgr_summary"])
    print(
        f"{'weak':<34} {'strong':<30} {'weak':>6} {'ceil':>6} "
        + " ".join(f"{loss[:22]:>24}" for loss in losses)
    )
    for row in sweep["table"]:

        def cell(loss: str, row: dict[str, Any] = row) -> str:
            figures = row["students"].get(loss) or {}
            acc, pgr = figures.get("accuracy"), figures.get("pgr")
            return f"{'—' if acc is None else f'{acc:.3f}'} PGR {'—' if pgr is None else f'{pgr:+.2f}'}"

        weak, ceiling = row["weak_accuracy"], row["ceiling_accuracy"]
        print(
            f"{row['weak_label']:<34} {row['strong_label']:<30} "
            f"{'—' if weak is None else f'{weak:.3f}':>6} {'—' if ceiling is None else f'{ceiling:.3f}':>6} "
            + " ".join(f"{cell(loss):>24}" for loss in losses)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "examples" / "sst2_decoder_ladder_sweep.json")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="default: $W2S_DATA_DIR or ../shared/data"
    )
    parser.add_argument("--plot", type=Path, default=None, help="save the figure as PATH.svg and PATH.png")
    parser.add_argument(
        "--store", type=Path, default=None, help="artifact store to keep (default: a temporary one)"
    )
    parser.add_argument("--timeout", type=float, default=4 * 3600)
    parser.add_argument("--json", type=Path, default=None, help="write the sweep document and timings here")
    args = parser.parse_args()
    body = json.loads(args.spec.read_text())
    if "weak" in body:  # a job spec: the one-pair sweep of it
        body = {
            "name": args.spec.stem,
            **{k: v for k, v in body.items() if k not in ("weak", "strong")},
            "weak_models": [body["weak"]],
            "strong_models": [body["strong"]],
        }
    body = absolute_models(body)
    started = time.perf_counter()
    extra = {"W2S_ARTIFACT_STORE": str(args.store.resolve())} if args.store else {}
    with RealStack(data_dir=(args.data_dir or default_data_dir()), extra_env=extra) as stack:
        answer = stack.api.post("/v1/sweeps", json=body)
        if answer.status_code != 201:
            raise SystemExit(f"POST /v1/sweeps answered {answer.status_code}: {answer.text}")
        sweep_id = answer.json()["id"]
        print(f"sweep {sweep_id}: {len(answer.json()['jobs'])} jobs", flush=True)
        sweep = wait_sweep(stack, sweep_id, args.timeout)
        wall = time.perf_counter() - started
        print_table(sweep)  # first: what follows may fail, the figures must not be lost
        print(f"wall time {wall:.0f} s ({wall / 60:.1f} min)", flush=True)
        jobs = [stack.api.get(f"/v1/jobs/{job_id}").json() for job_id in sweep["jobs"]]
        svg = dashboard_plot(stack, sweep_id)
    if args.plot:
        from w2s import plots

        args.plot.parent.mkdir(parents=True, exist_ok=True)
        args.plot.with_suffix(".svg").write_text(svg)
        data = plots.sweep_figure_data(sweep["grid"], sweep["table"], name=sweep["name"])
        args.plot.with_suffix(".png").write_bytes(plots.render_sweep_png(data))
        print(f"wrote {args.plot.with_suffix('.svg')} (the dashboard's) and {args.plot.with_suffix('.png')}")
    if args.json:
        stage_times = {
            job["id"]: {f"{s['kind']}/{s['seed']}": s.get("duration_s") for s in job.get("stages", [])}
            for job in jobs
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"wall_s": wall, "sweep": sweep, "stage_seconds": stage_times}, indent=2, default=str)
            + "\n"
        )


if __name__ == "__main__":
    main()

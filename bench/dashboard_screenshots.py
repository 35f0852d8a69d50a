"""The README's dashboard screenshots, from a real run on a real stack.

Runs a small real sweep through the API of a throw-away stack (bench/real_stack.py: Postgres,
Redis, a Celery worker and the dispatcher): sst2, weak all-MiniLM-L6-v2, strong all-MiniLM-L6-v2
and all-mpnet-base-v2, all in probe mode, losses xent and logconf, seeds 0 and 1. Once every job
has finished it signs in to the dashboard in Chromium (Playwright, /usr/bin/chromium) with the
team's key and saves docs/screenshots/job.png (the MiniLM-L6 -> MPNet job page) and
docs/screenshots/sweep.png (the sweep page). Probes train briefly, so their curves are short: a
second job fine-tunes all-MiniLM-L6-v2 end to end (weak and strong, three losses, two seeds, an
evaluation every 10 steps) for docs/screenshots/curves.png (its curves, every stage kind side by
side) and docs/screenshots/curves-one-kind.png (one kind, less smoothing). Every figure is real.

    python bench/dashboard_screenshots.py [--n-train 2000] [--n-test 1000] [--out docs/screenshots]

Needs `w2s models prepare-offline models` and the sst2 data (W2S_DATA_DIR or ../shared/data).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from real_stack import ROOT, RealStack, default_data_dir

CHROMIUM = Path("/usr/bin/chromium")
# As in tests/svc/test_dashboard_browser.py: headless, no sandbox (containers), no network chatter.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WEAK = "./models/all-MiniLM-L6-v2"
STRONG = ["./models/all-MiniLM-L6-v2", "./models/all-mpnet-base-v2"]


# The server-drawn figure (an <img>) has loaded.
IMAGE_LOADED = (
    "(selector) => { const i = document.querySelector(selector); "
    "return i && i.complete && i.naturalWidth > 0 }"
)


def sweep_body(n_train: int, n_test: int) -> dict[str, Any]:
    probe = {"mode": "probe", "max_length": 128}
    return {
        "name": "sst2 probes",
        "dataset": {"name": "sst2", "n_train": n_train, "n_test": n_test, "seed": 0},
        "weak_models": [{"model": WEAK, **probe}],
        "strong_models": [{"model": model, **probe} for model in STRONG],
        "losses": ["xent", "logconf"],  # default parameters: short labels in the tables and legends
        "seeds": [0, 1],
    }


def curves_body(n_test: int) -> dict[str, Any]:
    full = {"model": WEAK, "mode": "full", "max_length": 64, "epochs": 2, "batch_size": 16, "eval_every": 10}
    return {
        "name": "sst2 MiniLM fine-tuned (curves)",
        "dataset": {"name": "sst2", "n_train": 800, "n_test": min(n_test, 400), "seed": 0},
        "weak": full,
        "strong": full,
        "losses": ["xent", "logconf", "product"],
        "seeds": [0, 1],
    }


def run_job(stack: RealStack, body: dict[str, Any], timeout_s: float) -> str:
    response = stack.api.post("/v1/jobs", json=body)
    if response.status_code != 201:
        raise SystemExit(f"POST /v1/jobs answered {response.status_code}: {response.text}")
    job_id = response.json()["id"]
    print(f"job {job_id}: {len(response.json()['stages'])} stages", flush=True)
    started = time.monotonic()
    job = stack.wait_job(job_id, timeout_s)
    print(f"job {job['status']} after {time.monotonic() - started:.0f} s", flush=True)
    if job["status"] != "succeeded":
        raise SystemExit(f"job {job['status']}: {job.get('error')}\n{stack.logs()}")
    return job_id


def run_sweep(stack: RealStack, body: dict[str, Any], timeout_s: float) -> tuple[str, str]:
    """Submit the sweep, wait for it; returns (sweep id, id of the MiniLM -> MPNet job)."""
    response = stack.api.post("/v1/sweeps", json=body)
    if response.status_code != 201:
        raise SystemExit(f"POST /v1/sweeps answered {response.status_code}: {response.text}")
    sweep_id = response.json()["id"]
    print(f"sweep {sweep_id}: {len(response.json()['jobs'])} jobs", flush=True)
    started = time.monotonic()
    sweep = stack.wait_sweep(sweep_id, timeout_s)
    print(f"sweep {sweep['status']} after {time.monotonic() - started:.0f} s", flush=True)
    if sweep["status"] != "succeeded":
        raise SystemExit(f"sweep {sweep['status']}: {sweep['table']}\n{stack.logs()}")
    target = next(row for row in sweep["table"] if row["strong_model"].endswith("all-mpnet-base-v2"))
    for row in sweep["table"]:
        students = ", ".join(
            f"{loss} {figures.get('accuracy', float('nan')):.3f} (PGR {figures.get('pgr')})"
            for loss, figures in row["students"].items()
        )
        print(
            f"  {row['weak_model']} -> {row['strong_model']}: weak {row['weak_accuracy']:.3f}, "
            f"ceiling {row['ceiling_accuracy']:.3f}, students {students}"
        )
    return sweep_id, target["job_id"]


def take_screenshots(
    base_url: str, key: str, job_id: str, sweep_id: str, curves_job_id: str, out: Path
) -> list[Path]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1360, "height": 900}).new_page()
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.goto(f"{base_url}/login")
            page.fill("#api_key", key)
            page.click("button[type=submit]")
            page.wait_for_url(f"{base_url}/")

            page.goto(f"{base_url}/jobs/{job_id}")
            page.wait_for_selector("#job-results table.results-table", timeout=30_000)
            page.wait_for_function(IMAGE_LOADED, arg="#chart-loss", timeout=30_000)
            page.wait_for_timeout(500)  # let the charts finish their first layout
            job_png = out / "job.png"
            page.screenshot(path=str(job_png), full_page=True)

            page.goto(f"{base_url}/sweeps/{sweep_id}")
            page.wait_for_function(IMAGE_LOADED, arg="#sweep-plot", timeout=30_000)
            page.wait_for_timeout(500)
            sweep_png = out / "sweep.png"
            page.screenshot(path=str(sweep_png), full_page=True)

            # The curves section alone: every stage kind side by side, then one kind, less smoothed.
            shots = []
            for name, query in (
                ("curves.png", ""),
                ("curves-one-kind.png", "?kind=student:logconf&smoothing=0.5"),
            ):
                page.goto(f"{base_url}/jobs/{curves_job_id}{query}")
                for chart in ("#chart-loss", "#chart-accuracy"):
                    page.wait_for_function(IMAGE_LOADED, arg=chart, timeout=30_000)
                page.wait_for_timeout(500)
                shots.append(out / name)
                page.locator("section:has(#curve-controls)").screenshot(path=str(shots[-1]))
        finally:
            browser.close()
    if problems:
        raise SystemExit(f"the dashboard logged errors: {problems}")
    return [job_png, sweep_png, *shots]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=2000, help="train examples (halves of n/2)")
    parser.add_argument("--n-test", type=int, default=1000, help="test examples")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: W2S_DATA_DIR or ../shared/data")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the sweep")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        raise SystemExit(f"{CHROMIUM} is missing: apt-get install -y chromium")
    # Model paths stay relative, as a user would write them, so the pages show ./models/...;
    # the API here and the worker (started in ROOT) resolve them against the checkout.
    os.chdir(ROOT)
    for model in {WEAK, *STRONG}:
        if not Path(model).is_dir():
            raise SystemExit(f"missing {model}: run `w2s models prepare-offline models`")
    data_dir = (args.data_dir or default_data_dir()).resolve()
    out = args.out.resolve()
    with RealStack(data_dir=data_dir) as stack:
        sweep_id, job_id = run_sweep(stack, sweep_body(args.n_train, args.n_test), args.timeout)
        curves_job_id = run_job(stack, curves_body(args.n_test), args.timeout)
        for path in take_screenshots(stack.base_url, stack.key, job_id, sweep_id, curves_job_id, out):
            print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()

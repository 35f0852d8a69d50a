"""The dashboard in a real browser (Debian's Chromium through Playwright) against a live uvicorn
server and the real worker stack: sign in by pasting the key, watch a job submitted through the API
appear and progress without a reload, open it and see its curves (SVG images drawn by the server)
and results, then the sweep, sweeps, team and login pages, with no console errors. Screenshots of
every page go to test-artifacts/screenshots/ (gitignored) for a look after a run; they show this
test's seeded figures, so they never go to docs/ (bench/dashboard_screenshots.py takes those from a
real run)."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
import uvicorn

from service.db import session_scope
from service.models import Job, Team
from svc_support import ROOT, Stack, tiny_job

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium", allow_module_level=True)

from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright  # noqa: E402
from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Beside the checkout's other build outputs, never in docs/: the figures here are made up.
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def live_server(stack: Stack) -> Iterator[str]:
    """The API (dashboard included) on a free port, in this process, with the stack's settings."""
    from api.main import create_app

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the live server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Shots:
    def __init__(self, page: Page, folder: Path):
        self.page, self.folder = page, folder
        folder.mkdir(parents=True, exist_ok=True)

    def take(self, name: str) -> Path:
        path = self.folder / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def _model_dirs(tmp_path: Path, tiny_bert: Path, tiny_gpt2: Path) -> dict[str, Path]:
    """Tiny models under the names of the paper's GPT-2 family, so the sweep plot reads naturally."""
    folder = tmp_path / "models"
    folder.mkdir()
    names = {"gpt2": tiny_bert, "gpt2-medium": tiny_bert, "gpt2-large": tiny_gpt2, "gpt2-xl": tiny_gpt2}
    names["llama-3-8b"] = tiny_gpt2
    for name, target in names.items():
        # Copies, not links: the service stores a model's fully resolved path (a link's target), and
        # the plot labels models by that path's name.
        shutil.copytree(target, folder / name)
    return {name: folder / name for name in names}


# Realistic figures for the sweep (accuracy of each weak model, each ceiling, PGR per loss), shaped
# like the paper's NLP results: PGR grows with the strong model and logconf beats xent.
WEAK = {"gpt2": 0.712, "gpt2-medium": 0.758}
CEILING = {"gpt2-large": 0.843, "gpt2-xl": 0.871, "llama-3-8b": 0.912}
PGR = {"xent": {"gpt2-large": 0.31, "gpt2-xl": 0.38, "llama-3-8b": 0.47}}
PGR["logconf"] = {model: value + 0.17 for model, value in PGR["xent"].items()}


def _figure(value: float, spread: float = 0.006) -> dict[str, Any]:
    return {
        "accuracy": value,
        "accuracy_std": spread,
        "accuracy_ci": [value - 0.018, value + 0.017],
        "auroc": min(0.99, value + 0.07),
        "auroc_std": spread,
        "auroc_ci": [min(0.99, value + 0.055), min(0.995, value + 0.085)],
    }


def _fill_sweep(sweep_id: str) -> None:
    """Finish the sweep's jobs with results, as the dispatcher would after real training."""
    now = dt.datetime.now(dt.UTC)
    with session_scope() as session:
        jobs = session.query(Job).filter(Job.sweep_id == sweep_id).order_by(Job.created_at).all()
        for index, job in enumerate(jobs):
            weak, strong = Path(job.weak_model).name, Path(job.strong_model).name
            students = {}
            for loss, by_model in PGR.items():
                pgr = by_model[strong] - (0.04 if weak == "gpt2-medium" else 0.0)
                accuracy = WEAK[weak] + pgr * (CEILING[strong] - WEAK[weak])
                students[loss] = {
                    **_figure(accuracy),
                    "pgr": pgr,
                    "pgr_std": 0.05,
                    "pgr_ci": [pgr - 0.12, pgr + 0.11],
                    "agreement_with_weak": 0.86,
                }
            job.results = {
                "weak": _figure(WEAK[weak]),
                "ceiling": _figure(CEILING[strong]),
                "students": students,
                "flags": [],
                "seeds": 2,
                "per_seed": [],
                "timings": {"total": 900.0},
            }
            job.status = "succeeded"
            job.created_at = now - dt.timedelta(minutes=42 - index * 3)
            job.started_at = now - dt.timedelta(minutes=40 - index * 3)
            job.finished_at = now - dt.timedelta(minutes=12 - index)
            for order, stage in enumerate(job.stages):
                stage.status = "succeeded"
                stage.attempts = 1
                stage.gpu_class = "gpu-80g"
                stage.memory_gb = 18.5 + order
                stage.gpu_seconds = 420.0 + 60 * order
                stage.started_at = job.started_at + dt.timedelta(minutes=order * 3)
                stage.finished_at = stage.started_at + dt.timedelta(minutes=3)


def _set_quota(team_id: str, quota: int | None) -> None:
    with session_scope() as session:
        team = session.get(Team, team_id)
        assert team is not None
        team.gpu_quota = quota


def _shown_svg(page: Page, selector: str) -> str:
    """The SVG an <img> on the page shows (drawn by the server), once the browser has loaded it."""
    page.wait_for_function(
        "s => { const i = document.querySelector(s); return !!i && i.complete && i.naturalWidth > 0; }",
        arg=selector,
        timeout=10_000,
    )
    image = page.locator(selector)
    assert image.get_attribute("alt"), f"{selector} has no alt text"
    response = page.request.get(urljoin(page.url, image.get_attribute("src") or ""))
    assert response.ok and response.headers["content-type"] == "image/svg+xml"
    return response.text()


def _status(page: Page, job_id: str) -> str | None:
    badge = page.locator(f'tr[data-job-id="{job_id}"] .badge')
    return badge.inner_text(timeout=1000) if badge.count() else None


def test_dashboard_in_a_browser(
    live_server: str,
    browser: Browser,
    stack: Stack,
    make_team,  # type: ignore[no-untyped-def]
    tiny_bert: Path,
    tiny_gpt2: Path,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    team = make_team("vision")
    base = live_server
    api = httpx.Client(base_url=base, headers=team.headers, timeout=30)
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    page = context.new_page()
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(f"console: {message.text} at {message.location}")

    page.on("console", on_console)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    shots = Shots(page, SCREENSHOTS)

    # Signed out, every page leads to the sign-in form.
    page.goto(f"{base}/team")
    assert page.url.startswith(f"{base}/login?next=/team")
    page.fill("#api_key", "w2s_wrong")
    page.click("button[type=submit]")
    assert page.locator(".login-card .alert-error").inner_text().startswith("That key is not valid")
    # The 401 of that form post is the one console error expected: the browser logs it itself.
    assert [p for p in problems if "401" not in p or "/login" not in p] == []
    problems.clear()
    shots.take("login")
    page.goto(f"{base}/")
    page.fill("#api_key", team.key)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/")
    assert page.locator("text=No jobs yet").is_visible()
    shots.take("jobs-empty")
    assert not any(cookie["name"] == "w2s_session" and not cookie["httpOnly"] for cookie in context.cookies())
    page.evaluate("window.__notReloaded = true")

    # A job submitted through the API shows up and moves on, with no reload.
    models = _model_dirs(tmp_path, tiny_bert, tiny_gpt2)
    spec = tiny_job(
        models["gpt2"], models["gpt2-large"], name="sst2 gpt2 → gpt2-large", losses=["xent", "logconf"]
    )
    for role in ("weak", "strong"):
        spec[role]["epochs"] = 4  # a few more steps, so the curves have a shape
    job_id = api.post("/v1/jobs", json=spec).json()["id"]
    page.wait_for_selector(f'tr[data-job-id="{job_id}"]', timeout=10_000)
    seen = [_status(page, job_id)]
    deadline = time.monotonic() + 120
    while seen[-1] in (seen[0], None) and time.monotonic() < deadline:
        time.sleep(0.2)
        seen.append(_status(page, job_id))
    assert seen[0] in ("queued", "running") and seen[-1] in ("running", "succeeded"), (seen, stack.logs())
    assert seen[-1] != seen[0]  # the status changed in place
    assert page.evaluate("window.__notReloaded") is True
    if seen[-1] == "running":
        page.wait_for_selector(f'tr[data-job-id="{job_id}"] progress')
        shots.take("jobs-live")

    # Its page, opened while it runs, fills in the curves and the results by itself.
    page.click(f'tr[data-job-id="{job_id}"] a.row-link')
    page.wait_for_url(f"{base}/jobs/{job_id}")
    page.evaluate("window.__notReloaded = true")
    try:
        page.wait_for_selector("#job-results table.results-table", timeout=150_000)
    except PlaywrightTimeout:  # the job never finished: say where it stopped
        pytest.fail(f"no results on the job's page after 150 s\n{stack.logs()}")
    assert page.evaluate("window.__notReloaded") is True
    # The curves are images the page reloads as points arrive, versioned by the newest point.
    assert re.search(
        rf"/jobs/{job_id}/curves/loss\.svg\?v=[1-9]", page.locator("#chart-loss").get_attribute("src") or ""
    )
    kinds = ["weak", "ceiling", "xent student", "logconf student"]  # a plot each
    loss = _shown_svg(page, "#chart-loss")
    assert all(f">{kind}</text>" in loss for kind in kinds), loss[-3000:]
    accuracy = _shown_svg(page, "#chart-accuracy")
    assert all(f">{kind}</text>" in accuracy for kind in [*kinds, "evaluation"])
    # The controls redraw the figures in place and keep the choice in the address.
    page.select_option("#curve-kind", "student:logconf")
    page.wait_for_function("document.querySelector('#chart-loss').src.includes('kind=student%3Alogconf')")
    page.locator("#curve-smoothing").fill("0.3")  # a range input: fill sets it and fires change
    page.wait_for_function("document.querySelector('#chart-accuracy').src.includes('smoothing=0.3')")
    assert "kind=student%3Alogconf" in page.url and "smoothing=0.3" in page.url
    assert page.locator("#curve-smoothing-value").inner_text() == "0.30"
    only = _shown_svg(page, "#chart-loss")
    assert ">logconf student</text>" in only and ">weak</text>" not in only and "EMA 0.30" in only
    assert page.evaluate("window.__notReloaded") is True
    page.select_option("#curve-kind", "")
    page.locator("#curve-smoothing").fill("0.8")
    page.wait_for_function("!document.querySelector('#chart-loss').src.includes('kind=')")
    assert page.locator("#job-status").inner_text() == "succeeded"
    assert page.locator(".results-table tbody tr").count() == 4
    assert page.locator("#job-timeline .badge-succeeded").count() == 4
    assert page.locator("#cancel-button").count() == 0
    shots.take("job")
    page.click("#copy-curl")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.startswith(f'curl -X POST {base}/v1/jobs -H "Authorization: Bearer $W2S_API_KEY"'), copied
    assert '"name":"sst2 gpt2' in copied and copied.endswith("}'")

    # A sweep, finished by hand for speed: the team's quota is 0 meanwhile, so nothing runs it.
    _set_quota(team.team_id, 0)
    grid = {
        "name": "sst2 gpt2 family",
        "dataset": {"name": "sst2", "n_train": 64, "n_test": 32},
        "weak_models": [str(models["gpt2"]), str(models["gpt2-medium"])],
        "strong_models": [str(models[name]) for name in ("gpt2-large", "gpt2-xl", "llama-3-8b")],
        "losses": ["xent", "logconf"],
        "seeds": [0, 1],
    }
    response = api.post("/v1/sweeps", json=grid)
    assert response.status_code == 201, response.text
    sweep_id = response.json()["id"]
    _fill_sweep(sweep_id)
    _set_quota(team.team_id, None)

    page.goto(f"{base}/sweeps/{sweep_id}")
    plot = _shown_svg(page, "#sweep-plot")
    labels = [
        f"{weak} → student ({loss})" for weak in ("gpt2", "gpt2-medium") for loss in ("xent", "logconf")
    ]
    labels += ["gpt2 (weak supervisor)", "gpt2-medium (weak supervisor)", "strong ceiling"]
    assert all(f">{label}</text>" in plot for label in labels)  # ceiling, students, weak models
    assert page.locator("script[src*='chart']").count() == 0  # no chart script: drawn on the server
    assert page.locator(".pgr-table tbody tr").count() == 2
    exported = page.request.get(f"{base}/sweeps/{sweep_id}.csv")
    header = "job_id,weak_model,strong_model,weak_label,strong_label,status"
    assert exported.ok and exported.text().startswith(header)
    shots.take("sweep")
    page.goto(f"{base}/sweeps")
    assert page.locator(f'a[href="/sweeps/{sweep_id}"]').is_visible()
    shots.take("sweeps")

    page.goto(f"{base}/")
    page.wait_for_selector(f'tr[data-job-id="{job_id}"] .badge-succeeded')
    assert page.locator("table.jobs-table tbody tr").count() == 7
    shots.take("jobs")
    page.goto(f"{base}/team")
    assert page.locator(".stat-value").first.inner_text() != "0.00"
    shots.take("team")

    assert not problems, problems
    # Last, as the browser logs the 404 response itself as a console error.
    page.goto(f"{base}/jobs/0123456789abcdef")
    assert page.locator("h1").inner_text() == "Not found"
    shots.take("not-found")
    context.close()
    api.close()
    assert time.monotonic() - started < 180

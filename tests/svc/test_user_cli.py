"""The ``w2s`` client commands against a live API server (uvicorn on a free port, the test Postgres).

Finished jobs are made by writing a realistic results document into the database (fast); one test
follows a job through a real worker and dispatcher with tiny models.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
import yaml

from service.db import session_scope
from service.models import Job
from svc_support import Stack, tiny_job
from w2s.results import SeedPredictions, build_results
from w2s_service import user_cli
from w2s_service.client import ApiError, W2SClient
from w2s_service.user_cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def api_url(service_env: dict[str, str]) -> Iterator[str]:
    """The real API app served by uvicorn in a thread, on the test's settings."""
    from api.main import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test API server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@dataclass
class Outcome:
    code: int
    out: str
    err: str


class W2S:
    """Runs ``w2s`` in-process as a team member whose URL and key are in the environment."""

    def __init__(self, url: str, key: str, capsys: pytest.CaptureFixture[str]):
        self.url, self.key, self.capsys = url, key, capsys
        self.api = W2SClient(url, key)

    def __call__(self, *argv: str) -> Outcome:
        self.capsys.readouterr()  # drop anything printed before
        code = main(list(argv))
        captured = self.capsys.readouterr()
        return Outcome(code, captured.out, captured.err)


@pytest.fixture
def w2s(
    api_url: str, make_team, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[W2S]:  # type: ignore[no-untyped-def]
    team = make_team()
    monkeypatch.setenv("W2S_URL", api_url)
    monkeypatch.setenv("W2S_API_KEY", team.key)
    monkeypatch.setenv("COLUMNS", "250")  # rich's width off a terminal: keep table cells on one line
    runner = W2S(api_url, team.key, capsys)
    yield runner
    runner.api.close()


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data) if path.suffix in (".yaml", ".yml") else json.dumps(data))
    return path


def realistic_results(
    losses: tuple[str, ...] = ("xent", "logconf"),
    weak: float = 0.7,
    ceiling: float = 0.9,
    student: float = 0.8,
    seed: int = 0,
) -> dict[str, Any]:
    """A results document made by the library itself from synthetic test predictions, 2 seeds."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)

    def probs(accuracy: float) -> np.ndarray:
        hard = np.where(rng.random(len(labels)) < accuracy, labels, 1 - labels)
        return np.clip(0.5 + (hard - 0.5) * rng.uniform(0.1, 0.9, len(labels)), 0.0, 1.0)

    predictions = [
        SeedPredictions(s, probs(weak), probs(ceiling), {loss: probs(student) for loss in losses})
        for s in (0, 1)
    ]
    results = build_results(predictions, labels, {"weak": 1.5, "ceiling": 2.5, "total": 9.0})
    return json.loads(json.dumps(results))  # plain JSON types, as the database returns them


def finish_job(job_id: str, results: dict[str, Any]) -> None:
    """Mark a job succeeded with ``results``, as the dispatcher would after its last stage."""
    now = dt.datetime.now(dt.UTC)
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status, job.results = "succeeded", results
        job.started_at, job.finished_at = now - dt.timedelta(seconds=42), now
        for stage in job.stages:
            figures = results["students"].get(stage.kind.removeprefix("student:")) or results.get(stage.kind)
            stage.status, stage.step, stage.total_steps = "succeeded", 10, 10
            stage.metrics = {"accuracy": figures["accuracy"], "auroc": figures["auroc"]}
            stage.started_at, stage.finished_at = now - dt.timedelta(seconds=5), now


def job_spec(tmp_path: Path, weak: Path, strong: Path, name: str = "spec.json", **overrides: Any) -> Path:
    return write(tmp_path / name, tiny_job(weak, strong, **overrides))


def one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1 and "Traceback" not in text


# -- submit ---------------------------------------------------------------------------------------


def test_submit_prints_only_the_id_and_the_job_exists(
    w2s: W2S, tmp_path: Path, tiny_bert: Path, tiny_gpt2: Path
) -> None:
    spec = job_spec(tmp_path, tiny_bert, tiny_gpt2, losses=["xent", "logconf"])
    result = w2s("submit", str(spec), "--name", "baseline", "--priority", "5", "--idempotency-key", "k-1")
    assert result.code == 0, result.err
    job_id = result.out.strip()
    assert result.out == f"{job_id}\n" and len(job_id) == 32
    job = w2s.api.get_job(job_id)
    assert (job["name"], job["priority"], job["status"]) == ("baseline", 5, "queued")
    assert [stage["kind"] for stage in job["stages"]] == [
        "weak",
        "ceiling",
        "student:xent",
        "student:logconf",
    ]
    # The same idempotency key: the same job, not a second one.
    again = w2s("submit", str(spec), "--name", "baseline", "--priority", "5", "--idempotency-key", "k-1")
    assert again.out.strip() == job_id
    # The same key with a different body is refused, naming the key (exit 2: bad input).
    other = w2s("submit", str(spec), "--idempotency-key", "k-1")
    assert other.code == 2 and "k-1" in other.err
    # YAML works too, and --url/--key flags override the environment.
    yaml_spec = job_spec(tmp_path, tiny_bert, tiny_gpt2, name="spec.yaml")
    again = w2s("submit", str(yaml_spec), "--url", w2s.url, "--key", w2s.key)
    assert again.code == 0 and again.out.strip() != job_id
    assert len(w2s.api.list_jobs()["data"]) == 2


def test_submit_bad_spec_is_one_line_naming_the_field(
    w2s: W2S, tmp_path: Path, tiny_bert: Path, tiny_gpt2: Path
) -> None:
    spec = job_spec(tmp_path, tiny_bert, tiny_gpt2)
    body = json.loads(spec.read_text())
    body["weak"]["mode"] = "x"
    result = w2s("submit", str(write(spec, body)))
    assert result.code == 2 and result.out == ""
    assert one_line(result.err), result.err
    assert result.err.startswith("error: weak.mode: Input should be 'full', 'probe' or 'lora'")
    assert w2s.api.list_jobs()["data"] == []

    broken = tmp_path / "broken.yaml"
    broken.write_text("dataset: [unclosed")
    result = w2s("submit", str(broken))
    assert result.code == 2 and one_line(result.err) and "not valid JSON/YAML" in result.err
    result = w2s("submit", str(tmp_path / "missing.json"))
    assert result.code == 2 and one_line(result.err) and "not found" in result.err


def test_bad_key_and_unknown_job_exit_2(w2s: W2S) -> None:
    result = w2s("list", "--key", "w2s_not-a-key")
    assert result.code == 2 and one_line(result.err) and "invalid API key" in result.err
    result = w2s("results", "nope")
    assert (result.code, result.err) == (2, "error: job nope not found\n")
    result = w2s("watch", "nope")
    assert result.code == 2 and "job nope not found" in result.err


# -- list, results --------------------------------------------------------------------------------


def test_list_shows_the_jobs(w2s: W2S, tmp_path: Path, tiny_bert: Path, tiny_gpt2: Path) -> None:
    spec = job_spec(tmp_path, tiny_bert, tiny_gpt2)
    done = w2s("submit", str(spec), "--name", "first").out.strip()
    waiting = w2s("submit", str(spec), "--name", "second").out.strip()
    finish_job(done, realistic_results())

    result = w2s("list")
    assert result.code == 0, result.err
    assert done in result.out and waiting in result.out
    assert "tiny-bert → tiny-gpt2" in result.out and "sst2" in result.out
    assert "succeeded" in result.out and "queued" in result.out and "100%" in result.out
    assert result.out.index(waiting) < result.out.index(done)  # newest first

    only_done = w2s("list", "--status", "succeeded", "--dataset", "sst2", "--limit", "10")
    assert done in only_done.out and waiting not in only_done.out
    assert w2s("list", "--limit", "1").err.startswith("more jobs exist")
    assert w2s("list", "--status", "bogus").code == 2  # argparse: the choices


def test_list_keeps_ids_whole_on_a_narrow_console(
    w2s: W2S, tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = w2s("submit", str(job_spec(tmp_path, tiny_bert, tiny_bert))).out.strip()
    monkeypatch.setenv("COLUMNS", "80")
    assert job_id in w2s("list").out


def set_job(job_id: str, **columns: Any) -> None:
    """Write a job's columns (status, timestamps, models, name) as the lifecycle would have."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        for column, value in columns.items():
            setattr(job, column, value)


def row_of(listing: str, job_id: str) -> str:
    (line,) = [line for line in listing.splitlines() if job_id in line]
    return line


def test_list_and_dashboard_show_the_same_run_time(w2s: W2S, tmp_path: Path, tiny_bert: Path) -> None:
    from api.web import views

    job_id = w2s("submit", str(job_spec(tmp_path, tiny_bert, tiny_bert))).out.strip()
    submitted = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    # 28 s of planning and waiting for a slot, then 4 min 28 s of running: the run time is the latter.
    started = submitted + dt.timedelta(seconds=28)
    set_job(
        job_id,
        status="succeeded",
        created_at=submitted,
        started_at=started,
        finished_at=started + dt.timedelta(seconds=268),
    )
    with session_scope() as session:
        dashboard_row = views.job_row(session.get(Job, job_id))
    summary = w2s.api.list_jobs()["data"][0]
    assert summary["duration_s"] == dashboard_row.duration_s == pytest.approx(268)
    shown = views.duration(dashboard_row.duration_s)
    assert shown == "4 min 28 s"
    listing = w2s("list").out
    assert "run time" in listing and shown in row_of(listing, job_id)


def test_list_at_120_columns_is_a_line_per_job_and_tells_models_apart(
    w2s: W2S, tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = job_spec(tmp_path, tiny_bert, tiny_bert)
    models = {}
    for run in ("run-a", "run-b"):  # a sweep's two jobs: their strong models differ in a parent folder only
        job_id = w2s("submit", str(spec)).out.strip()
        models[job_id] = f"/data/sweeps/ladder/{run}/checkpoints/final"
        set_job(
            job_id,
            name=f"ladder sweep with a long name: {tiny_bert} -> {models[job_id]}",
            strong_model=models[job_id],
        )
    monkeypatch.setenv("COLUMNS", "120")
    listing = w2s("list").out
    lines = listing.splitlines()
    assert max(len(line) for line in lines) <= 120
    rows = {job_id: row_of(listing, job_id) for job_id in models}
    assert len([line for line in lines if line.strip()]) == 3 + len(rows)  # title, header, rule, rows
    assert "tiny-bert → run-a/checkpoints/final" in rows[next(iter(models))]
    assert "tiny-bert → run-b/checkpoints/final" in rows[list(models)[1]]
    assert len({row.replace(job_id, "") for job_id, row in rows.items()}) == 2  # never the same


def test_a_cancelled_job_never_reads_100_percent(w2s: W2S, tmp_path: Path, tiny_bert: Path) -> None:
    job_id = w2s("submit", str(job_spec(tmp_path, tiny_bert, tiny_bert))).out.strip()
    # Every stage finished, then the job was cancelled before its results were made.
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        for stage in job.stages:
            stage.status = "succeeded"
        n_stages = len(job.stages)
    assert w2s("cancel", job_id).code == 0
    summary = w2s.api.list_jobs()["data"][0]
    assert summary["status"] == "cancelled" and summary["progress"] == n_stages / (n_stages + 1)
    row = row_of(w2s("list").out, job_id)
    assert "cancelled" in row and "100%" not in row and f"{100 * n_stages // (n_stages + 1)}%" in row


def test_results_table_json_and_csv(w2s: W2S, tmp_path: Path, tiny_bert: Path, tiny_gpt2: Path) -> None:
    job_id = w2s("submit", str(job_spec(tmp_path, tiny_bert, tiny_gpt2))).out.strip()
    results = realistic_results()
    finish_job(job_id, results)

    table = w2s("results", job_id)
    assert table.code == 0 and "student: xent" in table.out and "strong ceiling" in table.out
    assert "timings" in table.err

    as_json = w2s("results", job_id, "--json")
    assert as_json.code == 0 and json.loads(as_json.out) == results

    as_csv = w2s("results", job_id, "--csv")
    assert as_csv.code == 0
    rows = list(csv.DictReader(io.StringIO(as_csv.out)))
    assert [row["model"] for row in rows] == ["weak", "ceiling", "student:xent", "student:logconf"]
    assert {"accuracy_std", "accuracy_ci_low", "pgr", "pgr_ci_high", "agreement_with_weak_std"} <= set(
        rows[0]
    )
    weak, xent = rows[0], rows[2]
    assert float(weak["accuracy"]) == pytest.approx(results["weak"]["accuracy"])
    assert float(weak["auroc_ci_high"]) == pytest.approx(results["weak"]["auroc_ci"][1])
    assert weak["pgr"] == ""  # the weak model has no PGR
    assert float(xent["pgr"]) == pytest.approx(results["students"]["xent"]["pgr"])
    assert w2s("results", job_id, "--json", "--csv").code == 2  # one format at a time


def test_results_of_an_unfinished_job_exit_2(w2s: W2S, tmp_path: Path, tiny_bert: Path) -> None:
    job_id = w2s("submit", str(job_spec(tmp_path, tiny_bert, tiny_bert))).out.strip()
    result = w2s("results", job_id)
    assert result.code == 2 and one_line(result.err) and f"w2s watch {job_id}" in result.err


# -- watch, cancel, retry -------------------------------------------------------------------------


def test_watch_a_finished_job_prints_the_table_at_once(
    w2s: W2S, tmp_path: Path, tiny_bert: Path, tiny_gpt2: Path
) -> None:
    job_id = w2s("submit", str(job_spec(tmp_path, tiny_bert, tiny_gpt2))).out.strip()
    finish_job(job_id, realistic_results(losses=("xent",)))
    started = time.monotonic()
    result = w2s("watch", job_id)
    assert result.code == 0, result.err
    assert time.monotonic() - started < 5
    assert "student: xent" in result.out
    assert "weak (seed 0)" in result.err and "ceiling (seed 0)" in result.err and "10/10" in result.err


def test_cancel_then_watch_exits_3_and_retry_requeues(w2s: W2S, tmp_path: Path, tiny_bert: Path) -> None:
    job_id = w2s("submit", str(job_spec(tmp_path, tiny_bert, tiny_bert))).out.strip()
    result = w2s("cancel", job_id)
    assert (result.code, result.out) == (0, f"job {job_id} cancelled\n")
    assert w2s.api.get_job(job_id)["status"] == "cancelled"

    watched = w2s("watch", job_id)
    assert watched.code == 3 and watched.out == ""
    assert (
        watched.err.strip().splitlines()[-1]
        == f"error: job {job_id} was cancelled (w2s retry {job_id} runs it again)"
    )
    assert w2s("results", job_id).code == 3

    again = w2s("cancel", job_id)  # a finished job: the API's 409, a usage error here
    assert again.code == 2 and one_line(again.err) and "cannot cancel a cancelled job" in again.err

    retried = w2s("retry", job_id)
    assert retried.code == 0 and "queued" in retried.out
    assert w2s.api.get_job(job_id)["status"] == "queued"
    assert w2s("retry", job_id).code == 2  # only failed or cancelled jobs


class Hung(Exception):
    """Raised by the alarm when a watch does not end."""


def test_watch_follows_a_running_job_to_the_end(
    stack: Stack,
    w2s: W2S,
    tmp_path: Path,
    tiny_bert: Path,
    tiny_gpt2: Path,
) -> None:
    job_id = w2s("submit", str(job_spec(tmp_path, tiny_bert, tiny_gpt2))).out.strip()
    deadline = time.monotonic() + 120
    while w2s.api.get_job(job_id)["status"] == "queued":
        assert time.monotonic() < deadline, f"the job never started\n{stack.logs()}"
        time.sleep(0.2)

    def hung(*_: object) -> None:
        raise Hung

    # A watch that never ends fails the test instead of hanging it.
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(240)
    try:
        result = w2s("watch", job_id, "--interval", "0.5")
    except Hung:
        pytest.fail(f"watch did not end\n{stack.logs()}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert result.code == 0, result.err + stack.logs()
    assert "student: xent" in result.out
    assert "student:xent (seed 0)" in result.err and "test acc" in result.err
    job = w2s.api.get_job(job_id)
    assert job["status"] == "succeeded"
    assert json.loads(w2s("results", job_id, "--json").out) == job["results"]


# -- errors ---------------------------------------------------------------------------------------


def test_unreachable_server_exits_4_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("W2S_URL", url)
    assert main(["list"]) == 4
    err = capsys.readouterr().err
    assert err == f"error: cannot reach {url}: connection refused (is the service running? w2s-service dev)\n"
    assert main(["watch", "abc"]) == 4


def test_server_errors_exit_4_and_client_errors_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = {
        "/v1/jobs/down": httpx.Response(503, json={"detail": "the database is unavailable; retry"}),
        "/v1/jobs/html": httpx.Response(502, text="<html>bad gateway</html>"),
        "/v1/jobs/gone": httpx.Response(404, json={"detail": "job gone not found"}),
    }
    transport = httpx.MockTransport(lambda request: answers[request.url.path])
    monkeypatch.setattr(user_cli, "make_client", lambda args: W2SClient("http://api", transport=transport))
    assert main(["results", "down"]) == 4
    assert capsys.readouterr().err == "error: the database is unavailable; retry\n"
    assert main(["results", "html"]) == 4
    assert one_line(capsys.readouterr().err)
    assert main(["results", "gone"]) == 2


def test_client_joins_422_details_into_one_line() -> None:
    detail = [
        {"loc": ["body", "weak", "mode"], "msg": "Input should be 'full', 'probe' or 'lora'"},
        {"loc": ["body", "strong"], "msg": "Field\nrequired"},
    ]
    transport = httpx.MockTransport(lambda request: httpx.Response(422, json={"detail": detail}))
    with W2SClient("http://api", "key", transport=transport) as client, pytest.raises(ApiError) as raised:
        client.submit_job({})
    assert raised.value.status == 422 and not raised.value.unreachable
    assert (
        raised.value.message == "weak.mode: Input should be 'full', 'probe' or 'lora'; strong: Field required"
    )


def test_library_commands_still_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["losses"]) == 0
    assert "logconf" in capsys.readouterr().out
    bad = write(tmp_path / "bad.json", {"dataset": {"name": "sst2"}, "weak": {"model": "gpt2", "mode": "x"}})
    assert main(["run", str(bad)]) == 2
    assert "weak.mode" in capsys.readouterr().err


# -- sweeps ---------------------------------------------------------------------------------------


def test_sweep_submit_and_plot(w2s: W2S, tmp_path: Path, tiny_bert: Path, tiny_gpt2: Path) -> None:
    options = {"epochs": 1, "batch_size": 16, "max_length": 32}
    grid = {
        "dataset": {"name": "sst2", "n_train": 64, "n_test": 32},
        "weak_models": [{"model": str(tiny_bert), **options}, str(tiny_gpt2)],
        "strong_models": [str(tiny_gpt2), {"model": str(tiny_bert), "mode": "probe"}],
        "losses": ["xent", "logconf"],
    }
    result = w2s("sweep", "submit", str(write(tmp_path / "grid.yaml", grid)), "--name", "tiny-grid")
    assert result.code == 0, result.err
    sweep_id = result.out.strip()
    out = tmp_path / "plots" / "plot.png"
    early = w2s("sweep", "plot", sweep_id, "--out", str(out))
    assert (
        early.code == 2
        and one_line(early.err)
        and "has results to plot yet" in early.err
        and not out.exists()
    )

    sweep = w2s.api.get_sweep(sweep_id)
    assert len(sweep["jobs"]) == 4
    for index, job_id in enumerate(sweep["jobs"][:3]):  # one job still running: a gap, not an error
        finish_job(job_id, realistic_results(student=0.75 + 0.03 * index, seed=index))
    result = w2s("sweep", "plot", sweep_id, "--out", str(out))
    assert result.code == 0, result.err
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 10_000
    assert "1 of 4 jobs have no results yet" in result.err

    svg_out = tmp_path / "plots" / "plot.svg"
    result = w2s("sweep", "plot", sweep_id, "--out", str(svg_out))
    assert result.code == 0, result.err
    svg = svg_out.read_text()
    assert svg.startswith("<?xml") and ">strong ceiling</text>" in svg
    unknown = w2s("sweep", "plot", sweep_id, "--out", str(tmp_path / "plot.xyz"))
    assert unknown.code == 2 and one_line(unknown.err) and ".xyz" in unknown.err

    # The figure is w2s.plots' (the dashboard draws the same): its data, then what is drawn.
    sweep = w2s.api.get_sweep(sweep_id)
    assert user_cli.plot_sweep(sweep, "svg").decode() == svg
    data = user_cli.sweep_plot_data(sweep)
    series = {s.label: s for s in data.series}
    assert set(series) == {
        "tiny-bert → student (xent)",
        "tiny-bert → student (logconf)",
        "tiny-gpt2 → student (xent)",
        "tiny-gpt2 → student (logconf)",
        "tiny-bert (weak supervisor)",
        "tiny-gpt2 (weak supervisor)",
        "strong ceiling",
    }
    assert series["strong ceiling"].color == "#000000"
    bert, gpt2 = series["tiny-bert → student (xent)"], series["tiny-gpt2 → student (xent)"]
    assert bert.dash == () and series["tiny-bert → student (logconf)"].dash != ()
    assert bert.color != gpt2.color and bert.color == series["tiny-bert → student (logconf)"].color
    assert data.x_labels == ["tiny-gpt2", "tiny-bert"]  # grid order
    assert sum(value is not None for value in bert.values + gpt2.values) == 3  # one job still running
    assert "sst2" in data.title and "tiny-grid" in data.title
    for label in [*series, "tiny-gpt2", "tiny-bert", data.title]:
        assert f">{label}</text>" in svg, label

"""The dashboard through TestClient on Postgres: sign-in with an API key into an httponly session
cookie, pages only for the signed-in team, the JSON the pages poll, sweep exports, CSRF on the
actions, and the /v1 API untouched by the cookie."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import json
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from api.web.routes import _figure_version
from service.db import session_scope
from service.models import ApiKey, Job, MetricPoint, Stage
from svc_support import csrf_of, login
from w2s_service import user_cli

JOB = {
    "name": "probe-sst2",
    "dataset": {"name": "sst2", "n_train": 40, "n_test": 20},
    "weak": {"model": "gpt2", "mode": "probe"},
    "strong": {"model": "gpt2-medium", "mode": "probe"},
    "losses": ["xent", {"name": "logconf", "aux_coef": 0.5}],
    "seeds": [0],
}
GRID = {
    "name": "grid",
    "dataset": {"name": "sst2", "n_train": 40, "n_test": 20},
    "weak_models": ["gpt2", "distilgpt2"],
    "strong_models": ["gpt2-medium", "gpt2-large"],
    "losses": ["xent", {"name": "logconf", "aux_coef": 0.5}],
    "seeds": [0],
}


def figure(accuracy: float) -> dict[str, Any]:
    return {
        "accuracy": accuracy,
        "accuracy_std": 0.01,
        "accuracy_ci": [accuracy - 0.02, accuracy + 0.02],
        "auroc": accuracy + 0.05,
        "auroc_std": 0.01,
        "auroc_ci": [accuracy + 0.03, accuracy + 0.07],
    }


def results(weak: float, ceiling: float, students: dict[str, float], flags: list[str] | None = None) -> dict:
    def student(accuracy: float) -> dict[str, Any]:
        pgr = (accuracy - weak) / (ceiling - weak)
        return {**figure(accuracy), "pgr": pgr, "pgr_std": 0.04, "pgr_ci": [pgr - 0.1, pgr + 0.1]}

    return {
        "weak": figure(weak),
        "ceiling": figure(ceiling),
        "students": {loss: {**student(acc), "agreement_with_weak": 0.9} for loss, acc in students.items()},
        "flags": flags or [],
        "seeds": 2,
        "per_seed": [],
        "timings": {"total": 3.0},
    }


def submit(client: TestClient, headers: dict[str, str], **overrides: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={**JOB, **overrides}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def finish(job_id: str, document: dict[str, Any]) -> None:
    """Mark a job succeeded with ``document`` as its results, as the dispatcher would."""
    now = dt.datetime.now(dt.UTC)
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status, job.results, job.started_at, job.finished_at = "succeeded", document, now, now
        for stage in job.stages:
            stage.status, stage.started_at, stage.finished_at = "succeeded", now, now


def test_login_page_and_a_bad_key(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    make_team()
    page = client.get("/login")
    assert page.status_code == 200 and "Paste your team" in page.text
    response = login(client, "w2s_not-a-real-key")
    assert response.status_code == 401
    assert "That key is not valid" in response.text
    assert client.get("/", follow_redirects=False).status_code == 303  # still signed out


def test_login_needs_the_forms_csrf_token(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    client.get("/login")
    response = client.post("/login", data={"api_key": team.key, "csrf": "forged"}, follow_redirects=False)
    assert response.status_code == 400 and "expired" in response.text
    assert client.get("/", follow_redirects=False).status_code == 303


def test_good_key_sets_an_httponly_cookie_without_the_key(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    response = login(client, team.key, next_url="/team")
    assert response.status_code == 303 and response.headers["location"] == "/team"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("w2s_session=")
    flags = cookie.lower()
    assert "httponly" in flags and "samesite=lax" in flags and "path=/" in flags
    # The cookie is signed, not encrypted: it must not carry the key itself.
    payload = cookie.split("=", 1)[1].split(";")[0].split(".")[0]
    decoded = base64.b64decode(payload + "=" * (-len(payload) % 4)).decode()
    assert team.key not in decoded and "session_id" in decoded  # a server-side session's id
    page = client.get("/team")
    assert page.status_code == 200 and "Sign out" in page.text


def test_login_ignores_a_foreign_next(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    response = login(client, team.key, next_url="//evil.example/phish")
    assert response.headers["location"] == "/"


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/team",
        "/sweeps",
        "/jobs/abc",
        "/sweeps/abc",
        "/sweeps/abc.csv",
        "/jobs/abc/curves/loss.svg",
        "/sweeps/abc/plot.svg",
    ],
)
def test_pages_require_login(client: TestClient, path: str) -> None:
    response = client.get(path, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login?next=/")
    assert client.get("/ui/jobs.json").status_code == 401


def test_logout_and_revoked_keys_end_the_session(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    login(client, team.key)
    assert client.get("/", follow_redirects=False).status_code == 200
    client.post("/logout", data={}, follow_redirects=False)
    assert client.get("/", follow_redirects=False).status_code == 303
    login(client, team.key)
    with session_scope() as session:
        session.execute(
            update(ApiKey).where(ApiKey.team_id == team.team_id).values(revoked_at=dt.datetime.now(dt.UTC))
        )
    assert client.get("/", follow_redirects=False).status_code == 303


def test_v1_rejects_the_cookie_alone(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    job = submit(client, team.headers)
    login(client, team.key)
    assert client.get("/", follow_redirects=False).status_code == 200  # the cookie works for pages
    assert "w2s_session" in client.cookies
    assert client.get("/v1/jobs").status_code == 401
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 401
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 401
    assert client.post("/v1/jobs", json=JOB).status_code == 401


def test_empty_state_shows_a_curl_example(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    login(client, team.key)
    page = client.get("/")
    assert "No jobs yet" in page.text and "/v1/jobs" in page.text and "$W2S_API_KEY" in page.text
    assert "No sweeps yet" in client.get("/sweeps").text
    live = client.get("/ui/jobs.json").json()
    assert live["jobs"] == [] and "No jobs yet" in live["html"]


def test_jobs_page_and_its_json(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    first = submit(client, team.headers)
    second = submit(client, team.headers, name="other-run", dataset={"name": "sst2", "n_train": 30})
    login(client, team.key)
    page = client.get("/")
    assert page.status_code == 200
    assert "probe-sst2" in page.text and "other-run" in page.text and "logconf(aux_coef=0.5)" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")

    live = client.get("/ui/jobs.json").json()
    assert [job["id"] for job in live["jobs"]] == [second["id"], first["id"]]  # newest first
    row = live["jobs"][1]
    assert row["status"] == "queued" and row["dataset"] == "sst2" and row["weak_model"] == "gpt2"
    assert row["losses"] == ["xent", "logconf(aux_coef=0.5)"] and row["stages_total"] == 4
    assert row["live_progress"] == 0.0 and row["duration_s"] is None
    assert f'data-job-id="{first["id"]}"' in live["html"]

    assert [j["id"] for j in client.get("/ui/jobs.json?name=other").json()["jobs"]] == [second["id"]]
    assert client.get("/ui/jobs.json?status=running").json()["jobs"] == []
    assert "No jobs match" in client.get("/?status=failed").text
    assert len(client.get("/ui/jobs.json?status=bogus").json()["jobs"]) == 2  # ignored, not an error

    # A running job shows its progress: stages done plus the running stage's steps, out of its 4
    # stages and the results document.
    with session_scope() as session:
        job = session.get(Job, first["id"])
        assert job is not None
        job.status, job.started_at = "running", dt.datetime.now(dt.UTC)
        job.stages[0].status = "succeeded"
        job.stages[1].status, job.stages[1].step, job.stages[1].total_steps = "running", 5, 10
    row = next(j for j in client.get("/ui/jobs.json").json()["jobs"] if j["id"] == first["id"])
    assert row["live_progress"] == pytest.approx(1.5 / 5)
    assert row["current_stage"] == "ceiling · seed 0 · 50%" and row["duration_s"] >= 0


def test_job_page(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    job = submit(client, team.headers)
    login(client, team.key)
    page = client.get(f"/jobs/{job['id']}")
    assert page.status_code == 200
    html = page.text
    for text in (
        "weak",
        "ceiling",
        "student · xent",
        "student · logconf(aux_coef=0.5)",
        "Results appear here",
    ):
        assert text in html
    assert 'id="cancel-button"' in html and 'id="retry-button"' not in html
    curl = re.search(r'<pre id="curl-command"[^>]*>(.*?)</pre>', html, re.S)
    assert curl is not None
    command = curl.group(1).replace("&#34;", '"').replace("&#39;", "'").replace("&quot;", '"')
    assert command.startswith(
        'curl -X POST http://testserver/v1/jobs -H "Authorization: Bearer $W2S_API_KEY"'
    )
    body = json.loads(command.split(" -d ", 1)[1].strip("'"))
    assert body["name"] == "probe-sst2" and body["weak"]["model"] == "gpt2"

    finish(job["id"], results(0.70, 0.80, {"xent": 0.76, "logconf(aux_coef=0.5)": 0.78}, ["weak_at_chance"]))
    html = client.get(f"/jobs/{job['id']}").text
    assert "0.760" in html and "[0.740, 0.780]" in html  # accuracy and its interval
    assert "0.60" in html and "[0.50, 0.70]" in html and "± 0.04" in html  # PGR, interval, std
    assert "weak_at_chance" in html and "no better than predicting the majority class" in html
    assert 'id="cancel-button"' not in html

    live = client.get(f"/ui/jobs/{job['id']}.json").json()
    assert "series" not in live and live["metrics_after"] == 0  # no points: the curves' version
    assert live["terminal"] is True and live["job"]["status"] == "succeeded"
    assert set(live["fragments"]) == {"header", "timeline", "results"}
    assert "0.760" in live["fragments"]["results"]
    assert any("job created" in line["message"] for line in live["logs"])


def svg_of(response: Any) -> str:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/svg+xml"
    assert response.headers["cache-control"] == "no-store"  # a team's data, like the pages
    assert response.headers["content-security-policy"].startswith("default-src 'self'")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.text.startswith("<?xml") and "<svg" in response.text
    return response.text


def test_job_curves_are_svgs_drawn_on_the_server(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    job = submit(client, team.headers)
    login(client, team.key)
    page = client.get(f"/jobs/{job['id']}").text
    for panel in ("loss", "accuracy"):
        image = re.search(rf'<img class="chart-img" id="chart-{panel}"[^>]*>', page, re.S)
        assert image is not None
        assert f'src="/jobs/{job["id"]}/curves/{panel}.svg?v=0&amp;smoothing=0.8"' in image.group(0)
        assert 'alt="' in image.group(0)
    empty = svg_of(client.get(f"/jobs/{job['id']}/curves/loss.svg"))
    assert "Waiting for the first training steps" in empty

    weak, ceiling = job["stages"][0]["id"], job["stages"][1]["id"]
    with session_scope() as session:
        for stage_id, base in ((weak, 0.9), (ceiling, 0.6)):
            for step in (1, 2, 3):
                session.add(MetricPoint(stage_id=stage_id, step=step, name="loss", value=base / step))
                session.add(MetricPoint(stage_id=stage_id, step=step, name="train_accuracy", value=0.5))
        session.add(MetricPoint(stage_id=weak, step=3, name="eval_accuracy", value=0.6))
    # A plot per stage kind, titled by it, with the smoothing in the legend.
    loss = svg_of(client.get(f"/jobs/{job['id']}/curves/loss.svg?v=12"))
    assert ">Training loss</text>" in loss and ">weak</text>" in loss and ">ceiling</text>" in loss
    assert ">smoothed (EMA 0.80)</text>" in loss and "Waiting" not in loss
    accuracy = svg_of(client.get(f"/jobs/{job['id']}/curves/accuracy.svg"))
    assert ">evaluation</text>" in accuracy
    # The controls: one kind only, another smoothing; what is not right is refused, naming the fix.
    only_weak = svg_of(client.get(f"/jobs/{job['id']}/curves/loss.svg?kind=weak&smoothing=0.3"))
    assert ">weak</text>" in only_weak and ">ceiling</text>" not in only_weak
    assert ">smoothed (EMA 0.30)</text>" in only_weak
    assert ">raw (no smoothing)</text>" in svg_of(
        client.get(f"/jobs/{job['id']}/curves/loss.svg?smoothing=0")
    )
    bogus = client.get(f"/jobs/{job['id']}/curves/loss.svg?kind=student:nope")
    assert bogus.status_code == 404 and "weak, ceiling, student:xent" in bogus.text
    too_smooth = client.get(f"/jobs/{job['id']}/curves/loss.svg?smoothing=1.5")
    assert too_smooth.status_code == 400 and "smoothing" in too_smooth.text
    # The page opens with the controls as a link left them.
    chosen = client.get(f"/jobs/{job['id']}?smoothing=0.3&kind=ceiling").text
    assert '<option value="ceiling" selected>' in chosen and 'value="0.30"' in chosen
    assert "curves/loss.svg?v=" in chosen and "&amp;smoothing=0.3&amp;kind=ceiling" in chosen
    # What the page polls moves with the newest point, so the page reloads the images then.
    live = client.get(f"/ui/jobs/{job['id']}.json?metrics_after=0").json()
    assert live["metrics_after"] > 0
    page = client.get(f"/jobs/{job['id']}").text
    assert f"curves/loss.svg?v={live['metrics_after']}&amp;" in page
    assert client.get(f"/jobs/{job['id']}/curves/bogus.svg").status_code == 404


def test_a_failed_stage_shows_its_error_and_retry(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    job = submit(client, team.headers)
    with session_scope() as session:
        row = session.get(Job, job["id"])
        assert row is not None
        row.status, row.error = "failed", "stage ceiling (seed 0) failed: CUDA out of memory"
        row.stages[1].status, row.stages[1].attempts = "failed", 3
        row.stages[1].error = "CUDA out of memory"
        row.stages[0].status = "cached"
    login(client, team.key)
    html = client.get(f"/jobs/{job['id']}").text
    assert "The job failed." in html and "CUDA out of memory" in html
    assert 'id="retry-button"' in html and 'id="cancel-button"' not in html
    assert "cache hit" in html and "1 of 4 stages reused" in html
    assert "No results: the job failed" in html


def test_other_teams_objects_are_404(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    owner, other = make_team(), make_team()
    job = submit(client, owner.headers)
    sweep = client.post("/v1/sweeps", json=GRID, headers=owner.headers).json()
    login(client, other.key)
    page = client.get(f"/jobs/{job['id']}")
    assert page.status_code == 404 and "Not found" in page.text and "Sign out" in page.text  # in the layout
    assert client.get(f"/ui/jobs/{job['id']}.json").status_code == 404
    assert client.get(f"/sweeps/{sweep['id']}").status_code == 404
    assert client.get(f"/sweeps/{sweep['id']}.csv").status_code == 404
    for image in (f"/jobs/{job['id']}/curves/loss.svg", f"/sweeps/{sweep['id']}/plot.svg"):
        response = client.get(image)
        assert response.status_code == 404 and "Not found" in response.text  # exactly as the pages
        assert response.headers["content-type"].startswith("text/html")
    assert client.get("/ui/jobs.json").json()["jobs"] == []
    token = csrf_of(client.get("/").text)
    assert client.post(f"/jobs/{job['id']}/cancel", data={"csrf": token}).status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}", headers=owner.headers).json()["status"] == "queued"


def test_cancel_and_retry_need_the_csrf_token(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    job = submit(client, team.headers)
    login(client, team.key)
    url = f"/jobs/{job['id']}/cancel"
    assert client.post(url, follow_redirects=False).status_code == 403
    assert client.post(url, data={"csrf": "forged"}, follow_redirects=False).status_code == 403
    assert client.get(f"/v1/jobs/{job['id']}", headers=team.headers).json()["status"] == "queued"

    token = csrf_of(client.get(f"/jobs/{job['id']}").text)
    response = client.post(url, data={"csrf": token}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == f"/jobs/{job['id']}"
    assert client.get(f"/v1/jobs/{job['id']}", headers=team.headers).json()["status"] == "cancelled"
    page = client.get(f"/jobs/{job['id']}").text
    assert "Cancelled." in page and 'id="retry-button"' in page  # the flash, and retry is offered

    again = client.post(url, headers={"X-CSRF-Token": token, "Accept": "application/json"})
    assert again.status_code == 409 and "cancelled" in again.json()["message"]
    retry = client.post(
        f"/jobs/{job['id']}/retry", headers={"X-CSRF-Token": token, "Accept": "application/json"}
    )
    assert retry.status_code == 202 and retry.json()["status"] == "queued"


def test_sweep_page_and_exports(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    sweep = client.post("/v1/sweeps", json=GRID, headers=team.headers).json()
    figures = {
        ("gpt2", "gpt2-medium"): (0.70, 0.80, 0.75, 0.77),
        ("gpt2", "gpt2-large"): (0.70, 0.85, 0.78, 0.80),
        ("distilgpt2", "gpt2-medium"): (0.65, 0.80, 0.70, 0.72),
    }  # the fourth job is still queued
    for row in sweep["table"]:
        pair = (row["weak_model"], row["strong_model"])
        if pair in figures:
            weak, ceiling, xent, logconf = figures[pair]
            finish(row["job_id"], results(weak, ceiling, {"xent": xent, "logconf(aux_coef=0.5)": logconf}))
    login(client, team.key)

    page = client.get(f"/sweeps/{sweep['id']}")
    assert page.status_code == 200 and "PGR by loss" in page.text
    data = json.loads(
        re.search(r'<script type="application/json" id="sweep-data">(.*?)</script>', page.text).group(1)
    )
    version = data["plot_version"]
    assert '<img class="chart-img chart-wide" id="sweep-plot"' in page.text
    assert f'src="/sweeps/{sweep["id"]}/plot.svg?v={version}"' in page.text
    assert sweep["id"][:12] in client.get("/sweeps").text
    svg = svg_of(client.get(f"/sweeps/{sweep['id']}/plot.svg?v={version}"))
    for label in (
        "gpt2 → student (xent)",
        "distilgpt2 → student (logconf(aux_coef=0.5))",
        "gpt2 (weak supervisor)",
        "strong ceiling",
        "gpt2-medium",
        "gpt2-large",
    ):
        assert f">{label}</text>" in svg, label

    live = client.get(f"/ui/sweeps/{sweep['id']}.json").json()
    assert live["terminal"] is False and "plot" not in live  # one job still queued: keep polling
    assert live["plot_version"] == version  # nothing changed: the page keeps its image
    assert "PGR by loss" in live["fragments"]["tables"]

    exported = client.get(f"/sweeps/{sweep['id']}.csv")
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    assert f'filename="sweep-{sweep["id"]}.csv"' in exported.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert len(rows) == 4
    first = rows[0]
    assert (first["weak_model"], first["strong_model"], first["status"]) == (
        "gpt2",
        "gpt2-medium",
        "succeeded",
    )
    assert float(first["weak_accuracy"]) == 0.70 and float(first["xent accuracy"]) == 0.75
    assert float(first["logconf(aux_coef=0.5) pgr"]) == pytest.approx(0.7)
    assert rows[3]["status"] == "queued" and rows[3]["xent accuracy"] == ""

    exported_json = client.get(f"/sweeps/{sweep['id']}.json")
    assert exported_json.headers["content-type"].startswith("application/json")
    assert exported_json.json() == client.get(f"/v1/sweeps/{sweep['id']}", headers=team.headers).json()
    assert exported_json.json()["pgr_summary"]["xent"]["mean"] == pytest.approx((0.5 + 8 / 15 + 1 / 3) / 3)

    last = sweep["table"][3]["job_id"]
    finish(last, results(0.65, 0.85, {"xent": 0.71, "logconf(aux_coef=0.5)": 0.74}))
    live = client.get(f"/ui/sweeps/{sweep['id']}.json").json()
    assert live["terminal"] is True and live["plot_version"] != version  # new figures: a new image


def test_cli_and_dashboard_draw_the_same_sweep_figure(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    sweep = client.post("/v1/sweeps", json=GRID, headers=team.headers).json()
    jobs = {(row["weak_model"], row["strong_model"]): row["job_id"] for row in sweep["table"]}
    # The cases the two old copies disagreed on: a 0.0 ceiling, a missing one, the weak models.
    finish(jobs["gpt2", "gpt2-medium"], results(0.70, 0.80, {"xent": 0.75, "logconf(aux_coef=0.5)": 0.77}))
    finish(jobs["gpt2", "gpt2-large"], results(0.70, 0.0, {"xent": 0.60, "logconf(aux_coef=0.5)": 0.61}))
    finish(jobs["distilgpt2", "gpt2-medium"], results(0.65, 0.90, {"xent": 0.70}))  # one student missing
    login(client, team.key)

    api = client.get(f"/v1/sweeps/{sweep['id']}", headers=team.headers).json()
    cli_data = user_cli.sweep_plot_data(api)
    values = {s.label: s.values for s in cli_data.series}
    assert values["strong ceiling"][0] == pytest.approx(0.85) and values["strong ceiling"][1] == 0.0
    assert values["distilgpt2 (weak supervisor)"] == (0.65, None)
    assert values["distilgpt2 → student (logconf(aux_coef=0.5))"] == (None, None)

    dashboard = svg_of(client.get(f"/sweeps/{sweep['id']}/plot.svg"))
    assert user_cli.plot_sweep(api, "svg").decode() == dashboard  # the same figure, byte for byte
    page = client.get(f"/sweeps/{sweep['id']}").text
    data = json.loads(re.search(r'id="sweep-data">(.*?)</script>', page).group(1))
    assert data["plot_version"] == _figure_version(cli_data)  # and the same data


def test_team_page(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team(gpu_quota=3)
    job = submit(client, team.headers)
    with session_scope() as session:
        stage = session.scalars(select(Stage).where(Stage.job_id == job["id"]).order_by(Stage.order)).first()
        assert stage is not None
        stage.gpu_seconds, stage.finished_at, stage.status = 5400.0, dt.datetime.now(dt.UTC), "succeeded"
    login(client, team.key)
    html = client.get("/team").text
    assert "1.50" in html  # device-hours
    assert "GPU 0.00 h · CPU 1.50 h" in html  # the stage ran on no GPU: its hours are CPU hours
    usage = client.get("/v1/teams/me/usage", headers=team.headers).json()
    assert usage["device_seconds"] == {"gpu": 0.0, "cpu": 5400.0}
    assert "/ 3" in html and "probe-sst2" in html


def test_database_down_shows_an_error_panel(
    client: TestClient, make_team, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    login(client, team.key)

    def down(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr("service.jobs.list_jobs", down)
    page = client.get("/")
    assert page.status_code == 503 and "The database is unavailable" in page.text
    assert 'class="topbar"' in page.text  # the error is drawn in the layout
    assert client.get("/ui/jobs.json").status_code == 503  # JSON for the poller, from the app handler


def test_static_files_are_local(client: TestClient) -> None:
    html = client.get("/login").text
    assets = re.findall(r'(?:src|href)="(/static/[^"?]+)', html)
    assert {"/static/app.css", "/static/app.js"} <= set(assets)
    for asset in assets:
        assert client.get(asset).status_code == 200
    # The figures are drawn on the server: no chart script, and none fetched from elsewhere.
    assert "chart" not in " ".join(assets) and client.get("/static/chart.js").status_code == 404
    assert "http://" not in re.sub(r"http://testserver", "", html) and "https://" not in html

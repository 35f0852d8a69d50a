"""Exports to MLflow and W&B as rows of their own (service/exports.py): a job that succeeds gets one
pending export per destination its team has, in the same transaction; the dispatcher leases the due
ones; a failed try waits longer each time and the tries are bounded; a stale try is fenced out; the
API re-runs an export and says what is wrong in the request; credentials are only variable names.
The tracking tools themselves are exercised in tests/svc/test_exports_live.py (slow tier)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from conftest import ADMIN_KEY
from fastapi.testclient import TestClient
from sqlalchemy import update

from service import exports
from service.db import session_scope
from service.models import Job, JobExport, Team, utcnow
from service.settings import get_settings

JOB = {
    "dataset": {"name": "sst2", "n_train": 40, "n_test": 20},
    "weak": {"model": "gpt2", "mode": "probe"},
    "strong": {"model": "gpt2-medium", "mode": "probe"},
    "losses": ["xent"],
    "seeds": [0],
}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def submitted(client: TestClient, headers: dict[str, str]) -> str:
    response = client.post("/v1/jobs", json=JOB, headers=headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def succeed(job_id: str) -> None:
    """The job succeeds as the finishing task would make it, exports scheduled in the same transaction."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status, job.results, job.finished_at = "succeeded", {"weak": {"accuracy": 0.7}}, utcnow()
        exports.schedule_exports(session, job, get_settings())


def set_team(team_id: str, **values: Any) -> None:
    with session_scope() as session:
        session.execute(update(Team).where(Team.id == team_id).values(**values))


def export_row(job_id: str, target: str = "mlflow") -> JobExport:
    with session_scope() as session:
        rows = [e for e in exports.job_exports(session, job_id) if e.target == target]
        assert rows, f"no {target} export for job {job_id}"
        session.expunge(rows[0])
        return rows[0]


def lease(limit: int = 10) -> list[tuple[str, str]]:
    with session_scope() as session:
        return exports.lease_due_exports(session, get_settings(), limit)


def test_a_succeeded_job_gets_an_export_per_destination_of_its_team(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    plain, tracked = make_team(), make_team()
    set_team(tracked.team_id, mlflow_tracking_uri="http://mlflow.example:5000", wandb_project="w2s")
    quiet_job, tracked_job = submitted(client, plain.headers), submitted(client, tracked.headers)
    succeed(quiet_job)
    succeed(tracked_job)
    with session_scope() as session:
        assert exports.job_exports(session, quiet_job) == []  # no destination: nothing to do
        rows = exports.job_exports(session, tracked_job)
        assert [(e.target, e.status, e.attempts) for e in rows] == [
            ("mlflow", "pending", 0),
            ("wandb", "pending", 0),
        ]
        job = session.get(Job, tracked_job)
        assert job is not None
        mlflow = exports.destination(session, job, "mlflow", get_settings())
        team_name = session.get(Team, tracked.team_id).name  # type: ignore[union-attr]
        assert mlflow.uri == "http://mlflow.example:5000" and mlflow.experiment == f"w2s/{team_name}"
    # The API lists them, with nothing secret in them.
    listed = client.get(f"/v1/jobs/{tracked_job}/exports", headers=tracked.headers)
    assert listed.status_code == 200 and [e["target"] for e in listed.json()] == ["mlflow", "wandb"]
    assert client.get(f"/v1/jobs/{tracked_job}/exports", headers=plain.headers).status_code == 404


def test_failed_tries_back_off_are_bounded_and_a_stale_try_is_fenced_out(
    client: TestClient, make_team, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("W2S_MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("W2S_EXPORT_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("W2S_EXPORT_RETRY_S", "60")
    get_settings.cache_clear()
    team = make_team()
    job_id = submitted(client, team.headers)
    succeed(job_id)
    export_id = export_row(job_id).id

    first = dict(lease())[export_id]
    assert export_id not in dict(lease())  # leased: not due again meanwhile
    with session_scope() as session:
        assert exports.export_failed(session, export_id, first, "ConnectionError: refused", get_settings())
    row = export_row(job_id)
    assert row.status == "pending" and row.attempts == 1 and row.error == "ConnectionError: refused"
    wait = (row.due_at - row.updated_at).total_seconds()
    assert 59 <= wait <= 61  # the first wait is export_retry_s
    assert export_id not in dict(lease())  # not due before its time

    def come_due() -> str:
        with session_scope() as session:
            session.execute(update(JobExport).where(JobExport.id == export_id).values(due_at=utcnow()))
        return dict(lease())[export_id]

    second = come_due()
    with session_scope() as session:  # the first try, late, can record nothing
        assert not exports.export_succeeded(session, export_id, first, run_id="r1", run_url=None)
        assert exports.export_failed(session, export_id, second, "timed out", get_settings())
    row = export_row(job_id)
    assert row.attempts == 2 and 119 <= (row.due_at - row.updated_at).total_seconds() <= 121  # doubled
    third = come_due()
    with session_scope() as session:
        assert exports.export_failed(session, export_id, third, "timed out again", get_settings())
    row = export_row(job_id)
    assert row.status == "failed" and row.error == "gave up after 3 tries: timed out again"
    with session_scope() as session:
        assert session.get(Job, job_id).status == "succeeded"  # type: ignore[union-attr]  # never the job's

    # Asked again, it starts afresh (a new token: the old tries stay fenced out).
    response = client.post(f"/v1/jobs/{job_id}/export", json={"to": "mlflow"}, headers=team.headers)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "pending" and response.json()["attempts"] == 0
    fresh = dict(lease())[export_id]
    with session_scope() as session:
        assert not exports.export_succeeded(session, export_id, third, run_id="old", run_url=None)
        assert exports.export_succeeded(session, export_id, fresh, run_id="r9", run_url="http://x/r9")
    row = export_row(job_id)
    assert (row.status, row.run_id, row.run_url, row.error) == ("succeeded", "r9", "http://x/r9", None)


def test_the_export_request_names_what_is_wrong(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    job_id = submitted(client, team.headers)
    post = lambda body: client.post(f"/v1/jobs/{job_id}/export", json=body, headers=team.headers)  # noqa: E731
    running = post({"to": "mlflow"})
    assert running.status_code == 409 and "only a succeeded job" in running.text
    succeed(job_id)
    nowhere = post({"to": "wandb"})
    assert (
        nowhere.status_code == 422
        and "W2S_WANDB_PROJECT" in nowhere.text
        and "--wandb-project" in nowhere.text
    )
    bogus = post({"to": "tensorboard"})
    assert bogus.status_code == 422 and "to" in bogus.text


def test_team_export_settings_take_variable_names_never_secrets(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    patch = lambda body: client.patch(f"/v1/admin/teams/{team.team_id}", json=body, headers=ADMIN)  # noqa: E731
    secret = patch({"wandb_key_env": "0123456789abcdef0123456789abcdef01234567"})
    assert secret.status_code == 422 and "NAME of an environment variable" in secret.text
    with_password = patch({"mlflow_tracking_uri": "https://alice:hunter2@mlflow.example"})
    assert with_password.status_code == 422 and "no user or password" in with_password.text
    assert "hunter2" not in with_password.text
    assert patch({"mlflow_tracking_uri": "ftp://x"}).status_code == 422
    ok = patch({"mlflow_tracking_uri": "https://mlflow.example", "mlflow_token_env": "TEAM_A_MLFLOW"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["mlflow_tracking_uri"] == "https://mlflow.example"
    assert ok.json()["mlflow_token_env"] == "TEAM_A_MLFLOW"


def test_an_unreachable_tracking_server_delays_the_export_never_the_job(
    client: TestClient, make_team, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from worker.exports import run_export

    team = make_team()
    set_team(team.team_id, mlflow_tracking_uri="http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    job_id = submitted(client, team.headers)
    succeed(job_id)
    export_id = export_row(job_id).id
    token = dict(lease())[export_id]
    started = dt.datetime.now(dt.UTC)
    assert run_export(export_id, token) == "retry"
    row = export_row(job_id)
    assert row.status == "pending" and row.attempts == 1 and row.due_at > started
    assert row.error and row.error.startswith("mlflow at http://127.0.0.1:9:")
    assert run_export(export_id, token) == "stale"  # a duplicate of that message waits its turn too
    job = client.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
    assert job["status"] == "succeeded"


def test_the_job_page_shows_each_export_and_links_its_run(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    from svc_support import login

    team = make_team()
    set_team(team.team_id, mlflow_tracking_uri="http://mlflow.example:5000", wandb_project="w2s")
    job_id = submitted(client, team.headers)
    succeed(job_id)
    leased = dict(lease())
    mlflow_id, wandb_id = export_row(job_id, "mlflow").id, export_row(job_id, "wandb").id
    with session_scope() as session:
        exports.export_succeeded(
            session,
            mlflow_id,
            leased[mlflow_id],
            run_id="abc",
            run_url="http://mlflow.example:5000/#/runs/abc",
        )
        exports.export_failed(
            session, wandb_id, leased[wandb_id], "wandb at W&B project w2s: CommError", get_settings()
        )
    login(client, team.key)
    page = client.get(f"/jobs/{job_id}").text
    assert 'href="http://mlflow.example:5000/#/runs/abc"' in page and "MLflow run" in page
    assert "W&amp;B export: try 1 failed" in page and "CommError" in page

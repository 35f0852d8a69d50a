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
    monkeypatch.setenv("W2S_EXPORT_REQUEST_RETRIES", "0")
    get_settings.cache_clear()
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


def test_one_team_holds_at_most_its_cap_of_exports_in_flight_and_the_others_go_ahead(
    client: TestClient, make_team, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("W2S_EXPORTS_PER_TEAM", "2")
    get_settings.cache_clear()
    flooding, other = make_team(), make_team()
    for team in (flooding, other):
        set_team(team.team_id, mlflow_tracking_uri="http://mlflow.example:5000")
    flood = [submitted(client, flooding.headers) for _ in range(5)]
    for job_id in flood:
        succeed(job_id)
    latecomer = submitted(client, other.headers)
    succeed(latecomer)  # due after the whole flood
    ids = {job_id: export_row(job_id).id for job_id in [*flood, latecomer]}

    first = lease()
    assert set(dict(first)) == {
        ids[flood[0]],
        ids[flood[1]],
        ids[latecomer],
    }  # the oldest two, and the other team's
    assert lease() == []  # the flooding team is at its cap; its three others wait
    with session_scope() as session:  # one try ends: one more of that team may go
        assert exports.export_failed(
            session, ids[flood[0]], dict(first)[ids[flood[0]]], "timed out", get_settings()
        )
    assert [export_id for export_id, _ in lease()] == [ids[flood[2]]]
    assert lease() == []
    # A lapsed lease (its worker lost) holds no slot: that export is due again, and counts as one.
    with session_scope() as session:
        session.execute(
            update(JobExport)
            .where(JobExport.id == ids[flood[1]])
            .values(lease_until=utcnow() - dt.timedelta(seconds=1))
        )
    assert [export_id for export_id, _ in lease()] == [ids[flood[1]]]


SERVICE_SECRETS = (
    "W2S_ADMIN_KEY",
    "W2S_SESSION_SECRET",
    "AWS_SECRET_ACCESS_KEY",
    "DATABASE_URL",
    "PGPASSWORD",
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "MLFLOW_TRACKING_TOKEN",
    "HF_TOKEN",
)


@pytest.mark.parametrize("variable", SERVICE_SECRETS)
def test_a_team_credential_may_not_name_the_services_own_secrets(
    client: TestClient, make_team, variable: str
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    patch = lambda body: client.patch(f"/v1/admin/teams/{team.team_id}", json=body, headers=ADMIN)  # noqa: E731
    for field in ("mlflow_token_env", "wandb_key_env"):
        refused = patch({field: variable})
        assert refused.status_code == 422, refused.text
        assert field in refused.text and variable in refused.text and "service's own" in refused.text
    with session_scope() as session:
        row = session.get(Team, team.team_id)
        assert row is not None and row.mlflow_token_env is None and row.wandb_key_env is None
    assert patch({"mlflow_token_env": "TEAM_A_MLFLOW_TOKEN"}).status_code == 200


def test_the_admin_cli_refuses_them_too(make_team, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from w2s_service import cli

    team = make_team()
    with session_scope() as session:
        name = session.get(Team, team.team_id).name  # type: ignore[union-attr]
    assert cli.main(["team-set", name, "--mlflow-token-env", "W2S_ADMIN_KEY"]) == 2
    error = capsys.readouterr().err
    assert "mlflow_token_env" in error and "W2S_ADMIN_KEY" in error and "service's own" in error
    assert cli.main(["team-set", name, "--wandb-key-env", "AWS_SECRET_ACCESS_KEY"]) == 2
    with session_scope() as session:
        row = session.get(Team, team.team_id)
        assert row is not None and row.mlflow_token_env is None and row.wandb_key_env is None
    assert cli.main(["team-set", name, "--mlflow-token-env", "TEAM_A_MLFLOW_TOKEN"]) == 0


def test_an_export_sends_no_secret_of_the_service_to_a_teams_server(
    client: TestClient, make_team, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from export_support import recording_server
    from worker.exports import run_export

    monkeypatch.setenv("W2S_EXPORT_REQUEST_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "the-deployments-own-mlflow-token")
    monkeypatch.setenv("TEAM_A_MLFLOW_TOKEN", "team-a-token")
    get_settings.cache_clear()
    team = make_team()
    job_id = submitted(client, team.headers)
    with recording_server() as (uri, seen):
        # A row naming the admin key, written before the check existed: the export fails, saying why,
        # and the server is never contacted.
        set_team(team.team_id, mlflow_tracking_uri=uri, mlflow_token_env="W2S_ADMIN_KEY")
        succeed(job_id)
        export_id = export_row(job_id).id
        assert run_export(export_id, dict(lease())[export_id]) == "refused"
        row = export_row(job_id)
        assert row.status == "failed" and seen == []
        assert row.error and "W2S_ADMIN_KEY" in row.error and "--mlflow-token-env" in row.error
        assert ADMIN_KEY not in row.error

        # No credential named: the workers' own MLflow token stays home (it is for the deployment's server).
        set_team(team.team_id, mlflow_token_env=None)
        client.post(f"/v1/jobs/{job_id}/export", json={"to": "mlflow"}, headers=team.headers)
        assert run_export(export_id, dict(lease())[export_id]) == "retry"  # the server answers 503
        assert seen and all("authorization" not in headers for headers in seen)

        # The team's own token, from the variable it names.
        seen.clear()
        set_team(team.team_id, mlflow_token_env="TEAM_A_MLFLOW_TOKEN")
        client.post(f"/v1/jobs/{job_id}/export", json={"to": "mlflow"}, headers=team.headers)
        assert run_export(export_id, dict(lease())[export_id]) == "retry"
        assert seen and all(headers.get("authorization") == "Bearer team-a-token" for headers in seen)


def test_exports_have_a_queue_and_worker_of_their_own_and_the_control_worker_still_runs_old_ones() -> None:
    from w2s_service.cli import worker_argv
    from worker.celery_app import CONTROL_QUEUE, EXPORT_TASK, EXPORTS_QUEUE, FINISH_TASK, PLAN_TASK, app

    route = lambda task: app.amqp.router.route({}, task)["queue"].name  # noqa: E731
    assert route(EXPORT_TASK) == EXPORTS_QUEUE
    assert route(PLAN_TASK) == route(FINISH_TASK) == CONTROL_QUEUE
    # Every worker knows every task: an export a dispatcher from before sent to the control queue runs
    # on the control worker.
    app.loader.import_default_modules()
    assert {EXPORT_TASK, PLAN_TASK, FINISH_TASK} <= set(app.tasks)
    argv = worker_argv(EXPORTS_QUEUE, embedded=False, export_concurrency=6)
    assert argv[argv.index("--queues") + 1] == "exports" and argv[argv.index("--concurrency") + 1] == "6"

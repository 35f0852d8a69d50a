"""Exports through the service to a real MLflow server and to W&B offline files (slow tier).

Real jobs of tiny models run through the service's own loop (dispatch rounds, planning, stages,
finishing, exports: svc_support.Steps); what a researcher would then look at is read back with
MLflow's own client (run tree, params, curves, results, artifacts) and from W&B's offline run files.
A tracking server that is down delays the export and the job still succeeds; once the server is up,
the next try lands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from export_support import free_port, mlflow_server, read_run
from service import exports
from service.db import session_scope
from service.models import JobExport, Team, utcnow
from service.settings import get_settings
from svc_support import Steps, tiny_job

pytestmark = pytest.mark.slow


def set_team(team_id: str, **values: Any) -> None:
    with session_scope() as session:
        session.execute(update(Team).where(Team.id == team_id).values(**values))


def run_exports(steps: Steps, rounds: int = 5) -> None:
    """Dispatch rounds until no export is due, running each leased export here."""
    from worker.exports import run_export

    for _ in range(rounds):
        report = steps.round()
        if not report.exports:
            return
        for export_id, token in report.exports:
            run_export(export_id, token)


def exports_of(job_id: str) -> dict[str, JobExport]:
    with session_scope() as session:
        rows = exports.job_exports(session, job_id)
        for row in rows:
            session.expunge(row)
        return {row.target: row for row in rows}


def run_job(client: TestClient, headers: dict[str, str], body: dict[str, Any]) -> str:
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 201, response.text
    job_id = str(response.json()["id"])
    assert Steps().run(job_id, rounds=40)["status"] == "succeeded"
    return job_id


def job_body(model: Path, **overrides: Any) -> dict[str, Any]:
    body = tiny_job(model, model, losses=["xent", "logconf"], seeds=[0, 1], **overrides)
    for role in ("weak", "strong"):
        body[role]["epochs"] = 2  # a few steps: curves with a shape
    return body


def test_a_job_and_a_sweep_appear_in_mlflow_with_curves_and_figures(
    client: TestClient, make_team, tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("W2S_EXPORT_EXPERIMENT", "sweep")  # a sweep's jobs: an experiment of their own
    monkeypatch.setenv("W2S_WANDB_MODE", "offline")  # and the same jobs to W&B, as files
    monkeypatch.setenv("W2S_WANDB_DIR", str(tmp_path / "wandb"))
    get_settings.cache_clear()
    with mlflow_server(tmp_path / "mlflow") as uri:
        team = make_team()
        set_team(team.team_id, mlflow_tracking_uri=uri, wandb_project="w2s-tests")
        job_id = run_job(client, team.headers, job_body(tiny_bert, name="tiny sst2"))
        assert set(exports_of(job_id)) == {"mlflow", "wandb"}
        run_exports(Steps())
        export = exports_of(job_id)["mlflow"]
        assert export.status == "succeeded", export.error
        assert export.run_url and export.run_url.startswith(f"{uri}/#/experiments/")

        tracking = MlflowClient(uri)
        with session_scope() as session:
            team_name = session.get(Team, team.team_id).name  # type: ignore[union-attr]
        experiment = tracking.get_experiment_by_name(f"w2s/{team_name}")
        assert experiment is not None
        runs = tracking.search_runs([experiment.experiment_id], max_results=100)
        parent = next(run for run in runs if run.data.tags.get("w2s.job_id") == job_id)
        assert parent.info.run_id == export.run_id and parent.info.run_name == "tiny sst2"
        children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        job = client.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
        assert len(children) == len(job["stages"]) == 8  # weak, ceiling, 2 students per seed
        # The spec as params, the results as metrics, the figures and documents as artifacts.
        assert parent.data.params["weak.model"] == str(tiny_bert)
        assert parent.data.params["losses"].startswith("xent")
        results = job["results"]
        assert parent.data.metrics["weak.accuracy"] == pytest.approx(results["weak"]["accuracy"])
        assert parent.data.metrics["ceiling.accuracy"] == pytest.approx(results["ceiling"]["accuracy"])
        artifacts = {item.path for item in tracking.list_artifacts(parent.info.run_id)}
        assert {"results.json", "curves_loss.svg", "curves_accuracy.svg", "manifest.json"} <= artifacts
        # Each stage's curve by step, as its worker reported it.
        series = client.get(f"/v1/jobs/{job_id}/metrics", headers=team.headers).json()["series"]
        stage = next(s for s in job["stages"] if s["kind"] == "student:logconf" and s["seed"] == 1)
        child = next(run for run in children if run.data.tags.get("w2s.stage_id") == stage["id"])
        history = tracking.get_metric_history(child.info.run_id, "loss")
        reported = next(s for s in series if s["stage_id"] == stage["id"] and s["name"] == "loss")
        assert [point.step for point in history] == reported["steps"]
        assert [point.value for point in history] == pytest.approx(reported["values"])

        # A sweep: its jobs in the sweep's experiment, each with the sweep's figure.
        grid = {
            "name": "tiny family",
            "dataset": {"name": "sst2", "n_train": 64, "n_test": 32},
            "weak_models": [{"model": str(tiny_bert), "mode": "probe"}],
            "strong_models": [{"model": str(tiny_bert), "mode": "probe"}],
            "losses": ["xent"],
            "seeds": [0],
        }
        sweep = client.post("/v1/sweeps", json=grid, headers=team.headers)
        assert sweep.status_code == 201, sweep.text
        sweep_jobs = [str(job_id) for job_id in sweep.json()["jobs"]]
        for sweep_job in sweep_jobs:
            assert Steps().run(sweep_job, rounds=40)["status"] == "succeeded"
        run_exports(Steps())
        in_sweep = tracking.get_experiment_by_name(f"w2s/{team_name}/tiny family")
        assert in_sweep is not None
        sweep_runs = [
            run
            for run in tracking.search_runs([in_sweep.experiment_id], max_results=100)
            if run.data.tags.get("w2s.job_id") in sweep_jobs
        ]
        assert len(sweep_runs) == len(sweep_jobs)
        for run in sweep_runs:
            assert "sweep.svg" in {item.path for item in tracking.list_artifacts(run.info.run_id)}
        # In W&B the sweep is the group of its jobs' runs.
        for sweep_job in sweep_jobs:
            assert exports_of(sweep_job)["wandb"].status == "succeeded"
            folders = sorted((tmp_path / "wandb" / sweep_job).rglob("offline-run-*"))
            assert folders and {read_run(folder).run.run_group for folder in folders} == {"tiny family"}

        # Exported again on request: the same run, not a second one.
        again = client.post(f"/v1/jobs/{job_id}/export", json={"to": "mlflow"}, headers=team.headers)
        assert again.status_code == 202
        run_exports(Steps())
        assert exports_of(job_id)["mlflow"].run_id == export.run_id
        parents = [
            run
            for run in tracking.search_runs([experiment.experiment_id], max_results=100)
            if run.data.tags.get("w2s.job_id") == job_id and "mlflow.parentRunId" not in run.data.tags
        ]
        assert len(parents) == 1


def test_a_tracking_server_down_delays_the_export_and_the_next_try_lands(
    client: TestClient, make_team, tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("W2S_EXPORT_REQUEST_RETRIES", "0")
    get_settings.cache_clear()
    port = free_port()
    team = make_team()
    set_team(team.team_id, mlflow_tracking_uri=f"http://127.0.0.1:{port}")  # nothing listens yet
    body = tiny_job(tiny_bert, tiny_bert)
    body["weak"]["mode"] = body["strong"]["mode"] = "probe"
    job_id = run_job(client, team.headers, body)
    run_exports(Steps())
    export = exports_of(job_id)["mlflow"]
    assert export.status == "pending" and export.attempts == 1
    assert export.error and f"127.0.0.1:{port}" in export.error
    assert export.due_at > utcnow()  # waits before the next try
    assert client.get(f"/v1/jobs/{job_id}", headers=team.headers).json()["status"] == "succeeded"
    listed = client.get(f"/v1/jobs/{job_id}/exports", headers=team.headers).json()
    assert listed[0]["status"] == "pending" and listed[0]["error"]

    with mlflow_server(tmp_path / "mlflow", port=port) as uri:
        with session_scope() as session:  # its time comes
            session.execute(update(JobExport).where(JobExport.job_id == job_id).values(due_at=utcnow()))
        run_exports(Steps())
        export = exports_of(job_id)["mlflow"]
        assert export.status == "succeeded" and export.attempts == 2 and export.error is None
        assert export.run_url and export.run_url.startswith(uri)


def test_wandb_offline_files_hold_the_job(
    client: TestClient, make_team, tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("W2S_WANDB_MODE", "offline")
    monkeypatch.setenv("W2S_WANDB_DIR", str(tmp_path / "wandb"))
    get_settings.cache_clear()
    team = make_team()
    set_team(team.team_id, wandb_project="w2s-tests")
    job_id = run_job(client, team.headers, tiny_job(tiny_bert, tiny_bert, name="tiny offline"))
    run_exports(Steps())
    export = exports_of(job_id)["wandb"]
    assert export.status == "succeeded", export.error
    folders = sorted((tmp_path / "wandb" / job_id).rglob("offline-run-*"))
    runs = [read_run(folder) for folder in folders]
    job = client.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
    # A run per stage and the results run, all in the job's group, each stage's kind its job type.
    assert sorted(run.run.job_type for run in runs) == sorted(
        [*(s["kind"] for s in job["stages"]), "results"]
    )
    assert {run.run.run_group for run in runs} == {"tiny offline"}
    assert {run.run.project for run in runs} == {"w2s-tests"}
    results_run = next(run for run in runs if run.run.job_type == "results")
    assert results_run.summary["weak.accuracy"] == pytest.approx(job["results"]["weak"]["accuracy"])
    series = client.get(f"/v1/jobs/{job_id}/metrics", headers=team.headers).json()["series"]
    weak = next(s for s in job["stages"] if s["kind"] == "weak")
    weak_run = next(run for run in runs if run.run.job_type == "weak")
    loss = next(s for s in series if s["stage_id"] == weak["id"] and s["name"] == "loss")
    logged = [(row["_step"], row["loss"]) for row in weak_run.history if "loss" in row]
    assert [step for step, _ in logged] == loss["steps"]
    assert [value for _, value in logged] == pytest.approx(loss["values"])

"""The export task: one succeeded job to MLflow or Weights & Biases (service/exports.py says when).

It runs on the control queue, after the job has succeeded, so a tracking server that is down or slow
only delays the export: each failed try waits longer (service.exports.export_failed) and the job's
state never depends on it. What is sent is built by the library (w2s.tracking) from what the API
serves: the spec, the results, the stages, their curves and the figures the dashboard draws.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

from service.db import database_unreachable, session_scope
from service.exports import Destination, current_export, destination, export_failed, export_succeeded
from service.logs import log_context
from service.metrics import job_series
from service.models import Job, Sweep
from service.settings import Settings, get_settings
from service.states import StageStatus
from service.sweeps import sweep_report
from worker.celery_app import EXPORT_TASK, app

logger = logging.getLogger(__name__)

# MLflow's client retries each request 7 times with back-off (minutes against a server that is down);
# the export's own retries are the patient ones, so each try fails fast unless the operator says not.
MLFLOW_CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


@app.task(name=EXPORT_TASK)
def export_job_task(export_id: str, token: str) -> str:
    return run_export(export_id, token)


def run_export(export_id: str, token: str, settings: Settings | None = None) -> str:
    """One try of an export; returns what happened: done, stale (fenced out), or retry."""
    settings = settings or get_settings()
    try:
        with session_scope() as session:
            export = current_export(session, export_id, token)
            if export is None:
                return "stale"
            job = session.get(Job, export.job_id)
            assert job is not None
            where = destination(session, job, export.target, settings)  # type: ignore[arg-type]
            payload = job_payload(session, job)
    except DBAPIError as failure:
        if database_unreachable(failure):
            return "retry"  # the lease lapses and the dispatcher sends it again
        raise
    with log_context(job_id=payload["job_id"]):
        try:
            run_id, run_url = send(payload, where, settings)
        except Exception as failure:  # any failure of the tracking side: try again later
            error = describe(failure, where)
            logger.warning("export of job %s to %s failed: %s", payload["job_id"], where.target, error)
            with session_scope() as session:
                export_failed(session, export_id, token, error, settings)
            return "retry"
        with session_scope() as session:
            recorded = export_succeeded(session, export_id, token, run_id=run_id, run_url=run_url)
        logger.info("job %s exported to %s: %s", payload["job_id"], where.target, run_url or run_id)
        return "done" if recorded else "stale"


def job_payload(session: Any, job: Job) -> dict[str, Any]:
    """What the library builds an export from: the job as the API serves it, and its figures."""
    from w2s import plots

    stages = [
        {
            "id": stage.id,
            "kind": stage.kind,
            "seed": stage.seed,
            "status": stage.status,
            "key": stage.stage_key,
            "reused": stage.status == StageStatus.cached,
            "metrics": stage.metrics or {},
            "started_at": stage.started_at.isoformat() if stage.started_at else None,
            "finished_at": stage.finished_at.isoformat() if stage.finished_at else None,
        }
        for stage in job.stages
    ]
    series = job_series(session, job, max_points=2_000)
    curves = plots.curves_figure_data(series, order=[stage.id for stage in job.stages])
    figures = {
        f"curves_{panel}.svg": plots.render_curves_svg(curves, panel).encode()
        for panel in ("loss", "accuracy")
    }
    group = None
    if job.sweep_id:
        sweep = session.get(Sweep, job.sweep_id)
        assert sweep is not None
        report = json.loads(json.dumps(dataclasses.asdict(sweep_report(session, sweep=sweep)), default=str))
        figures["sweep.svg"] = plots.render_sweep_svg(
            plots.sweep_figure_data(report["grid"], report["table"], name=report.get("name") or "")
        ).encode()
        group = sweep.name or sweep.id
    return {
        "job_id": job.id,
        "name": job.name or job.id,
        "group": group,
        "spec": job.spec,
        "results": job.results or {},
        "manifest": job.manifest or {},
        "stages": stages,
        "series": series,
        "figures": figures,
    }


def send(payload: dict[str, Any], where: Destination, settings: Settings) -> tuple[str, str | None]:
    """Export to the destination; returns (run id, link)."""
    from w2s.tracking import build_export, environment

    export = build_export(
        payload["spec"],
        payload["results"],
        payload["stages"],
        payload["series"],
        {**payload["figures"], "manifest.json": json.dumps(payload["manifest"], indent=2).encode()},
        name=payload["name"],
        group=where.group or payload["group"],
        job_id=payload["job_id"],
    )
    if where.target == "mlflow":
        from w2s.export_mlflow import export_to_mlflow

        assert where.uri and where.experiment
        with environment(_secret("MLFLOW_TRACKING_TOKEN", where.secret_env), defaults=MLFLOW_CLIENT_DEFAULTS):
            exported = export_to_mlflow(export, where.uri, where.experiment)
    else:
        from w2s.export_wandb import export_to_wandb

        assert where.project
        api_key = os.environ.get(where.secret_env) if where.secret_env else None
        exported = export_to_wandb(
            export,
            project=where.project,
            entity=where.entity,
            mode=settings.wandb_mode,
            directory=Path(settings.wandb_dir) / payload["job_id"],
            api_key=api_key,
        )
    return exported.run_id, exported.url


def _secret(variable: str, source_env: str | None) -> dict[str, str]:
    """The team's credential, read from the environment variable its settings name (never stored)."""
    if source_env and os.environ.get(source_env):
        return {variable: os.environ[source_env]}
    return {}


def describe(failure: BaseException, where: Destination) -> str:
    """The failure in one line, naming where it went; never a credential (the environment holds them,
    and messages of HTTP clients carry the URL, not its headers)."""
    first = str(failure).splitlines()[0] if str(failure) else type(failure).__name__
    place = where.uri if where.target == "mlflow" else f"W&B project {where.project}"
    return f"{where.target} at {place}: {type(failure).__name__}: {first}"[:2000]

"""The export task: one succeeded job to MLflow or Weights & Biases (service/exports.py says when).

It runs on the exports queue (``w2s-service worker --queue exports``), after the job has succeeded,
so a tracking server that is down or slow only delays exports: each request to it is bounded
(``W2S_EXPORT_REQUEST_TIMEOUT_S``, ``W2S_EXPORT_REQUEST_RETRIES``), each failed try waits longer
(service.exports.export_failed), and neither the job's state nor anyone's planning or finishing
depends on it. What is sent is built by the library (w2s.tracking) from what the API serves: the
spec, the results, the stages, their curves and the figures the dashboard draws.
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
from service.exports import (
    Destination,
    current_export,
    destination,
    export_failed,
    export_succeeded,
    reserved_env_reason,
)
from service.logs import log_context
from service.metrics import job_series
from service.models import Job, Sweep
from service.settings import Settings, get_settings
from service.states import StageStatus
from service.sweeps import sweep_report
from worker.celery_app import EXPORT_TASK, app

logger = logging.getLogger(__name__)

# The export workers' own MLflow credentials: sent to the deployment's server, never to a team's own.
MLFLOW_CREDENTIALS = (
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "MLFLOW_TRACKING_AUTH",
)


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
            refused = credential_refused(where)
            if refused is not None:  # a row from before the check, or written around it
                logger.warning("export %s refused: %s", export_id, refused)
                export_failed(session, export_id, token, refused, settings, final=True)
                return "refused"
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
        with environment(mlflow_credentials(where)):
            exported = export_to_mlflow(
                export,
                where.uri,
                where.experiment,
                request_timeout_s=settings.export_request_timeout_s,
                request_retries=settings.export_request_retries,
            )
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
            request_timeout_s=settings.export_request_timeout_s,
            request_retries=settings.export_request_retries,
        )
    return exported.run_id, exported.url


def credential_refused(where: Destination) -> str | None:
    """Why this export may not read the variable its team names as its credential (one of the
    service's own secrets: the export would send it to the team's server), or None."""
    if not where.secret_env:
        return None
    reason = reserved_env_reason(where.secret_env)
    if reason is None:
        return None
    flag = "--mlflow-token-env" if where.target == "mlflow" else "--wandb-key-env"
    return (
        f"refused: the team's {where.secret_field} names {where.secret_env}, and {reason}; an operator "
        f"names a variable of the team's own (`w2s-service team-set TEAM {flag} TEAM_A_TOKEN`), then "
        "exports again"
    )


def mlflow_credentials(where: Destination) -> dict[str, str | None]:
    """MLflow's credential variables for this export (None: unset): the team's token, read from the
    variable its settings name (never stored); on a team's own server none of the workers' own."""
    values: dict[str, str | None] = {}
    if not where.deployment_server:
        values = dict.fromkeys(MLFLOW_CREDENTIALS)
    if where.secret_env and os.environ.get(where.secret_env):
        values["MLFLOW_TRACKING_TOKEN"] = os.environ[where.secret_env]
    return values


def describe(failure: BaseException, where: Destination) -> str:
    """The failure in one line, naming where it went; never a credential (the environment holds them,
    and messages of HTTP clients carry the URL, not its headers)."""
    first = str(failure).splitlines()[0] if str(failure) else type(failure).__name__
    place = where.uri if where.target == "mlflow" else f"W&B project {where.project}"
    return f"{where.target} at {place}: {type(failure).__name__}: {first}"[:2000]

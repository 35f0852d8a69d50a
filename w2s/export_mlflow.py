"""A job's export (w2s.tracking.JobExport) to an MLflow tracking server, as a researcher browses it.

The job is a parent run: the spec as params, the results' figures as metrics, ``results.json``, the
manifest and the figures as artifacts. Each stage is a nested run under it (tag
``mlflow.parentRunId``) with its training curves by step, its final test metrics, its stage key,
kind and seed. A stage whose result was reused from an earlier run is linked, not copied: it has no
curves, is tagged ``w2s.reused``, and where a run of this experiment computed that stage key, names
it (``w2s.reused_from_run``, and a link in the run's description).

Needs MLflow's client (``pip install '.[mlflow]'``: mlflow-skinny); the server is the researcher's.
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from w2s.tracking import ExportedRun, JobExport, StageExport, environment

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

# MLflow's limits on one log_batch call (mlflow.utils.validation).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_TAG_CHARS = 5000  # under the server's 8000, also for older servers
# Tags this module sets and reads back.
JOB_ID, ROLE, STAGE_ID, STAGE_KEY = "w2s.job_id", "w2s.role", "w2s.stage_id", "w2s.stage_key"
REUSED, REUSED_FROM, COMPLETE = "w2s.reused", "w2s.reused_from_run", "w2s.export_complete"
PARENT = "mlflow.parentRunId"
NOTE = "mlflow.note.content"  # the run's description in MLflow's UI (markdown)
SUPPRESS_URL_PRINTING = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
RETRIES, TIMEOUT = "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"
RUN_STATUS = {"succeeded": "FINISHED", "cached": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}


def export_to_mlflow(
    export: JobExport,
    tracking_uri: str,
    experiment: str,
    *,
    existing_run_id: str | None = None,
    request_timeout_s: int | None = None,
    request_retries: int | None = None,
) -> ExportedRun:
    """Send one job to MLflow at ``tracking_uri`` (http(s)://, file:, sqlite:, databricks ...) into
    ``experiment`` (created if missing); returns the parent run's id and, for an http(s) server, the
    link to it.

    Exporting the same job again updates its runs instead of adding a second copy: the parent run is
    the one ``existing_run_id`` names, else the one tagged ``w2s.job_id`` with the job's id in the
    experiment. It is reused, not replaced, so its id, its link and the ``w2s.reused_from_run`` links
    other jobs hold to its stages stay valid: tags, metrics that changed, and artifacts are written
    again; params are immutable in MLflow and only the missing ones are added. A stage run that an
    earlier try left half written (no ``w2s.export_complete`` tag) is deleted and made anew, so its
    curves are never logged twice. A library run without a job id is new on every export.

    Credentials come from MLflow's own environment variables (MLFLOW_TRACKING_TOKEN,
    MLFLOW_TRACKING_USERNAME/PASSWORD), never from arguments that could be logged.

    ``request_timeout_s`` (connect and read) and ``request_retries`` bound each request to the
    server, for this call only (MLflow reads them from its environment variables at each request;
    its defaults, 120 s and 7 retries with back-off, hold a dead server's caller for many minutes).
    """
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as error:
        raise ImportError(
            "exporting to MLflow needs its client: pip install '.[mlflow]' (or pip install mlflow-skinny)"
        ) from error

    bounds = {SUPPRESS_URL_PRINTING: "true"}
    if request_timeout_s is not None:
        bounds[TIMEOUT] = str(int(max(1, request_timeout_s)))
    if request_retries is not None:
        bounds[RETRIES] = str(int(max(0, request_retries)))
    with environment(bounds):
        return _export(
            MlflowClient(tracking_uri=tracking_uri), export, tracking_uri, experiment, existing_run_id
        )


class TrackerUnavailable(ValueError):
    """The tracking server cannot be reached, or refuses this client (a ValueError: the CLI says so in
    one line)."""


def check_tracking_server(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, before hours of training, when MLflow at ``tracking_uri`` cannot be reached or
    refuses the credentials in the environment: one try, no retries (MLflow's client retries for
    minutes by default)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    quick = {SUPPRESS_URL_PRINTING: "true", RETRIES: "0", TIMEOUT: str(int(max(1, timeout_s)))}
    with environment(quick):
        try:
            MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
        except (MlflowException, OSError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise TrackerUnavailable(f"MLflow at {tracking_uri} cannot be used: {first}") from error


def _export(
    client: MlflowClient, export: JobExport, tracking_uri: str, experiment: str, existing_run_id: str | None
) -> ExportedRun:
    parent = _existing_parent(client, experiment, export, existing_run_id)
    updated = parent is not None
    if parent is None:
        experiment_id = _experiment_id(client, experiment)
        parent = client.create_run(
            experiment_id, start_time=_ms(export.started_at), tags=_job_tags(export), run_name=export.name
        )
    else:
        experiment_id = parent.info.experiment_id
    run_id = parent.info.run_id
    url = run_url(tracking_uri, experiment_id, run_id)

    _log(client, parent, params=export.params, tags=_job_tags(export), metrics=export.metrics)
    with tempfile.TemporaryDirectory(prefix="w2s-mlflow-") as folder:
        for file_name, data in export.artifacts.items():
            Path(folder, file_name).write_bytes(data)
        client.log_artifacts(run_id, folder)

    children = _children(client, experiment_id, run_id)
    stage_runs: dict[str, str] = {}
    # Computed stages first: a reused stage of this same job then finds the run it links to.
    for stage in sorted(export.stages, key=lambda s: s.reused):
        child = children.get(stage.stage_id)
        if child is not None and child.data.tags.get(COMPLETE) != "true":
            client.delete_run(child.info.run_id)  # half written by a failed try: its curves may be partial
            child = None
        stage_runs[stage.stage_id] = _export_stage(client, experiment_id, run_id, stage, child, tracking_uri)

    client.log_batch(run_id, tags=_tags({COMPLETE: "true"}))
    client.set_terminated(run_id, "FINISHED", end_time=_ms(export.finished_at))
    return ExportedRun(
        run_id=run_id, url=url, stage_runs=stage_runs, experiment_id=experiment_id, updated_existing=updated
    )


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in MLflow's UI, for a server reached over http(s); None otherwise."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _experiment_id(client: MlflowClient, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except MlflowException:
            found = client.get_experiment_by_name(name)  # another export created it meanwhile
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise ValueError(
            f"the MLflow experiment {name!r} was deleted: restore it (mlflow experiments restore) "
            "or export to another experiment"
        )
    return found.experiment_id


def _existing_parent(
    client: MlflowClient, experiment: str, export: JobExport, existing_run_id: str | None
) -> Run | None:
    """The parent run an earlier export of this job made, if it is still there (not deleted)."""
    from mlflow.exceptions import MlflowException

    if existing_run_id:
        try:
            run = client.get_run(existing_run_id)
        except MlflowException:
            run = None  # deleted for good, or another server: find it by the job's id, else start anew
        if (
            run is not None
            and run.info.lifecycle_stage == "active"
            and run.data.tags.get(ROLE) == "job"
            and run.data.tags.get(JOB_ID) == (export.job_id or run.data.tags.get(JOB_ID))
        ):
            return run
    if not export.job_id:
        return None
    found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage == "deleted":
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{JOB_ID}` = {_literal(export.job_id)} and tags.`{ROLE}` = 'job'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return runs[0] if runs else None


def _children(client: MlflowClient, experiment_id: str, parent_id: str) -> dict[str, Run]:
    """The parent's stage runs by stage id."""
    children: dict[str, Run] = {}
    for run in _search(client, experiment_id, f"tags.`{PARENT}` = {_literal(parent_id)}"):
        stage_id = run.data.tags.get(STAGE_ID)
        if stage_id:
            children.setdefault(stage_id, run)
    return children


def _search(client: MlflowClient, experiment_id: str, filter_string: str) -> Iterator[Run]:
    token: str | None = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _export_stage(
    client: MlflowClient,
    experiment_id: str,
    parent_id: str,
    stage: StageExport,
    existing: Run | None,
    tracking_uri: str,
) -> str:
    tags = {
        PARENT: parent_id,
        ROLE: "stage",
        **{f"w2s.{key}": value for key, value in stage.tags.items()},
        STAGE_ID: stage.stage_id,
        REUSED: str(stage.reused).lower(),
    }
    if stage.key:
        tags[STAGE_KEY] = stage.key
    if stage.reused:
        origin = _origin(client, experiment_id, stage.key) if stage.key else None
        if origin is not None:
            tags[REUSED_FROM] = origin.info.run_id
            link = run_url(tracking_uri, origin.info.experiment_id, origin.info.run_id)
            where = f"[{origin.info.run_name}]({link})" if link else f"run {origin.info.run_id}"
            tags[NOTE] = (
                f"Result reused from {where}, which computed stage key `{stage.key}`: its curves are there."
            )
        else:
            tags[NOTE] = (
                f"Result reused from an earlier run of stage key `{stage.key}` that was not exported to this "
                "experiment: no curves here."
            )
    if existing is None:
        run = client.create_run(
            experiment_id, start_time=_ms(stage.started_at), tags=tags, run_name=stage.name
        )
        curves = stage.curves
    else:
        run, curves = existing, {}  # complete already: its curves are there
    # Final metrics under their own names; one that names a curve is that curve's last point already.
    finals = {name: value for name, value in stage.metrics.items() if name not in stage.curves}
    _log(client, run, params=stage.params, tags=tags, metrics=finals)
    timestamp = _ms(stage.finished_at) or int(time.time() * 1000)
    from mlflow.entities import Metric

    points = [
        Metric(name, value, timestamp, step)
        for name, curve in curves.items()  # a reused stage has none
        for step, value in curve
    ]
    for chunk in _chunks(points, MAX_METRICS_PER_BATCH):
        client.log_batch(run.info.run_id, metrics=chunk)
    client.log_batch(run.info.run_id, tags=_tags({COMPLETE: "true"}))
    client.set_terminated(
        run.info.run_id, RUN_STATUS.get(stage.status, "FINISHED"), end_time=_ms(stage.finished_at)
    )
    return run.info.run_id


def _origin(client: MlflowClient, experiment_id: str, stage_key: str) -> Run | None:
    """The earliest complete run in the experiment that computed ``stage_key`` (not reused it)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{STAGE_KEY}` = {_literal(stage_key)} and tags.`{REUSED}` = 'false' "
            f"and tags.`{COMPLETE}` = 'true'"
        ),
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return runs[0] if runs else None


def _log(
    client: MlflowClient, run: Run, *, params: dict[str, str], tags: dict[str, str], metrics: dict[str, float]
) -> None:
    """Params not yet there (MLflow refuses to change one), every tag, metrics whose value differs."""
    from mlflow.entities import Metric, Param

    present = run.data.params
    changed = sorted(name for name, value in params.items() if name in present and present[name] != value)
    if changed:
        logger.warning("MLflow run %s keeps its earlier params %s", run.info.run_id, ", ".join(changed))
    new_params = [Param(name, value) for name, value in params.items() if name not in present]
    for chunk in _chunks(new_params, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run.info.run_id, params=chunk)
    for chunk in _chunks(_tags(tags), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run.info.run_id, tags=chunk)
    now = int(time.time() * 1000)
    latest = run.data.metrics
    new_metrics = [
        Metric(name, value, now, 0) for name, value in metrics.items() if latest.get(name) != value
    ]
    for chunk in _chunks(new_metrics, MAX_METRICS_PER_BATCH):
        client.log_batch(run.info.run_id, metrics=chunk)


def _job_tags(export: JobExport) -> dict[str, str]:
    tags = {f"w2s.{key}": value for key, value in export.tags.items()}
    tags.update({ROLE: "job", "w2s.group": export.group, "mlflow.source.name": "w2s"})
    if export.job_id:
        tags[JOB_ID] = export.job_id
    return tags


def _tags(tags: dict[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    return [
        RunTag(key, value if len(value) <= MAX_TAG_CHARS else value[: MAX_TAG_CHARS - 1] + "…")
        for key, value in tags.items()
    ]


def _chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _literal(value: str) -> str:
    """A string literal for MLflow's search filter. Ids and hashes only: a quote in one has no escape
    the filter grammar of every MLflow version reads alike."""
    if "'" in value or "\\" in value:
        raise ValueError(f"cannot search MLflow for {value!r}: quotes and backslashes are not supported")
    return f"'{value}'"


def _ms(moment: dt.datetime | None) -> int | None:
    return int(moment.timestamp() * 1000) if moment is not None else None

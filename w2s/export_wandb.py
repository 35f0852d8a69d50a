"""A job's export (w2s.tracking.JobExport) to Weights & Biases, laid out as W&B users lay out theirs.

W&B has no nested runs, so each stage is a run of its own, grouped: ``group`` is the job (or its
sweep), ``job_type`` the stage kind (weak, ceiling, student:xent, ...), ``name`` "<job> · <kind> seed
N"; its config is the job's flattened spec plus the stage's own params (``stage.*``), its history the
training curves by step, its summary the final test metrics. One more run in the group, job type
``results``, holds the job's figures (accuracy, AUROC, PGR with spread and intervals) in its summary,
and ``results.json``, the manifest and the figures as files (SVG figures also as HTML panels).

A stage whose result was reused from an earlier run has no curves here either: its run says so
(tag ``reused``, notes) and carries the stage key (config ``stage.stage_key``) that finds the run
that computed it.

Offline mode writes everything under ``directory``/wandb/offline-run-* and nothing leaves the
machine; ``wandb sync <run dir>`` uploads it later. Needs ``pip install '.[wandb]'``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from w2s.tracking import ExportedRun, JobExport, StageExport

if TYPE_CHECKING:
    from wandb.sdk.wandb_run import Run

MAX_TAG_CHARS = 64  # W&B refuses longer tags
MAX_JOB_TYPE_CHARS = 64
# A param string that is a JSON number or boolean goes to W&B's config as one, so runs sort and
# filter by it (MLflow keeps strings).
NUMBER_OR_BOOL = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false")


def export_to_wandb(
    export: JobExport,
    *,
    project: str,
    entity: str | None,
    mode: Literal["online", "offline"],
    directory: Path,
    api_key: str | None,
    request_timeout_s: float | None = None,
    request_retries: int | None = None,
) -> ExportedRun:
    """Send one job to W&B ``entity``/``project`` as one run per stage and a results run, grouped by
    the job; returns the results run's id and link (online) and every run's folder under
    ``directory`` (offline: what ``wandb sync`` uploads), each complete once this returns.

    With a job id, run ids are derived from it, so exporting the job again online resumes the same
    runs (W&B keeps history steps it already has, and config and summary take the new values)
    instead of adding copies. ``api_key`` is handed to W&B's settings for online mode only; it is
    never printed, logged or written to ``directory``. Online, ``request_timeout_s`` and
    ``request_retries`` bound each request to W&B (GraphQL, file stream, file uploads) and a run's
    start and end, so a server that never answers fails this call in bounded time instead of
    holding it (W&B's own defaults retry for many minutes, and a run's end waits for its uploads).

    W&B's process-wide state (its settings and its wandb-core service process) is set up for the
    export and torn down after it: wandb-core writes a run's transaction log (the ``.wandb`` file
    that ``wandb sync`` reads) out only when it closes the run's stream, which happens after
    ``run.finish()`` has returned, and teardown waits until every stream is closed. Without it the
    last run's file could still be empty when this returned (seen under load), and W&B's own
    teardown at exit is unreliable under multiprocessing (Celery's pool), W&B says. Each export also
    starts from its own settings (mode) instead of the first export's in this process. So this is
    not for a process with W&B runs of its own open: the teardown would finish them.
    """
    try:
        import wandb
    except ImportError as error:
        raise ImportError(
            "exporting to W&B needs its client: pip install '.[wandb]' (or pip install wandb)"
        ) from error
    if mode not in ("online", "offline"):
        raise ValueError(f"mode must be online or offline, not {mode!r}")
    # Process-wide settings, read by W&B's own telemetry: offline, it must not probe the server.
    wandb.setup(settings=wandb.Settings(mode=mode, silent=True))
    try:
        return _export_runs(
            wandb,
            export,
            project=project,
            entity=entity,
            mode=mode,
            directory=Path(directory),
            api_key=api_key,
            request_timeout_s=request_timeout_s,
            request_retries=request_retries,
        )
    finally:
        _teardown(wandb)


def _teardown(wandb: Any) -> None:
    """Wait for wandb-core to write out and close every run's files, then stop it."""
    try:
        wandb.teardown()
    except SystemExit as exit_:  # W&B exits the process when its service ended badly: fail the export
        raise RuntimeError(
            f"W&B's service process exited with code {exit_.code}: the runs' files may be incomplete"
        ) from None


def _export_runs(
    wandb: Any,
    export: JobExport,
    *,
    project: str,
    entity: str | None,
    mode: Literal["online", "offline"],
    directory: Path,
    api_key: str | None,
    request_timeout_s: float | None,
    request_retries: int | None,
) -> ExportedRun:
    directory.mkdir(parents=True, exist_ok=True)
    bounds = request_bounds(request_timeout_s, request_retries) if mode == "online" else {}

    config = _nested(export.params)
    common_tags = _wandb_tags(
        [
            f"dataset:{export.tags.get('dataset', '')}",
            f"weak:{_short(export.tags.get('weak', ''))}",
            f"strong:{_short(export.tags.get('strong', ''))}",
            f"preset:{export.tags.get('preset', 'none')}",
        ]
    )
    stage_runs: dict[str, str] = {}
    run_dirs: list[Path] = []
    for stage in export.stages:
        run = _init(
            wandb,
            export,
            mode=mode,
            project=project,
            entity=entity,
            directory=directory,
            api_key=api_key,
            bounds=bounds,
            run_key=stage.stage_id,
            name=f"{export.name} · {stage.name}",
            job_type=stage.kind,
            config={**config, "stage": _nested(stage.params)},
            tags=[*common_tags, *_wandb_tags([stage.kind, "reused" if stage.reused else "computed"])],
            notes=_stage_notes(stage),
        )
        try:
            _log_curves(run, stage)
            run.summary.update({**stage.metrics, "stage_status": stage.status, "reused": stage.reused})
        finally:
            run.finish(exit_code=0 if stage.status in ("succeeded", "cached") else 1)
        stage_runs[stage.stage_id] = run.id
        run_dirs.append(Path(run.settings.sync_dir))

    results = _init(
        wandb,
        export,
        mode=mode,
        project=project,
        entity=entity,
        directory=directory,
        api_key=api_key,
        bounds=bounds,
        run_key="results",
        name=f"{export.name} · results",
        job_type="results",
        config=config,
        tags=[*common_tags, "results"],
        notes=f"Results of {export.name}: the stages are the other runs of group {export.group!r}.",
    )
    try:
        results.summary.update(export.metrics)
        _save_files(wandb, results, export.artifacts)
        url = results.url if mode == "online" else None
    finally:
        results.finish()
    run_dirs.append(Path(results.settings.sync_dir))
    return ExportedRun(run_id=results.id, url=url, stage_runs=stage_runs, run_dirs=run_dirs)


def _init(
    wandb: Any,
    export: JobExport,
    *,
    mode: str,
    project: str,
    entity: str | None,
    directory: Path,
    api_key: str | None,
    bounds: dict[str, Any],
    run_key: str,
    name: str,
    job_type: str,
    config: dict[str, Any],
    tags: list[str],
    notes: str,
) -> Run:
    wanted = {
        "mode": mode,
        "silent": True,
        "console": "off",  # no copy of this process's output in the run
        "x_disable_stats": True,  # no system metrics: this process is not the one that trained
        "x_disable_meta": True,
        "x_disable_machine_info": True,
        "disable_git": True,
        "disable_code": True,
        "save_code": False,
        "disable_job_creation": True,
        "x_save_requirements": False,
        **({"api_key": api_key} if api_key and mode == "online" else {}),
        **bounds,
    }
    # Older clients lack some of these switches (and refuse unknown ones): set those they have.
    known = getattr(wandb.Settings, "model_fields", wanted)
    settings = wandb.Settings(**{name: value for name, value in wanted.items() if name in known})
    return wandb.init(
        project=project,
        entity=entity,
        dir=str(directory),
        id=_run_id(export, run_key),
        resume="allow" if export.job_id and mode == "online" else None,
        name=name,
        group=export.group,
        job_type=job_type[:MAX_JOB_TYPE_CHARS],
        config=config,
        tags=tags,
        notes=notes,
        reinit="create_new",
        settings=settings,
    )


def request_bounds(timeout_s: float | None, retries: int | None) -> dict[str, Any]:
    """W&B settings that bound each request (GraphQL, file stream, file uploads: connect and read
    timeout, retries) and so a run's start and its end, which otherwise waits for every upload; a
    run's end past its bound raises instead of leaving the export half sent and called done."""
    bounds: dict[str, Any] = {}
    if retries is not None:
        for name in ("x_graphql_retry_max", "x_file_stream_retry_max", "x_file_transfer_retry_max"):
            bounds[name] = retries
    if timeout_s is not None:
        for name in (
            "x_graphql_timeout_seconds",
            "x_file_stream_timeout_seconds",
            "x_file_transfer_timeout_seconds",
        ):
            bounds[name] = float(timeout_s)
        one_request = float(timeout_s) * ((retries or 0) + 1)
        bounds.update(
            init_timeout=one_request + 10, finish_timeout=2 * one_request, finish_timeout_raises=True
        )
    return bounds


def _run_id(export: JobExport, run_key: str) -> str | None:
    """A run id fixed by the job and the stage, so a second export finds the first one's runs."""
    if not export.job_id:
        return None
    return "w2s-" + hashlib.sha256(f"{export.job_id}\0{run_key}".encode()).hexdigest()[:24]


def _log_curves(run: Run, stage: StageExport) -> None:
    """Every curve point, one ``run.log`` per step in step order (W&B drops steps that go back)."""
    by_step: dict[int, dict[str, float]] = {}
    for metric, points in stage.curves.items():
        for step, value in points:
            by_step.setdefault(step, {})[metric] = value
    for step in sorted(by_step):
        run.log(by_step[step], step=step)


def _save_files(wandb: Any, run: Run, artifacts: dict[str, bytes]) -> None:
    """The job's files in the run's own folder (uploaded with it, by ``wandb sync`` when offline);
    SVG figures also as HTML panels, which W&B shows in the run's workspace."""
    folder = Path(run.dir)
    panels = {}
    for file_name, data in artifacts.items():
        path = folder / file_name
        path.write_bytes(data)
        run.save(str(path), base_path=str(folder), policy="now")
        if file_name.endswith(".svg"):
            panels[f"figures/{Path(file_name).stem}"] = wandb.Html(
                data.decode(errors="replace"), inject=False
            )
    if panels:
        run.log(panels, step=0)


def _stage_notes(stage: StageExport) -> str:
    if stage.reused:
        return (
            f"{stage.name}: result reused from an earlier run of stage key {stage.key}; its curves are in "
            "the run that computed it (config stage.stage_key)."
        )
    return f"{stage.name}: stage key {stage.key}."


def _nested(params: dict[str, str]) -> dict[str, Any]:
    """``{"weak.lr": "0.001"}`` -> ``{"weak": {"lr": 0.001}}``: W&B's config keys must not contain
    dots; its UI shows nested keys as ``weak.lr`` again."""
    nested: dict[str, Any] = {}
    for name, value in params.items():
        *parents, leaf = name.split(".")
        node = nested
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):  # a value and a prefix of others at once: keep both
                child = node[part] = {"value": child}
            node = child
        node[leaf] = json.loads(value) if NUMBER_OR_BOOL.fullmatch(value) else value
    return nested


def _short(model: str) -> str:
    return model.rstrip("/").rsplit("/", 1)[-1]


def _wandb_tags(tags: list[str]) -> list[str]:
    return [tag[:MAX_TAG_CHARS] for tag in tags if tag and not tag.endswith(":")]

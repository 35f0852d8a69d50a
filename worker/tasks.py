"""The stage task: load the stage row, run the w2s stage, persist the outcome.

Pass ids, never objects: the task re-reads its row and owns its status changes. torch is
imported inside the task (in the worker's child process), never in the parent, so CUDA is only
ever initialised where the work runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from typing import Any

from sqlalchemy.exc import OperationalError

from service.db import insert_ignoring_duplicates, session_scope
from service.dispatch import record_result, stage_plans
from service.jobs import log
from service.models import MetricPoint, Stage, utcnow
from service.settings import Settings, get_settings
from service.states import STAGE_DONE, JobStatus, StageStatus, check_stage_transition
from worker.celery_app import STAGE_TASK, app

logger = logging.getLogger(__name__)


class ProgressWriter:
    """The training callback: buffers metric points and writes them, with the stage's progress,
    every ``flush_s`` seconds. It returns False once the job is cancelled, which stops training.
    A failed write (database briefly down) keeps the points for the next flush."""

    def __init__(self, stage_id: str, flush_s: float):
        self.stage_id = stage_id
        self.flush_s = flush_s
        self.points: list[tuple[int, str, float]] = []
        self.latest: Any = None
        self.last_flush = time.monotonic()
        self.cancelled = False

    def __call__(self, progress: Any) -> bool:
        self.latest = progress
        step = progress.step
        self.points += [
            (step, "loss", progress.loss),
            (step, "train_accuracy", progress.train_accuracy),
            (step, "lr", progress.lr),
        ]
        if progress.eval_accuracy is not None:
            self.points.append((step, "eval_accuracy", progress.eval_accuracy))
        if time.monotonic() - self.last_flush >= self.flush_s or step == progress.total_steps:
            self.flush()
        return not self.cancelled

    def flush(self) -> None:
        try:
            with session_scope() as session:
                stage = session.get(Stage, self.stage_id)
                if stage is None:
                    self.cancelled = True
                    return
                if self.points:
                    session.execute(
                        insert_ignoring_duplicates(session, MetricPoint.__table__),
                        [
                            {"stage_id": self.stage_id, "step": step, "name": name, "value": float(value)}
                            for step, name, value in self.points
                        ],
                    )
                if self.latest is not None:
                    stage.step = self.latest.step
                    stage.total_steps = self.latest.total_steps
                    stage.metrics = {**(stage.metrics or {}), "loss": self.latest.loss}
                stage.heartbeat_at = utcnow()
                self.cancelled = stage.job.cancel_requested
            self.points.clear()
            self.last_flush = time.monotonic()
        except OperationalError as error:
            logger.warning(
                "progress write failed, keeping %d points for the next try: %s", len(self.points), error
            )


def _device_name() -> str | None:
    import torch

    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
        return f"{torch.cuda.get_device_name(0)} (CUDA_VISIBLE_DEVICES={visible})"
    return None


def claim_stage(stage_id: str, worker: str, settings: Settings) -> dict[str, Any] | None:
    """Mark the stage running and return what the run needs, or None if it must not run."""
    with session_scope() as session:
        stage = session.get(Stage, stage_id)
        if stage is None or stage.status in STAGE_DONE:
            return None  # deleted, or a duplicate delivery of a finished stage
        job = stage.job
        if job.cancel_requested or job.status in (JobStatus.cancelled, JobStatus.failed):
            if stage.status in (StageStatus.queued, StageStatus.running):
                stage.status = StageStatus.cancelled
                stage.finished_at = utcnow()
            return None
        if stage.attempts >= settings.max_stage_attempts:
            stage.status = StageStatus.failed
            stage.error = (
                f"gave up after {stage.attempts} attempts; last error: {stage.error or 'worker lost'}"
            )
            stage.finished_at = utcnow()
            log(session, job_id=job.id, stage_id=stage.id, message=stage.error, level="error")
            return None
        if stage.status == StageStatus.running:
            log(
                session,
                job_id=job.id,
                stage_id=stage.id,
                message=f"{stage.kind}/{stage.seed}: redelivered",
                level="warning",
            )
        check_stage_transition(stage.status, StageStatus.running)
        stage.status = StageStatus.running
        stage.attempts += 1
        stage.worker = worker
        stage.started_at = utcnow()
        stage.heartbeat_at = stage.started_at
        log(
            session,
            job_id=job.id,
            stage_id=stage.id,
            message=f"{stage.kind}/{stage.seed}: attempt {stage.attempts} on {worker}",
        )
        return {"spec": job.spec, "kind": stage.kind, "seed": stage.seed, "job_id": job.id}


def _finish(
    stage_id: str,
    status: StageStatus,
    *,
    error: str | None = None,
    record: dict[str, Any] | None = None,
    settings: Settings,
) -> None:
    with session_scope() as session:
        stage = session.get(Stage, stage_id)
        if stage is None:
            return
        check_stage_transition(stage.status, status)
        now = utcnow()
        if stage.started_at is not None:
            started = (
                stage.started_at if stage.started_at.tzinfo else stage.started_at.replace(tzinfo=now.tzinfo)
            )
            used = (now - started).total_seconds()
            stage.gpu_seconds += used
            stage.job.gpu_seconds += used  # per job as it accrues, whether the job ends well or not
        stage.status = status
        stage.error = error
        if status in STAGE_DONE or status in (StageStatus.failed, StageStatus.cancelled):
            stage.finished_at = now
        if record is not None:
            stage.result = record
            stage.stage_key = record["key"]
            stage.metrics = {
                **(stage.metrics or {}),
                "accuracy": record["accuracy"],
                "auroc": record["auroc"],
            }
            record_result(session, stage, record, settings.store_uri)
        message = f"{stage.kind}/{stage.seed}: {status}" + (f": {error}" if error else "")
        log(
            session,
            job_id=stage.job_id,
            stage_id=stage.id,
            message=message,
            level="error" if error else "info",
        )


def execute_stage(stage_id: str, *, worker: str, settings: Settings | None = None) -> str:
    """Run one stage to its end state and return that state."""
    settings = settings or get_settings()
    claim = claim_stage(stage_id, worker, settings)
    if claim is None:
        return "skipped"
    from w2s.spec import JobSpec
    from w2s.stages import StageCancelled, run_stage
    from w2s.store import ArtifactStore

    writer = ProgressWriter(stage_id, settings.progress_flush_s)
    try:
        device = _device_name()
        if device:
            with session_scope() as session:
                session.get(Stage, stage_id).gpu = device  # type: ignore[union-attr]
        plan = stage_plans(JobSpec.model_validate(claim["spec"]), settings)[claim["kind"], claim["seed"]]
        result = run_stage(plan, ArtifactStore(settings.store_uri), callback=writer)
    except StageCancelled:
        writer.flush()
        _finish(stage_id, StageStatus.cancelled, settings=settings)
        return StageStatus.cancelled
    except (ValueError, MemoryError) as error:
        # Bad input or out of memory will fail again: stop now, with the message shown.
        _finish(stage_id, StageStatus.failed, error=f"{type(error).__name__}: {error}", settings=settings)
        return StageStatus.failed
    except Exception as error:
        if "OutOfMemoryError" in type(error).__name__:
            _finish(stage_id, StageStatus.failed, error=f"out of GPU memory: {error}", settings=settings)
            return StageStatus.failed
        raise
    writer.flush()
    status = StageStatus.cached if result.cached else StageStatus.succeeded
    _finish(stage_id, status, record=result.to_record(), settings=settings)
    return status


def requeue_after_error(stage_id: str, error: BaseException) -> None:
    """A transient failure: the stage goes back to queued (its slot kept) for Celery's retry."""
    with session_scope() as session:
        stage = session.get(Stage, stage_id)
        if stage is not None and stage.status == StageStatus.running:
            stage.status = check_stage_transition(stage.status, StageStatus.queued)
            stage.error = f"{type(error).__name__}: {error}"
            log(
                session,
                job_id=stage.job_id,
                stage_id=stage.id,
                message=f"will retry: {stage.error}",
                level="warning",
            )


@app.task(name=STAGE_TASK, bind=True, max_retries=None)
def run_stage_task(self: Any, stage_id: str) -> str:
    worker = self.request.hostname or socket.gethostname()
    try:
        return execute_stage(stage_id, worker=worker)
    except Exception as error:
        logger.exception("stage %s failed", stage_id)
        # If the database is down too, the retry below finds the stage still running: fine.
        with contextlib.suppress(OperationalError):
            requeue_after_error(stage_id, error)
        # Attempts are bounded in claim_stage; back off 5 s, 10 s, 20 s ... up to 5 minutes.
        raise self.retry(exc=error, countdown=min(5 * 2**self.request.retries, 300)) from error

"""The stage task: load the stage row, run the w2s stage, persist the outcome.

Pass ids, never objects: the task re-reads its row and owns its status changes. The worker's
parent process imports torch and the stage code once (``worker_init``) so that every stage's fresh
child, forked from it, starts with them loaded; CUDA is only ever initialised in the child, where
the work runs.

Faults. Each run is one *attempt* (``stages.attempts``) and every write it makes is fenced by it:
once the dispatcher has requeued a stage whose heartbeat went silent (its worker was killed, or cut
off), a late write from the old attempt changes nothing and its training stops at the next step.
A duplicate delivery of a stage that another live worker is running is dropped. Database writes
are retried for ``db_retry_s`` (Postgres restarting), so a finished stage's result is not thrown
away because the database blinked.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import socket
import threading
import time
from typing import Any

from celery.signals import worker_init
from sqlalchemy import delete, update
from sqlalchemy.exc import DBAPIError

from service.db import database_unreachable, insert_ignoring_duplicates, retry_database, session_scope
from service.dispatch import record_result, stage_plans
from service.jobs import log
from service.models import MetricPoint, Stage, utcnow
from service.settings import Settings, get_settings
from service.states import STAGE_DONE, JobStatus, StageStatus, check_stage_transition
from worker.celery_app import STAGE_TASK, app

logger = logging.getLogger(__name__)


@worker_init.connect
def _preload_stage_code(**_: Any) -> None:
    """Import torch, transformers and the w2s stage code in the parent, before the pool forks: a
    second or more saved on every stage. Importing torch does not initialise CUDA, and nothing here
    runs a torch op, so no CUDA or OpenMP state is created that a forked child could not use."""
    import transformers  # noqa: F401

    import w2s.memory
    import w2s.pipeline
    import w2s.stages  # noqa: F401


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


class ProgressWriter:
    """The training callback: buffers metric points and writes them, with the stage's progress,
    every ``flush_s`` seconds. It returns False once the job is cancelled or the attempt was
    superseded, which stops training. A failed write (database briefly down) keeps the points for
    the next flush."""

    def __init__(self, stage_id: str, flush_s: float, attempt: int | None = None):
        self.stage_id = stage_id
        self.flush_s = flush_s
        self.attempt = attempt  # None: unfenced (tests that drive the writer directly)
        self.points: list[tuple[int, str, float]] = []
        self.latest: Any = None
        self.last_flush = time.monotonic()
        self.cancelled = False

    def __call__(self, progress: Any) -> bool:
        self.latest = progress
        step = progress.step
        points = [
            (step, "loss", progress.loss),
            (step, "train_accuracy", progress.train_accuracy),
            (step, "lr", progress.lr),
        ]
        if progress.eval_accuracy is not None:
            points.append((step, "eval_accuracy", progress.eval_accuracy))
        # A curve holds numbers; a non-finite value has no point on it (training stops on a
        # non-finite loss anyway, see w2s.train).
        self.points += [(s, name, value) for s, name, value in points if math.isfinite(value)]
        if time.monotonic() - self.last_flush >= self.flush_s or step == progress.total_steps:
            self.flush()
        return not self.cancelled

    def flush(self) -> None:
        try:
            self._write()
        except DBAPIError as error:
            if not database_unreachable(error):
                raise
            logger.warning(
                "progress write failed, keeping %d points for the next try: %s",
                len(self.points),
                _first_line(error),
            )

    def final_flush(self, budget_s: float) -> None:
        """The last points of an attempt: retried, because nothing comes after them."""
        retry_database(self._write, f"stage {self.stage_id}: last progress write", budget_s)

    def _write(self) -> None:
        with session_scope() as session:
            stage = session.get(Stage, self.stage_id)
            if stage is None or not _is_current(stage, self.attempt):
                self.cancelled = True  # deleted, or requeued while this attempt looked dead
                self.points.clear()
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
                if math.isfinite(self.latest.loss):  # JSON columns take no NaN
                    stage.metrics = {**(stage.metrics or {}), "loss": self.latest.loss}
            stage.heartbeat_at = utcnow()
            self.cancelled = stage.job.cancel_requested
        self.points.clear()
        self.last_flush = time.monotonic()


def _is_current(stage: Stage, attempt: int | None) -> bool:
    """Whether ``attempt`` still owns the stage (it was not requeued, finished or cancelled since)."""
    return attempt is None or (stage.status == StageStatus.running and stage.attempts == attempt)


class Heartbeat(threading.Thread):
    """Marks the stage alive every ``interval_s`` while it runs, including phases with no training
    steps (loading the model, extracting probe features). It sees cancellation too, and notices when
    the dispatcher has given the stage to another worker."""

    def __init__(self, stage_id: str, attempt: int, interval_s: float, writer: ProgressWriter):
        super().__init__(name=f"heartbeat-{stage_id}", daemon=True)
        self.stage_id, self.attempt, self.interval_s, self.writer = stage_id, attempt, interval_s, writer
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                with session_scope() as session:
                    owned = session.execute(
                        update(Stage)
                        .where(
                            Stage.id == self.stage_id,
                            Stage.attempts == self.attempt,
                            Stage.status == StageStatus.running,
                        )
                        .values(heartbeat_at=utcnow())
                    ).rowcount
                    stage = session.get(Stage, self.stage_id)
                    if not owned or stage is None or stage.job.cancel_requested:
                        self.writer.cancelled = True  # the next training step stops the run
            except DBAPIError as error:
                logger.warning("heartbeat of stage %s not written: %s", self.stage_id, _first_line(error))

    def stop(self) -> None:
        self.stopped.set()


def _device_name() -> str | None:
    import torch

    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
        return f"{torch.cuda.get_device_name(0)} (CUDA_VISIBLE_DEVICES={visible})"
    return None


def claim_stage(stage_id: str, worker: str, settings: Settings) -> dict[str, Any] | None:
    """Mark the stage running as a new attempt and return what the run needs, or None if this
    delivery must not run (a duplicate, a finished or cancelled stage, or attempts used up)."""
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
        if stage.status not in (StageStatus.queued, StageStatus.running):
            return None  # pending again (a retry reset it): the dispatcher will send it when admitted
        if stage.status == StageStatus.running and stage.worker != worker and _alive(stage, settings):
            # Sent twice (a redelivery raced a live attempt): the live attempt keeps it.
            logger.info("stage %s is running on %s; duplicate delivery dropped", stage_id, stage.worker)
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
            # Its last attempt's worker died (this worker runs one task at a time, so if it was here
            # it is gone; elsewhere, its heartbeat stopped).
            log(
                session,
                job_id=job.id,
                stage_id=stage.id,
                message=f"{stage.kind}/{stage.seed}: redelivered; attempt {stage.attempts} on "
                f"{stage.worker} was lost",
                level="warning",
            )
        if stage.attempts:
            # The curves show the attempt that produces the result, not a lost one's partial run.
            session.execute(delete(MetricPoint).where(MetricPoint.stage_id == stage.id))
            stage.step = 0
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
        return {
            "spec": job.spec,
            "kind": stage.kind,
            "seed": stage.seed,
            "job_id": job.id,
            "attempt": stage.attempts,
        }


def _alive(stage: Stage, settings: Settings) -> bool:
    if stage.heartbeat_at is None:
        return False
    beat = stage.heartbeat_at if stage.heartbeat_at.tzinfo else stage.heartbeat_at.replace(tzinfo=dt.UTC)
    return (utcnow() - beat).total_seconds() < settings.heartbeat_timeout_s


def _finish(
    stage_id: str,
    status: StageStatus,
    *,
    attempt: int,
    error: str | None = None,
    record: dict[str, Any] | None = None,
    settings: Settings,
) -> None:
    retry_database(
        lambda: _write_outcome(stage_id, status, attempt, error, record, settings),
        f"stage {stage_id}: writing its outcome",
        settings.db_retry_s,
    )


def _write_outcome(
    stage_id: str,
    status: StageStatus,
    attempt: int,
    error: str | None,
    record: dict[str, Any] | None,
    settings: Settings,
) -> None:
    with session_scope() as session:
        stage = session.get(Stage, stage_id)
        if stage is None:
            return
        if not _is_current(stage, attempt):
            # Requeued while this attempt looked dead; the current attempt writes the outcome.
            logger.warning("stage %s: outcome of superseded attempt %d discarded", stage_id, attempt)
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
    claim = retry_database(
        lambda: claim_stage(stage_id, worker, settings), f"stage {stage_id}: claim", settings.db_retry_s
    )
    if claim is None:
        return "skipped"
    from w2s.spec import JobSpec
    from w2s.stages import StageCancelled, run_stage
    from w2s.store import ArtifactStore
    from w2s.train import StageError

    attempt = claim["attempt"]
    writer = ProgressWriter(stage_id, settings.progress_flush_s, attempt)
    heartbeat = Heartbeat(stage_id, attempt, settings.heartbeat_interval_s, writer)
    heartbeat.start()
    try:
        try:
            device = _device_name()
            if device:
                with session_scope() as session:
                    session.get(Stage, stage_id).gpu = device  # type: ignore[union-attr]
            spec = JobSpec.model_validate(claim["spec"])
            plan = stage_plans(spec, settings, seeds=[claim["seed"]])[claim["kind"], claim["seed"]]
            result = run_stage(plan, ArtifactStore(settings.store_uri), callback=writer)
        except StageCancelled:
            writer.final_flush(settings.db_retry_s)
            _finish(stage_id, StageStatus.cancelled, attempt=attempt, settings=settings)
            return StageStatus.cancelled
        except (ValueError, MemoryError, StageError) as error:
            # Bad input, diverged training or out of memory will fail again: stop now, with the
            # message shown.
            message = str(error) if isinstance(error, StageError) else f"{type(error).__name__}: {error}"
            _finish(stage_id, StageStatus.failed, attempt=attempt, error=message, settings=settings)
            return StageStatus.failed
        except Exception as error:
            if "OutOfMemoryError" in type(error).__name__:
                message = f"out of GPU memory: {error}"
                _finish(stage_id, StageStatus.failed, attempt=attempt, error=message, settings=settings)
                return StageStatus.failed
            raise
        writer.final_flush(settings.db_retry_s)
        status = StageStatus.cached if result.cached else StageStatus.succeeded
        _finish(stage_id, status, attempt=attempt, record=result.to_record(), settings=settings)
        return status
    finally:
        heartbeat.stop()


def user_message(error: BaseException) -> str:
    """What the user sees of an unexpected error: database errors carry SQL and parameters, which
    belong in the worker's log (where the traceback is), not on the job page."""
    if isinstance(error, DBAPIError):
        return f"database error ({type(error.orig).__name__}); details are in the worker log"
    return f"{type(error).__name__}: {error}"


def requeue_after_error(stage_id: str, worker: str, error: BaseException, countdown: float) -> None:
    """A transient failure: the stage goes back to queued (its slot kept) for Celery's retry."""
    with session_scope() as session:
        stage = session.get(Stage, stage_id)
        # Only this worker's own attempt (it runs one task at a time): never a newer attempt elsewhere.
        if stage is not None and stage.status == StageStatus.running and stage.worker == worker:
            stage.status = check_stage_transition(stage.status, StageStatus.queued)
            stage.error = user_message(error)
            # Due back after the backoff: the dispatcher must not resend it as lost before then.
            stage.sent_at = utcnow() + dt.timedelta(seconds=countdown)
            log(
                session,
                job_id=stage.job_id,
                stage_id=stage.id,
                message=f"will retry in {countdown:.0f} s: {stage.error}",
                level="warning",
            )


@app.task(name=STAGE_TASK, bind=True, max_retries=None)
def run_stage_task(self: Any, stage_id: str) -> str:
    worker = self.request.hostname or socket.gethostname()
    try:
        return execute_stage(stage_id, worker=worker)
    except Exception as error:
        logger.exception("stage %s failed", stage_id)
        # Attempts are bounded in claim_stage; back off 5 s, 10 s, 20 s ... (by default) up to 5 min.
        countdown = min(get_settings().retry_backoff_s * 2**self.request.retries, 300.0)
        # If the database is down too, the retry below finds the stage still running: fine.
        with contextlib.suppress(DBAPIError):
            requeue_after_error(stage_id, worker, error, countdown)
        raise self.retry(exc=error, countdown=countdown) from error

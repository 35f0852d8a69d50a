"""The stage task: load the stage row, run the w2s stage, persist the outcome.

Pass ids, never objects: the task re-reads its row and owns its status changes.

Processes. The worker's parent process imports torch and the stage code once (``worker_init``) and
forks one long-lived child that runs stage after stage (``W2S_WORKER_MAX_STAGES_PER_PROCESS`` of
them, or until it holds ``W2S_WORKER_MAX_MEMORY_MB``, then Celery forks a fresh one). A probe stage
runs in that child: its fixed cost is then a few database writes, not a process start, imports and
re-reading every feature (the child keeps stored arrays in memory, worker/stage_cache.py). A full
fine-tuning or LoRA stage, which loads a whole backbone, runs in a fresh process of its own
(worker/isolation.py), so its GPU memory is returned when it ends; its claim, heartbeats, progress
and outcome are written by the long-lived child all the same.

Faults. Each run is one *attempt* with a token (``stages.fence``) and every write it makes is fenced
by it: once the dispatcher has requeued a stage whose heartbeat went silent (its worker was killed, or
cut off), or the job was retried, a late write from the old attempt changes nothing and its training
stops at the next step. The stage runs its stored plan (the planner's, w2s.stages.plan_from_record),
never one derived again here.
A duplicate delivery of a stage that another live worker is running is dropped. Database writes
are retried for ``db_retry_s`` (Postgres restarting), so a finished stage's result is not thrown
away because the database blinked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import gc
import logging
import math
import os
import random
import socket
import threading
import time
import traceback
from typing import Any, NoReturn

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_init, worker_process_init, worker_process_shutdown
from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError

from service import lifecycle
from service.db import database_unreachable, insert_ignoring_duplicates, retry_database, session_scope, upsert
from service.jobs import attempt_policy_errors
from service.lifecycle import Claim
from service.limits import over_time_message
from service.logs import log_context
from service.models import Job, MetricPoint, MetricSeries, Stage, utcnow
from service.settings import Settings, get_settings
from service.states import StageStatus
from w2s.curves import CurveSampler, CurveSummary
from w2s.store import StoreUnavailable
from worker.celery_app import STAGE_TASK, app

logger = logging.getLogger(__name__)


@worker_init.connect
def _preload_stage_code(**_: Any) -> None:
    """Import torch, transformers and the w2s stage code in the parent, before the pool forks: a
    second or more saved on every stage. Importing torch does not initialise CUDA, and nothing here
    runs a torch op, so no CUDA or OpenMP state is created that a forked child could not use."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: F401  (lazy modules, loaded now)

    import w2s.memory
    import w2s.pipeline
    import w2s.splits
    import w2s.stages  # noqa: F401

    del transformers


# Whether this process runs full and LoRA stages in processes of their own: true in a Celery
# worker's pool process, which lives on from stage to stage (set below when Celery starts it).
ISOLATE_HEAVY_STAGES = False
# Whether this worker consumes stage queues: `w2s-service worker --queue control` clears it before
# Celery forks its pool, so control processes (planning, finishing) start no fork server they never use.
RUNS_STAGES = True


@worker_process_init.connect
def _long_lived(**_: Any) -> None:
    global ISOLATE_HEAVY_STAGES
    ISOLATE_HEAVY_STAGES = True
    if not RUNS_STAGES:
        return
    from worker.isolation import start_fork_server

    # In the background: the fork server's imports take seconds, and probe stages need none of it.
    threading.Thread(target=start_fork_server, name="start-fork-server", daemon=True).start()


@worker_process_shutdown.connect
def _stop_fork_server(**_: Any) -> None:
    from worker.isolation import stop_fork_server

    stop_fork_server()


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


class ProgressWriter:
    """The training callback: buffers metric points and writes them, with the stage's progress,
    every ``flush_s`` seconds. It returns False once the job is cancelled or the attempt was
    superseded, which stops training. A failed write (database briefly down) keeps the points for
    the next flush."""

    def __init__(
        self,
        stage_id: str,
        flush_s: float,
        fence: int | None = None,
        max_points: int = 2_000,
        store_uri: str = "",
    ):
        self.stage_id = stage_id
        self.flush_s = flush_s
        self.fence = fence  # the attempt's token; None: unfenced (tests that drive the writer directly)
        self.store_uri = store_uri  # where resume checkpoints are written (their artifacts rows say)
        self.max_points = max_points  # kept per curve: a million-step stage stores a few thousand rows
        self.samplers: dict[str, CurveSampler] = {}
        self.points: list[tuple[int, str, float]] = []
        self.latest: Any = None
        self.last_flush = time.monotonic()
        self.cancelled = False
        self.deadline: float | None = None  # time.monotonic() past which the attempt must stop
        self.over_time = False  # stopped by its time limit, not by a cancel
        # Asked to yield (preempted, or its worker drains): training writes a checkpoint and stops.
        self.yield_asked = False
        self.checkpoints: list[Any] = []  # w2s.resume.CheckpointSaved not yet written
        self.resumed: Any = None  # w2s.resume.Resumed not yet written
        self.carried: dict[str, CurveSummary] = {}  # each curve's figures up to the resumed step

    def answer(self) -> bool | str:
        """What the training loop hears after each step: stop, yield, or go on."""
        from w2s.resume import YIELD

        if self.cancelled:
            return False
        return YIELD if self.yield_asked else True

    def past_deadline(self) -> bool:
        """Whether the attempt ran past its time limit; if so, the run stops at its next step."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.over_time = self.cancelled = True
        return self.over_time

    def _keep(self, step: int, name: str, value: float, total_steps: int) -> None:
        sampler = self.samplers.get(name)
        if sampler is None:
            sampler = self.samplers[name] = CurveSampler(total_steps, self.max_points)
            if name in self.carried:  # resumed: the curve's figures up to the checkpoint go on
                sampler.summary = self.carried.pop(name)
        self.points += [(kept_step, name, kept) for kept_step, kept in sampler.add(step, value)]

    def finish_curves(self) -> None:
        """The attempt's curves end here: keep the points the samplers still hold (the last ones)."""
        for name, sampler in self.samplers.items():
            self.points += [(step, name, value) for step, value in sampler.finish()]

    def __call__(self, progress: Any) -> bool | str:
        if progress.phase in ("checkpoint", "resumed"):  # the stage's timeline: written at once
            if progress.phase == "checkpoint":
                self.checkpoints.append(progress)
            else:
                self.resumed = progress
            self.flush()
            return self.answer()
        self.latest = progress
        if self.past_deadline():
            return False
        if progress.phase == "features":  # probe features before training: progress, no curve points
            if time.monotonic() - self.last_flush >= self.flush_s or progress.done == progress.total:
                self.flush()
            return self.answer()
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
        for s, name, value in points:
            if math.isfinite(value):
                self._keep(s, name, float(value), progress.total_steps)
        if step == progress.total_steps:
            self.finish_curves()
        if time.monotonic() - self.last_flush >= self.flush_s or step == progress.total_steps:
            self.flush()
        return self.answer()

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
        self.finish_curves()
        retry_database(self._write, f"stage {self.stage_id}: last progress write", budget_s)

    def _write(self) -> None:
        with session_scope() as session:
            stage = session.get(Stage, self.stage_id)
            if stage is None or not _is_current(stage, self.fence):
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
            if self.samplers:  # exact figures of each whole curve, up to this step
                session.execute(
                    upsert(session, MetricSeries.__table__, ("stage_id", "name")),
                    [
                        {"stage_id": self.stage_id, "name": name} | dataclasses.asdict(sampler.summary)
                        for name, sampler in self.samplers.items()
                    ],
                )
            progress: dict[str, Any] = {"heartbeat_at": utcnow()}
            latest = self.latest
            if latest is not None and latest.phase == "features":
                progress |= {
                    "step": latest.done,
                    "total_steps": latest.total,
                    "metrics": {
                        **(stage.metrics or {}),
                        "phase": "features",
                        "split": latest.split,
                        "rows_per_s": round(latest.rows_per_s, 1),
                    },
                }
            elif latest is not None:
                progress |= {"step": latest.step, "total_steps": latest.total_steps}
                metrics = {k: v for k, v in (stage.metrics or {}).items() if k not in ("split", "rows_per_s")}
                metrics["phase"] = "train"
                if math.isfinite(latest.loss):  # JSON columns take no NaN
                    metrics["loss"] = latest.loss
                progress["metrics"] = metrics
            session.execute(update(Stage).where(Stage.id == self.stage_id).values(**progress))
            fence = stage.fence if self.fence is None else self.fence
            for saved in self.checkpoints:
                detail = f"{saved.size_bytes / 1e6:.1f} MB in {saved.seconds:.2f} s"
                lifecycle.record_checkpoint(
                    session,
                    self.stage_id,
                    fence,
                    saved.step,
                    detail,
                    size_bytes=saved.size_bytes,
                    store_uri=self.store_uri,
                )
            if self.resumed is not None:
                lifecycle.record_resumed(session, self.stage_id, fence, self.resumed.step)
                self.carried = _curves_until(session, self.stage_id, self.resumed.step)
            cancel, yield_asked = session.execute(select_stop_requests(self.stage_id)).one()
            self.cancelled = bool(cancel)
            self.yield_asked = self.yield_asked or yield_asked is not None
        self.points.clear()
        self.checkpoints.clear()
        self.resumed = None
        self.last_flush = time.monotonic()


def _curves_until(session: Any, stage_id: str, step: int) -> dict[str, CurveSummary]:
    """Each curve's figures over its stored points up to ``step`` (the earlier attempts' part of a
    resumed stage): exact where a curve keeps every point (stages of up to ``metric_points_per_series``
    steps), over the kept points beyond that."""
    from sqlalchemy import func

    mine = (MetricPoint.stage_id == stage_id, MetricPoint.step <= step)
    carried = {}
    for name, count, low, high, last_step in session.execute(
        select(
            MetricPoint.name,
            func.count(),
            func.min(MetricPoint.value),
            func.max(MetricPoint.value),
            func.max(MetricPoint.step),
        )
        .where(*mine)
        .group_by(MetricPoint.name)
    ).all():
        last_value = session.scalar(
            select(MetricPoint.value).where(*mine, MetricPoint.name == name, MetricPoint.step == last_step)
        )
        carried[name] = CurveSummary(int(count), float(low), float(high), int(last_step), float(last_value))
    return carried


def select_stop_requests(stage_id: str) -> Any:
    """(whether its job is to be cancelled, when the attempt was asked to yield or None)."""
    return (
        select(Job.cancel_requested, Stage.yield_requested_at)
        .join(Stage, Stage.job_id == Job.id)
        .where(Stage.id == stage_id)
    )


def _is_current(stage: Stage, fence: int | None) -> bool:
    """Whether the attempt of token ``fence`` still owns the stage (not requeued, retried, finished or
    cancelled since)."""
    return fence is None or (stage.status == StageStatus.running and stage.fence == fence)


class Heartbeat(threading.Thread):
    """Marks the stage alive every ``interval_s`` while it runs, including phases with no training
    steps (loading the model, extracting probe features). It sees cancellation too, and notices when
    the dispatcher has given the stage to another worker."""

    def __init__(self, stage_id: str, fence: int, interval_s: float, writer: ProgressWriter):
        super().__init__(name=f"heartbeat-{stage_id}", daemon=True)
        self.stage_id, self.fence, self.interval_s, self.writer = stage_id, fence, interval_s, writer
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            # Also where no training step calls back (loading a model, evaluating): an isolated
            # stage's process is told to stop, and an in-process one stops at its next step.
            self.writer.past_deadline()
            try:
                with session_scope() as session:
                    owned = session.execute(
                        update(Stage)
                        .where(
                            Stage.id == self.stage_id,
                            Stage.fence == self.fence,
                            Stage.status == StageStatus.running,
                        )
                        .values(heartbeat_at=utcnow())
                    ).rowcount
                    cancel, yield_asked = session.execute(select_stop_requests(self.stage_id)).first() or (
                        True,
                        None,
                    )
                    if not owned or cancel:
                        self.writer.cancelled = True  # the next training step stops the run
                    if yield_asked is not None:
                        self.writer.yield_asked = True  # the next step writes a checkpoint and yields
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


def _record_device(stage_id: str, device: str | None) -> None:
    if device:
        with session_scope() as session:
            session.execute(update(Stage).where(Stage.id == stage_id).values(gpu=device))


# Modes whose stages run in the long-lived process; the others (full, lora) load and train a whole
# backbone and run in a process of their own (worker/isolation.py).
IN_PROCESS_MODES = frozenset({"probe"})


def runs_in_process(plan: Any) -> bool:
    return plan.config.mode in IN_PROCESS_MODES


def _release_accelerator_memory() -> None:
    """Give the GPU memory a probe stage cached back to the device, so that the next stage, perhaps
    in a process of its own, finds it free (the CUDA context itself stays)."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    """A GPU (or host) allocation failed: torch's OutOfMemoryError, also when it crossed the pipe from
    a stage's own process, or Python's MemoryError."""
    import torch

    return (
        isinstance(error, (torch.OutOfMemoryError, MemoryError))
        or type(error).__name__ == "OutOfMemoryError"
        or "CUDA out of memory" in str(error)
    )


def claim_stage(stage_id: str, worker: str, settings: Settings) -> Claim | None:
    """Start a new attempt of the stage (service/lifecycle.py), or None if this delivery must not run."""
    with session_scope() as session:
        return lifecycle.claim_stage(
            session,
            stage_id,
            worker,
            max_attempts=settings.max_stage_attempts,
            heartbeat_timeout_s=settings.heartbeat_timeout_s,
            default_time_limit_s=settings.stage_time_limit_s,
        )


def persist_outcome(
    stage_id: str,
    status: StageStatus,
    *,
    fence: int,
    settings: Settings,
    error: str | None = None,
    record: dict[str, Any] | None = None,
    stored_bytes: dict[str, int] | None = None,
) -> None:
    """Write the attempt's outcome, retrying while the database is unreachable: a finished stage's
    result is not thrown away because the database blinked."""

    def write() -> None:
        with session_scope() as session:
            lifecycle.finish_stage(
                session,
                stage_id,
                status,
                fence=fence,
                store_uri=settings.store_uri,
                error=error,
                record=record,
                stored_bytes=stored_bytes,
            )

    retry_database(write, f"stage {stage_id}: writing its outcome", settings.db_retry_s)


def persist_yield(stage_id: str, *, fence: int, step: int, settings: Settings) -> None:
    """The attempt yielded after its checkpoint at ``step``: back to waiting, retried while the
    database is unreachable (the checkpoint is written; only the row says where to resume)."""

    def write() -> None:
        with session_scope() as session:
            lifecycle.yield_stage(session, stage_id, fence, step)

    retry_database(write, f"stage {stage_id}: writing that it yielded", settings.db_retry_s)


def stored_sizes(record: dict[str, Any], settings: Settings) -> dict[str, int]:
    """The bytes a computed stage's outputs take in the store, as its team is charged for them."""
    from w2s.stages import STAGES
    from worker.stage_cache import process_store

    store = process_store(settings.store_uri, settings.stage_cache_mb)
    sizes: dict[str, int] = {}
    try:
        sizes["result"] = store.record_size(STAGES, record["key"])
        for name in ("test_probs", "soft_labels"):
            if record.get(name):
                sizes[name] = store.blob_size(record[name])
        if record.get("checkpoint"):
            sizes["checkpoint"] = store.checkpoint_size(record["checkpoint"])
    except (OSError, StoreUnavailable) as error:  # the result is kept all the same; its charge is short
        logger.warning("sizes of stage %s's outputs not read: %s", record["key"][:16], _first_line(error))
    return sizes


def prune_checkpoints(stage_id: str, settings: Settings) -> None:
    """The stage's team now holds one more checkpoint: keep its last ``checkpoints_kept``, and remove
    from the store those no stage of any team holds (service/checkpoints.py). A failure only leaves
    the removal to a later sweep."""
    from service import checkpoints
    from worker.stage_cache import process_store

    try:
        with session_scope() as session:
            team_id = session.scalar(select(Stage.team_id).where(Stage.id == stage_id))
        store = process_store(settings.store_uri, settings.stage_cache_mb)
        if team_id:
            checkpoints.sweep(store, settings.checkpoints_kept, team_id=team_id)
    except (DBAPIError, OSError, StoreUnavailable) as error:
        logger.warning("old checkpoints not pruned after stage %s: %s", stage_id, _first_line(error))


def forget_reused_result(record: dict[str, Any], settings: Settings) -> None:
    """The stored result an attempt found names a checkpoint removed since: remove it from the store
    (if it still names that checkpoint), so that the next attempt computes the stage again."""
    from w2s.stages import STAGES
    from worker.stage_cache import process_store

    store = process_store(settings.store_uri, settings.stage_cache_mb)
    stored = store.get_record(STAGES, record["key"])
    if stored is not None and stored.get("checkpoint") == record.get("checkpoint"):
        store.delete_record(STAGES, record["key"])


def persist_out_of_memory(stage_id: str, *, fence: int, error: BaseException, settings: Settings) -> str:
    """Move a stage that ran out of memory to the next larger GPU class, or fail it naming every
    class it was tried on; return the state it is in now."""
    from sqlalchemy import select

    from service.scheduler import classes_tried, next_larger_queue

    def write() -> str:
        with session_scope() as session:
            row = session.execute(select(Stage.gpu_class, Stage.memory_gb).where(Stage.id == stage_id)).one()
            current = row.gpu_class or "cpu"
            larger = next_larger_queue(current, settings.queue_slots, settings.gpu_classes)
            estimate = f"estimated {row.memory_gb:g} GiB" if row.memory_gb is not None else "no estimate"
            if larger is not None:
                message = f"out of memory on {current} ({estimate})"
            else:
                tried = classes_tried(row.memory_gb, current, settings.queue_slots, settings.gpu_classes)
                sizes = ", ".join(
                    f"{name} ({settings.gpu_classes[name]:g} GiB)" if name in settings.gpu_classes else name
                    for name in tried
                )
                message = (
                    f"out of memory on every class tried: {sizes}; {estimate}. Lower minibatch_size "
                    "(gradient accumulation keeps the result the same), set gradient_checkpointing: true, "
                    f"lower max_length or use mode: lora ({_first_line(error)})"
                )
            lifecycle.out_of_memory(
                session,
                stage_id,
                fence=fence,
                error=message,
                larger_queue=larger,
                store_uri=settings.store_uri,
            )
            return StageStatus.pending if larger is not None else StageStatus.failed

    return retry_database(write, f"stage {stage_id}: writing its out-of-memory outcome", settings.db_retry_s)


def load_plan(claim: Claim, settings: Settings) -> Any:
    """The planner's stored plan of the claimed stage, exactly as planned (its rows come from the
    artifact store). A w2s.stages.PlanMismatch if this worker would compute another stage key."""
    from w2s.stages import StageError, plan_from_record
    from worker.stage_cache import process_store

    if claim.plan is None:
        raise StageError(f"{claim.kind} seed {claim.seed}: the stage has no stored plan; retry the job")
    with session_scope(read_only=True) as session:
        refused = attempt_policy_errors(session, claim.job_id, settings)
    if refused:  # an admin changed a rule since the job was submitted
        raise StageError("not run under today's rules: " + "; ".join(refused))
    return plan_from_record(claim.plan, process_store(settings.store_uri, settings.stage_cache_mb))


def run_plan(plan: Any, stage_id: str, writer: ProgressWriter, settings: Settings, *, isolate: bool) -> Any:
    """Run the planned stage: in this process (probe stages, or everything when not ``isolate``), or
    in a fresh process of its own (full and LoRA stages of the Celery worker)."""
    from w2s.resume import CheckpointPolicy
    from w2s.stages import run_stage
    from worker.stage_cache import process_store

    policy = CheckpointPolicy(settings.checkpoint_every_steps, settings.checkpoint_every_s)
    if isolate and not runs_in_process(plan):
        from worker.isolation import run_isolated

        return run_isolated(
            plan,
            settings.store_uri,
            writer,
            stopped=lambda: writer.cancelled,
            on_device=lambda name: _record_device(stage_id, name),
            checkpoint_policy=policy,
        )
    if not isolate or plan.device_kind == "cuda":  # without CUDA planned, the probe head never touches it
        _record_device(stage_id, _device_name())
    try:
        store = process_store(settings.store_uri, settings.stage_cache_mb)
        return run_stage(plan, store, callback=writer, checkpoint_policy=policy)
    except BaseException as error:
        # The traceback's frames hold the stage's model, activations and optimizer state: while the
        # error is handled up the stack they would keep GPU memory from the next stage of this
        # long-lived process (an out-of-memory error above all). Drop them before releasing.
        traceback.clear_frames(error.__traceback__)
        gc.collect()
        raise
    finally:
        _release_accelerator_memory()


class TransientStageError(Exception):
    """An attempt failed in a way another attempt may not (the stage was requeued with backoff)."""

    def __init__(self, error: BaseException, countdown_s: float):
        super().__init__(str(error))
        self.error, self.countdown_s = error, countdown_s


def execute_stage(
    stage_id: str,
    *,
    worker: str,
    settings: Settings | None = None,
    isolate: bool | None = None,
    retries: int = 0,
) -> str:
    """Load the stage, run it, persist its outcome; return the state it ended in.

    ``isolate``: run full and LoRA stages in a process of their own; by default, only in a Celery
    worker's long-lived process (see ``_long_lived``). Other callers (tests of the service's rules,
    one stage at a time) run every stage where they are. An error that is not the stage's fault
    requeues it with backoff (``retries``: how often this delivery was retried) and raises
    TransientStageError."""
    settings = settings or get_settings()
    isolate = ISOLATE_HEAVY_STAGES if isolate is None else isolate
    claim = retry_database(
        lambda: claim_stage(stage_id, worker, settings), f"stage {stage_id}: claim", settings.db_retry_s
    )
    if claim is None:
        return "skipped"
    started = time.monotonic()
    ended = "error"  # an exception no branch below handles
    try:
        with log_context(job_id=claim.job_id, stage_id=stage_id, worker=worker):
            ended = _attempt(
                claim, stage_id, worker=worker, settings=settings, isolate=isolate, retries=retries
            )
        return ended
    except TransientStageError:
        ended = "transient"
        raise
    finally:
        _observe_attempt(claim.queue, ended, time.monotonic() - started)


def _attempt(
    claim: Claim, stage_id: str, *, worker: str, settings: Settings, isolate: bool, retries: int
) -> str:
    """One claimed attempt: run, persist its outcome, return the state it ended in (see execute_stage)."""
    from w2s.resume import Yielded
    from w2s.stages import PlanMismatch, StageCancelled
    from w2s.train import StageError

    writer = ProgressWriter(
        stage_id,
        settings.progress_flush_s,
        claim.fence,
        settings.metric_points_per_series,
        settings.store_uri,
    )
    writer.deadline = time.monotonic() + claim.time_limit.seconds
    heartbeat = Heartbeat(stage_id, claim.fence, settings.heartbeat_interval_s, writer)
    # One line as an attempt starts and one as it ends, each with its fence: an operator (or
    # bench/race_storm.py) can tell from the logs of every worker which attempts overlapped.
    logger.info("stage %s attempt %d started on %s", stage_id, claim.fence, worker)
    started = time.monotonic()
    heartbeat.start()
    try:
        try:
            result = run_plan(load_plan(claim, settings), stage_id, writer, settings, isolate=isolate)
        except Yielded as yielded:
            # Preempted or drained: its checkpoint is written; it waits to resume, its slot free.
            writer.final_flush(settings.db_retry_s)
            persist_yield(stage_id, fence=claim.fence, step=yielded.step, settings=settings)
            return StageStatus.pending
        except (StageCancelled, SoftTimeLimitExceeded) as stopped:
            writer.final_flush(settings.db_retry_s)
            if writer.over_time or isinstance(stopped, SoftTimeLimitExceeded):
                # Over its time limit: this stage fails alone, saying which limit; the worker goes on.
                message = over_time_message(claim.time_limit)
                persist_outcome(
                    stage_id, StageStatus.failed, fence=claim.fence, error=message, settings=settings
                )
                return StageStatus.failed
            persist_outcome(stage_id, StageStatus.cancelled, fence=claim.fence, settings=settings)
            return StageStatus.cancelled
        except Exception as error:
            if is_out_of_memory(error):
                # The same class would fail the same way: a larger one, or a failure that says so.
                return persist_out_of_memory(stage_id, fence=claim.fence, error=error, settings=settings)
            if isinstance(error, PlanMismatch):
                # This worker computes another key for the plan (other versions): another worker may
                # not. The stage goes back without spending an attempt; the dispatcher routes by runtime.
                requeue(claim, error, f"not run on {worker}: {error}", settings, retries, spend_attempt=False)
            if isinstance(error, StoreUnavailable):
                # Weather, not the stage's fault: it waits for storage, its attempt given back.
                requeue(claim, error, f"waiting for storage: {error}", settings, retries, spend_attempt=False)
            if not isinstance(error, (ValueError, StageError)):
                # Transient until shown otherwise: this attempt ends, another one runs after a backoff.
                logger.exception("stage %s failed", stage_id)
                requeue(claim, error, user_message(error), settings, retries, spend_attempt=True)
            # Bad input or diverged training will fail again: stop now, with the message shown.
            message = str(error) if isinstance(error, StageError) else f"{type(error).__name__}: {error}"
            persist_outcome(stage_id, StageStatus.failed, fence=claim.fence, error=message, settings=settings)
            return StageStatus.failed
        writer.final_flush(settings.db_retry_s)
        outcome = StageStatus.cached if result.cached else StageStatus.succeeded
        record = result.to_record()
        sizes = None if result.cached else stored_sizes(record, settings)
        try:
            persist_outcome(
                stage_id, outcome, fence=claim.fence, record=record, stored_bytes=sizes, settings=settings
            )
        except lifecycle.ReusedResultGone as gone:
            # Another team's retention removed the checkpoint after this attempt read the result:
            # computed again by the next attempt, which gives its attempt back.
            forget_reused_result(record, settings)
            requeue(claim, gone, "computing it again: " + str(gone), settings, retries, spend_attempt=False)
        if record.get("checkpoint"):
            prune_checkpoints(stage_id, settings)
        return outcome
    finally:
        heartbeat.stop()
        elapsed = time.monotonic() - started
        logger.info("stage %s attempt %d ended after %.2f s", stage_id, claim.fence, elapsed)


def _observe_attempt(queue: str, outcome: str, seconds: float) -> None:
    """The attempt in the worker's metrics (service/telemetry.py): its outcome and duration by queue,
    and the GPU memory it peaked at when it ran in this process."""
    from service import telemetry

    telemetry.STAGE_ATTEMPTS.labels(queue, outcome).inc()
    telemetry.STAGE_SECONDS.labels(queue, outcome).observe(seconds)
    import torch

    if torch.cuda.is_initialized():
        telemetry.GPU_MEMORY_PEAK.set(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()


def requeue(
    claim: Claim, error: Exception, message: str, settings: Settings, retries: int, *, spend_attempt: bool
) -> NoReturn:
    """End the attempt as not the stage's fault: back to queued with ``message`` and a backoff (at
    most a minute when no attempt is spent: the cause is outside the stage), then TransientStageError
    for Celery's retry."""
    countdown = retry_countdown(settings.retry_backoff_s, retries, maximum_s=300.0 if spend_attempt else 60.0)
    with contextlib.suppress(DBAPIError), session_scope() as session:
        due = utcnow() + dt.timedelta(seconds=countdown)
        lifecycle.requeue_after_error(
            session, claim.stage_id, claim.fence, message, due, spend_attempt=spend_attempt
        )
    raise TransientStageError(error, countdown) from error


def user_message(error: BaseException) -> str:
    """What the user sees of an unexpected error: database errors carry SQL and parameters, which
    belong in the worker's log (where the traceback is), not on the job page."""
    if isinstance(error, DBAPIError):
        return f"database error ({type(error.orig).__name__}); details are in the worker log"
    return f"{type(error).__name__}: {error}"


def retry_countdown(factor_s: float, retries: int, maximum_s: float = 300.0) -> float:
    """Exponential backoff with full jitter: uniform in [0, factor·2^retries], at most ``maximum_s``.
    (Celery's own helper draws with ``randrange``, which rejects the fractional factors that fast
    test settings use.)"""
    return random.uniform(0.0, min(maximum_s, factor_s * 2**retries))


@app.task(name=STAGE_TASK, bind=True, max_retries=None)
def run_stage_task(self: Any, stage_id: str) -> str:
    worker = self.request.hostname or socket.gethostname()
    try:
        return execute_stage(stage_id, worker=worker, retries=self.request.retries)
    except TransientStageError as transient:
        # Attempts are bounded in claim_stage; the stage row already says when it is due back.
        raise self.retry(exc=transient.error, countdown=transient.countdown_s) from transient.error

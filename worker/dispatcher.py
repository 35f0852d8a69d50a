"""The dispatcher process: run a dispatch round, commit, send what it picked (stages to their
queues, planning and finishing to the control queue); repeat. It never imports torch: rounds
do no heavy work.

Only one dispatcher acts at a time: on Postgres each round holds a transaction-level advisory
lock, so a second replica waits its turn instead of double-admitting.

Between rounds it sleeps ``W2S_DISPATCH_INTERVAL_S`` at most: on Postgres it listens on
``lifecycle.DISPATCH_CHANNEL`` and starts the next round as soon as a stage's outcome or a job's
planning is committed (a slot is free, stages are ready). A worker finishing a tenth-of-a-second
probe stage then gets the next one in milliseconds, not half an interval later.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from celery import Celery
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from service import telemetry
from service.db import database_unreachable, session_scope, wake_file
from service.dispatch import RoundReport, dispatch_round, ready_per_queue
from service.lifecycle import DISPATCH_CHANNEL, unadmit_stage
from service.limits import STAGE_LIMIT_GRACE_S
from service.settings import Settings, get_settings
from worker.celery_app import EXPORT_TASK, FINISH_TASK, PLAN_TASK, STAGE_TASK

logger = logging.getLogger(__name__)

DISPATCH_LOCK_ID = 0x7732_5345  # "w2SE"


def run_round(settings: Settings, celery_app: Celery) -> RoundReport | None:
    with session_scope() as session:
        is_postgres = session.bind.dialect.name == "postgresql"  # type: ignore[union-attr]
        lock = text("SELECT pg_try_advisory_xact_lock(:id)")
        if is_postgres and not session.execute(lock, {"id": DISPATCH_LOCK_ID}).scalar():
            return None  # another dispatcher is in its round
        report = dispatch_round(session, settings)
    # Committed first, then sent: the task re-reads a row that exists.
    for stage_id, queue in [*report.admitted, *report.resent]:
        # The worker stops a stage at its time limit; Celery's soft limit reaches it where no
        # training step does, and its hard limit kills the process (the round then fails it).
        limit = report.time_limits.get(stage_id, settings.stage_time_limit_s)
        try:
            celery_app.send_task(
                STAGE_TASK,
                args=[stage_id],
                queue=queue,
                soft_time_limit=limit + STAGE_LIMIT_GRACE_S,
                time_limit=limit + 2 * STAGE_LIMIT_GRACE_S,
            )
        except Exception as error:  # broker down: hand the slot back, the next round tries again
            logger.warning("could not enqueue stage %s on %s: %s", stage_id, queue, error)
            with session_scope() as session:
                unadmit_stage(session, stage_id)
    for task, leased in ((PLAN_TASK, report.plan), (FINISH_TASK, report.finish)):
        for job_id, token in leased:
            try:
                celery_app.send_task(task, args=[job_id, token])
            except Exception as error:  # broker down: due again when its lease of seconds lapses
                logger.warning("could not send %s for job %s: %s", task, job_id, error)
    for export_id, token in report.exports:
        try:
            celery_app.send_task(EXPORT_TASK, args=[export_id, token])
        except Exception as error:  # broker down: due again when its lease lapses
            logger.warning("could not send export %s: %s", export_id, error)
    return report


def observe_round(report: RoundReport | None, seconds: float) -> None:
    """The round in the dispatcher's metrics (service/telemetry.py)."""
    telemetry.ROUNDS.labels("skipped" if report is None else "run").inc()
    if report is None:
        return
    telemetry.ROUND_SECONDS.observe(seconds)
    for queue, wait_s in report.waits:
        telemetry.ADMITTED.labels(queue).inc()
        telemetry.ADMISSION_WAIT.labels(queue).observe(wait_s)
    with session_scope(read_only=True) as session:
        depth = ready_per_queue(session)
    _queues_seen.update(depth)
    for queue in _queues_seen:  # a queue emptied since reads 0, not its last count
        telemetry.QUEUE_DEPTH.labels(queue).set(depth.get(queue, 0))


_queues_seen: set[str] = set()


# How often the dispatcher sweeps checkpoints (service/checkpoints.py): a team over its "last N"
# through cached completions, and files of checkpoints no stage holds left by an interrupted sweep.
CHECKPOINT_SWEEP_S = 60.0


class CheckpointSweeper:
    """Runs ``checkpoints.sweep`` every CHECKPOINT_SWEEP_S in a thread of its own: it talks to the
    artifact store, which may be slow or down, and the rounds never wait for it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.due = time.monotonic() + CHECKPOINT_SWEEP_S
        self.thread: threading.Thread | None = None

    def maybe_start(self) -> None:
        if time.monotonic() < self.due or (self.thread is not None and self.thread.is_alive()):
            return
        self.due = time.monotonic() + CHECKPOINT_SWEEP_S
        self.thread = threading.Thread(target=self._sweep, name="checkpoint-sweep", daemon=True)
        self.thread.start()

    def _sweep(self) -> None:
        from service import checkpoints
        from w2s.store import ArtifactStore

        try:
            checkpoints.sweep(ArtifactStore(self.settings.store_uri), self.settings.checkpoints_kept)
        except Exception as error:  # the store or the database is down: the next sweep does it
            logger.warning("checkpoint sweep failed: %s", str(error).splitlines()[0] if str(error) else error)


# How often the dispatcher looks at the wake file on SQLite: a stat, so a stage follows another
# within this much instead of the dispatch interval.
WAKE_FILE_POLL_S = 0.02


class Wakeup:
    """The dispatcher's sleep: until the interval is over or, on Postgres, until a notification on
    DISPATCH_CHANNEL arrives (then every pending one is taken: one round serves them all). If the
    listening connection fails (Postgres restarting), it sleeps the interval and connects again."""

    def __init__(self, settings: Settings, stop: threading.Event):
        from sqlalchemy.engine import make_url

        self.stop = stop
        url = make_url(settings.database_url)
        self.url = (
            url.set(drivername="postgresql").render_as_string(hide_password=False)
            if url.get_backend_name() == "postgresql"
            else None
        )
        self.connection: Any = None
        self.failing = False
        self.wake_file = wake_file(url)  # SQLite: commits touch it (service.db.wake_file)
        self.woken_at = self._stamp()

    def _stamp(self) -> int:
        try:
            return self.wake_file.stat().st_mtime_ns if self.wake_file is not None else 0
        except FileNotFoundError:
            return 0

    def _wait_for_wake_file(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``, looking at the wake file every few milliseconds (a stat)."""
        deadline = time.monotonic() + timeout_s
        while not self.stop.is_set():
            stamp = self._stamp()
            if stamp != self.woken_at:
                self.woken_at = stamp
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.stop.wait(min(WAKE_FILE_POLL_S, left))
        return False

    def _listening(self) -> Any:
        if self.connection is None or self.connection.closed:
            import psycopg

            self.connection = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
            self.connection.execute(f"LISTEN {DISPATCH_CHANNEL}")
        return self.connection

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``; True if a notification ended it."""
        if self.url is None:
            if self.wake_file is not None:
                return self._wait_for_wake_file(timeout_s)
            self.stop.wait(timeout_s)
            return False
        import psycopg

        try:
            connection = self._listening()
            woken = any(True for _ in connection.notifies(timeout=timeout_s, stop_after=1))
            if woken:
                for _ in connection.notifies(timeout=0):
                    pass
            self.failing = False
            return woken
        except psycopg.Error as error:
            if not self.failing:  # once per outage, not every interval
                logger.warning("dispatcher: not woken by commits, polling: %s", str(error).splitlines()[0])
                self.failing = True
            self.close()
            self.stop.wait(timeout_s)
            return False

    def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.close()
            self.connection = None


def run_dispatcher(
    settings: Settings | None = None, celery_app: Celery | None = None, stop: threading.Event | None = None
) -> None:
    settings = settings or get_settings()
    if celery_app is None:
        from worker.celery_app import make_celery

        celery_app = make_celery(settings)
    stop = stop or threading.Event()
    wakeup = Wakeup(settings, stop)
    sweeper = CheckpointSweeper(settings)
    logger.info("dispatcher: queues %s", settings.queue_slots)
    telemetry.serve(settings.metrics_port)
    while not stop.is_set():
        try:
            started = time.perf_counter()
            report = run_round(settings, celery_app)
            if settings.metrics_port:
                observe_round(report, time.perf_counter() - started)
            if report:
                logger.info(
                    "round: admitted %d, resent %d, cached %d, to plan %d, to finish %d, to export %d, "
                    "failed %d",
                    len(report.admitted),
                    len(report.resent),
                    report.cached,
                    len(report.plan),
                    len(report.finish),
                    len(report.exports),
                    report.failed,
                )
        except DBAPIError as error:
            if database_unreachable(error):
                logger.warning("database unavailable, retrying: %s", str(error).splitlines()[0])
            else:
                logger.exception("dispatch round failed")
        except Exception:
            logger.exception("dispatch round failed")
        sweeper.maybe_start()
        wakeup.wait(settings.dispatch_interval_s)
    wakeup.close()

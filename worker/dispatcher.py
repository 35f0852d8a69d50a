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
from typing import Any

from celery import Celery
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from service.db import database_unreachable, session_scope
from service.dispatch import RoundReport, dispatch_round
from service.lifecycle import DISPATCH_CHANNEL, unadmit_stage
from service.settings import Settings, get_settings
from worker.celery_app import FINISH_TASK, PLAN_TASK, STAGE_TASK

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
        try:
            celery_app.send_task(STAGE_TASK, args=[stage_id], queue=queue)
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
    return report


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

    def _listening(self) -> Any:
        if self.connection is None or self.connection.closed:
            import psycopg

            self.connection = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
            self.connection.execute(f"LISTEN {DISPATCH_CHANNEL}")
        return self.connection

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``; True if a notification ended it."""
        if self.url is None:
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
    logger.info("dispatcher: queues %s", settings.queue_slots)
    while not stop.is_set():
        try:
            report = run_round(settings, celery_app)
            if report:
                logger.info(
                    "round: admitted %d, resent %d, cached %d, to plan %d, to finish %d, failed %d",
                    len(report.admitted),
                    len(report.resent),
                    report.cached,
                    len(report.plan),
                    len(report.finish),
                    report.failed,
                )
        except DBAPIError as error:
            if database_unreachable(error):
                logger.warning("database unavailable, retrying: %s", str(error).splitlines()[0])
            else:
                logger.exception("dispatch round failed")
        except Exception:
            logger.exception("dispatch round failed")
        wakeup.wait(settings.dispatch_interval_s)
    wakeup.close()

"""The dispatcher process: run a dispatch round, commit, enqueue what it admitted; repeat.

Only one dispatcher acts at a time: on Postgres each round holds a transaction-level advisory
lock, so a second replica waits its turn instead of double-admitting.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from service.db import database_unreachable, session_scope
from service.dispatch import RoundReport, dispatch_round
from service.models import Stage
from service.settings import Settings, get_settings
from service.states import StageStatus
from w2s.store import ArtifactStore

logger = logging.getLogger(__name__)

DISPATCH_LOCK_ID = 0x7732_5345  # "w2SE"


def run_round(settings: Settings, celery_app: Celery, store: ArtifactStore) -> RoundReport | None:
    with session_scope() as session:
        is_postgres = session.bind.dialect.name == "postgresql"  # type: ignore[union-attr]
        lock = text("SELECT pg_try_advisory_xact_lock(:id)")
        if is_postgres and not session.execute(lock, {"id": DISPATCH_LOCK_ID}).scalar():
            return None  # another dispatcher is in its round
        report = dispatch_round(session, settings, store)
    # Committed first, then enqueued: the task re-reads a row that exists.
    for stage_id, queue in [*(report.admitted or []), *report.resent]:
        try:
            celery_app.send_task("w2s.run_stage", args=[stage_id], queue=queue)
        except Exception as error:  # broker down: hand the slot back, the next round tries again
            logger.warning("could not enqueue stage %s on %s: %s", stage_id, queue, error)
            with session_scope() as session:
                stage = session.get(Stage, stage_id)
                if stage is not None and stage.status == StageStatus.queued:
                    stage.status = StageStatus.pending
    return report


def run_dispatcher(
    settings: Settings | None = None, celery_app: Celery | None = None, stop: threading.Event | None = None
) -> None:
    settings = settings or get_settings()
    if celery_app is None:
        from worker.celery_app import make_celery

        celery_app = make_celery(settings)
    store = ArtifactStore(settings.store_uri)
    stop = stop or threading.Event()
    # Planning needs torch and transformers (stage keys, memory estimates): import them now, not
    # on the first job, which would otherwise wait seconds for its first stage.
    import w2s.memory
    import w2s.pipeline  # noqa: F401

    logger.info("dispatcher: queues %s", settings.queue_slots)
    while not stop.is_set():
        try:
            report = run_round(settings, celery_app, store)
            if report and (
                report.admitted or report.finished or report.cached or report.planned or report.resent
            ):
                logger.info(
                    "round: planned %d, cached %d, admitted %d, resent %d, finished %d",
                    report.planned,
                    report.cached,
                    len(report.admitted or []),
                    len(report.resent),
                    report.finished,
                )
        except DBAPIError as error:
            if database_unreachable(error):
                logger.warning("database unavailable, retrying: %s", str(error).splitlines()[0])
            else:
                logger.exception("dispatch round failed")
        except Exception:
            logger.exception("dispatch round failed")
        stop.wait(settings.dispatch_interval_s)

"""Control tasks: plan a job, finish a job. One job per task, on the ``control`` queue, each under a
time limit, so slow or failing work on one job never holds up the dispatch round or another job.

Any failure of any type fails that one job with a message saying what went wrong; a database
outage instead leaves the job as it was, and the dispatcher sends the task again later; an artifact
store that stays down past its retries (W2S_STORE_RETRY_S) makes the job wait for storage, its
attempt given back, and the task is sent again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from service.db import database_unreachable, session_scope
from service.lifecycle import defer_control, fail_control, hold_control, lease_control
from service.logs import log_context
from service.planning import finish_job, plan_job
from service.settings import get_settings
from w2s.store import StoreUnavailable
from worker.celery_app import FINISH_TASK, PLAN_TASK, app

logger = logging.getLogger(__name__)

# A job whose planning or finishing found the artifact store down is sent again after this long.
STORE_WAIT_S = 30.0
# Errors whose message is written for the user (bad data, a model that cannot be loaded ...).
EXPECTED = (ValueError, OSError, RuntimeError, LookupError)


def describe(error: BaseException) -> str:
    """The job's error line: the message of an expected error; type and message of anything else."""
    if isinstance(error, DBAPIError):
        return f"database error ({type(error.orig).__name__}); details are in the control worker's log"
    text = str(error).strip() or type(error).__name__
    return (
        text
        if isinstance(error, EXPECTED)
        else f"{type(error).__name__}: {text} (see the control worker's log)"
    )


class LeaseKeeper(threading.Thread):
    """Renews a running control task's lease every third of it, so a live task is never sent again
    and a dead one's lease lapses within seconds. ``lost`` is set once the token is no longer
    current (the job was retried, ended, or the task sent again): the task's writes are fenced anyway."""

    def __init__(self, job_id: str, task: str, token: int, lease_s: float):
        super().__init__(name=f"lease-{task}-{job_id}", daemon=True)
        self.job_id, self.task, self.token, self.lease_s = job_id, task, token, lease_s
        self.stopped = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.lease_s / 3):
            try:
                with session_scope() as session:
                    if not hold_control(session, self.job_id, self.task, self.token, self.lease_s):
                        self.lost.set()
                        return
            except DBAPIError as error:  # the lease may lapse: then the task is sent again
                logger.warning("lease of %s job %s not renewed: %s", self.task, self.job_id, error)

    def stop(self) -> None:
        self.stopped.set()


def run_control(
    task: str,
    job_id: str,
    token: int | None,
    work: Callable[[Session, str, Any, Any, int], bool],
    limit_s: float,
) -> str:
    """Run ``work`` for one job under the lease ``token`` (None: take one now, as when called by
    hand); on any failure, fail that job alone. A token that is no longer current does nothing."""
    from w2s.store import ArtifactStore

    settings = get_settings()
    what = {"plan": "plan", "finish": "finish"}[task]
    try:
        with session_scope() as session:
            if token is None:
                token = lease_control(session, job_id, task, settings.control_lease_s)
            if token is None or not hold_control(
                session, job_id, task, token, settings.control_lease_s, starting=True
            ):
                return "stale"  # sent again, retried or ended meanwhile
    except DBAPIError as failure:
        if database_unreachable(failure):
            return "deferred"  # the lease lapses and the task is sent again
        raise
    keeper = LeaseKeeper(job_id, task, token, settings.control_lease_s)
    keeper.start()
    try:
        with log_context(job_id=job_id), session_scope() as session:
            done = work(session, job_id, settings, ArtifactStore(settings.store_uri), token)
        return "done" if done else "skipped"
    except StoreUnavailable as outage:
        logger.warning("%s job %s: artifact store unreachable; waiting for storage: %s", what, job_id, outage)
        with session_scope() as session:
            defer_control(session, job_id, task, token, str(outage), STORE_WAIT_S)
        return "deferred"
    except SoftTimeLimitExceeded:
        error = f"cannot {what} the job: it took longer than {limit_s:.0f} s (W2S_CONTROL_TIMEOUT_S)"
    except DBAPIError as failure:
        if database_unreachable(failure):
            logger.warning("%s job %s: database unreachable; the dispatcher will send it again", what, job_id)
            return "deferred"
        logger.exception("%s job %s failed", what, job_id)
        error = f"cannot {what} the job: {describe(failure)}"
    except Exception as failure:  # any type: a bug in one job must not stop anything else
        logger.exception("%s job %s failed", what, job_id)
        error = f"cannot {what} the job: {describe(failure)}"
    finally:
        keeper.stop()
    with session_scope() as session:
        fail_control(session, job_id, task, token, error)
    return "failed"


@app.task(name=PLAN_TASK)
def plan_job_task(job_id: str, token: int | None = None) -> str:
    return run_control("plan", job_id, token, plan_job, get_settings().control_timeout_s)


@app.task(name=FINISH_TASK)
def finish_job_task(job_id: str, token: int | None = None) -> str:
    return run_control("finish", job_id, token, finish_job, get_settings().control_timeout_s)

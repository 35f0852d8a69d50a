"""Control tasks: plan a job, finish a job. One job per task, on the ``control`` queue, each under a
time limit, so slow or failing work on one job never holds up the dispatch round or another job.

Any failure of any type fails that one job with a message saying what went wrong; a database
outage instead leaves the job as it was, and the dispatcher sends the task again later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from service.db import database_unreachable, session_scope
from service.lifecycle import fail_job
from service.planning import finish_job, plan_job
from service.settings import get_settings
from worker.celery_app import FINISH_TASK, PLAN_TASK, app

logger = logging.getLogger(__name__)

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


def run_control(
    what: str, job_id: str, work: Callable[[Session, str, Any, Any], bool], limit_s: float
) -> str:
    """Run ``work`` for one job; on any failure, fail that job alone."""
    from w2s.store import ArtifactStore

    settings = get_settings()
    try:
        with session_scope() as session:
            done = work(session, job_id, settings, ArtifactStore(settings.store_uri))
        return "done" if done else "skipped"
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
    with session_scope() as session:
        fail_job(session, job_id, error)
    return "failed"


@app.task(name=PLAN_TASK)
def plan_job_task(job_id: str) -> str:
    return run_control("plan", job_id, plan_job, get_settings().control_timeout_s)


@app.task(name=FINISH_TASK)
def finish_job_task(job_id: str) -> str:
    return run_control("finish", job_id, finish_job, get_settings().control_timeout_s)

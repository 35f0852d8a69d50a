"""The worker registry: each worker process reports the queues it consumes and its runtime (the
library versions and w2s code that stage keys hash, w2s.stages.runtime_fingerprint) every
``REPORT_EVERY_S``. The dispatcher sends a stage to a queue only when a live worker there has the
runtime of the stage's planner, and otherwise says why the stage waits; a queue with no registered
worker at all is sent to as before (nothing is known to be incompatible)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service import lifecycle
from service.db import upsert
from service.errors import NotFound
from service.models import Stage, Worker, utcnow
from service.states import StageStatus, YieldReason

REPORT_EVERY_S = 30.0
# A drained worker hands its stages back itself (it polls every few seconds); past this, the dispatcher
# asks them itself (a worker that is stuck, or gone without a word).
DRAIN_BACKSTOP_S = 15.0
LIVE_FOR_S = 3 * REPORT_EVERY_S  # a worker not heard of for this long is gone


def register_worker(
    session: Session, *, name: str, queues: list[str], runtime: str, versions: dict[str, Any]
) -> None:
    now = utcnow()
    session.execute(
        upsert(session, Worker.__table__, ("name",)),
        [
            {
                "name": name,
                "queues": queues,
                "runtime": runtime,
                "versions": versions,
                "started_at": now,
                "seen_at": now,
                "draining_since": None,  # a process starting under this name takes work again
            }
        ],
    )


def seen(session: Session, name: str) -> None:
    session.execute(Worker.__table__.update().where(Worker.name == name).values(seen_at=utcnow()))


def live_runtimes(session: Session, queues: Iterable[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per queue: the runtimes of its live workers, each with one worker's versions (for messages)."""
    wanted = set(queues)
    since = utcnow() - dt.timedelta(seconds=LIVE_FOR_S)
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for worker_queues, runtime, versions in session.execute(
        select(Worker.queues, Worker.runtime, Worker.versions).where(Worker.seen_at >= since)
    ):
        for queue in set(worker_queues) & wanted:
            found.setdefault(queue, {})[runtime] = versions
    return found


def _versions_text(versions: dict[str, Any]) -> str:
    return ", ".join(f"{name} {value}" for name, value in sorted(versions.items()) if name != "key_format")


def why_no_worker(queue: str, planner: dict[str, Any] | None, workers: dict[str, dict[str, Any]]) -> str:
    """The waiting stage's message: its queue's workers compute other stage keys than its planner."""
    theirs = "; ".join(_versions_text(versions) for versions in workers.values())
    mine = _versions_text(planner) if planner else "unknown"
    return (
        f"waiting: no live worker on queue {queue!r} runs what this job was planned with ({mine}); its "
        f"workers run {theirs}. Run the same w2s-service, torch, transformers and peft everywhere, or "
        "retry the job to plan it again with the workers' versions"
    )


def drain_message(worker: str) -> str:
    return f"its worker {worker} is draining: asked to write a checkpoint and hand the stage back"


def drain_worker(session: Session, name: str, *, ask_stages: bool = True) -> list[str]:
    """Drain a worker: it takes no new stage and exits once its running stages have written a
    checkpoint and handed themselves back; they resume elsewhere. Returns the stages asked to yield;
    NotFound naming the live workers.

    ``ask_stages``: ask its running stages now. The worker itself does (worker/registration.py): it
    sees the drain within seconds and stops taking work *before* its stages yield, so it cannot claim
    one of them again as it is sent back; an operator's drain only marks the worker, and the
    dispatcher asks its stages itself if the worker has not within ``DRAIN_BACKSTOP_S``."""
    drained = session.execute(
        update(Worker)
        .where(Worker.name == name)
        .values(draining_since=func.coalesce(Worker.draining_since, utcnow()))
        .returning(Worker.name)
    ).first()
    if drained is None:
        since = utcnow() - dt.timedelta(seconds=LIVE_FOR_S)
        live = session.scalars(select(Worker.name).where(Worker.seen_at >= since).order_by(Worker.name)).all()
        raise NotFound(
            f"no worker named {name!r}; live workers: {', '.join(live) or 'none'} "
            "(`w2s-service workers` lists them)"
        )
    if not ask_stages:
        return []
    asked = []
    for stage_id, fence in session.execute(
        select(Stage.id, Stage.fence).where(Stage.worker == name, Stage.status == StageStatus.running)
    ).all():
        if lifecycle.ask_to_yield(session, stage_id, fence, YieldReason.drain, drain_message(name)):
            asked.append(stage_id)
    return asked


def is_draining(session: Session, name: str) -> bool:
    return session.scalar(select(Worker.draining_since).where(Worker.name == name)) is not None


def list_workers(session: Session) -> list[dict[str, Any]]:
    """Every worker heard of within a day: name, queues, alive, draining, stages running on it."""
    since = utcnow() - dt.timedelta(days=1)
    running = dict(
        session.execute(
            select(Stage.worker, func.count())
            .where(Stage.status == StageStatus.running)
            .group_by(Stage.worker)
        ).all()
    )
    alive_since = utcnow() - dt.timedelta(seconds=LIVE_FOR_S)
    rows = session.execute(
        select(Worker.name, Worker.queues, Worker.seen_at, Worker.draining_since)
        .where(Worker.seen_at >= since)
        .order_by(Worker.name)
    ).all()
    return [
        {
            "name": name,
            "queues": queues,
            "alive": _aware(seen_at) >= alive_since,
            "draining_since": draining_since,
            "running": running.get(name, 0),
        }
        for name, queues, seen_at, draining_since in rows
    ]


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)

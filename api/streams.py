"""Live metric streams (``GET /v1/jobs/{id}/metrics`` with ``Accept: text/event-stream``) that cost
nothing per viewer.

One hub per API process. A stream subscribes to its job's feed and waits on a queue of its own; no
request holds a database connection while it waits. One task, the hub's ticker, reads every
``interval_s`` in one short read-only transaction what all open streams need: for each watched
job, its new points and stage states, and which of the viewers' keys are still valid (not revoked,
their team not disabled). It then fans the events out to every subscriber. Five hundred viewers of
one job cost one read per tick, and every stream of the process together holds at most one
connection, for the length of that read. A revoked key or a disabled team ends its streams at the
next tick.

Each team may hold ``max_streams_per_team`` streams open at once, counted across API processes in
Redis when the service has it (a sorted set of stream tokens with expiry times, refreshed while a
stream lives, so a crashed process's slots lapse by themselves), otherwise in this process. Over
the cap a stream is refused with 429 and ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload
from starlette.concurrency import run_in_threadpool

from service.db import run_transaction
from service.errors import LimitExceeded
from service.metrics import JobState, as_series, job_points, job_state
from service.models import ApiKey, Job, Team

logger = logging.getLogger(__name__)

SLOT_TTL_S = 30.0  # a stream's slot lapses this long after its last refresh (its process died)
HEARTBEAT_S = 10.0  # a comment line this often keeps proxies from closing a quiet stream
QUEUE_SIZE = 256  # events a slow reader may fall behind by before its stream is closed


def event(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


@dataclass(eq=False)
class Subscriber:
    job_id: str
    team_id: str
    key_hash: str
    queue: asyncio.Queue[str | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    fresh: bool = True  # has not had the full series yet
    closed: str | None = None  # why the hub ended it

    def send(self, text: str | None) -> None:
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            self.closed = "the stream fell too far behind; reconnect to get the curves again"


@dataclass(eq=False)
class Feed:
    job_id: str
    subscribers: set[Subscriber] = field(default_factory=set)
    after_id: int = 0  # the highest point id every settled subscriber has had
    last_state: str = ""


@dataclass(frozen=True)
class Snapshot:
    jobs: dict[str, tuple[JobState, list[Any]]]  # job id -> its state and its points
    valid_keys: set[tuple[str, str]]  # (key hash, team id) of keys that still work


def read_snapshot(session: Session, watched: dict[str, int], key_hashes: set[str]) -> Snapshot:
    """One read for every open stream of the process: each job's state and points after ``watched[job]``."""
    jobs: dict[str, tuple[JobState, list[Any]]] = {}
    rows = session.scalars(select(Job).where(Job.id.in_(list(watched))).options(selectinload(Job.stages)))
    for job in rows:
        jobs[job.id] = (job_state(job), job_points(session, job, watched[job.id]))
    valid = set(
        session.execute(
            select(ApiKey.key_hash, ApiKey.team_id)
            .join(Team, Team.id == ApiKey.team_id)
            .where(
                ApiKey.key_hash.in_(list(key_hashes)), ApiKey.revoked_at.is_(None), Team.disabled_at.is_(None)
            )
        ).all()
    )
    return Snapshot(jobs, {(key_hash, team_id) for key_hash, team_id in valid})


class StreamSlots:
    """Open streams per team, within a cap: in Redis (shared by every API process) or in this process."""

    ACQUIRE = """
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
    if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
    redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
    redis.call('EXPIRE', KEYS[1], ARGV[5])
    return 1
    """

    def __init__(self, redis_url: str | None, prefix: str) -> None:
        self._redis: Any = None
        if redis_url and redis_url.startswith(("redis://", "rediss://")):
            import redis.asyncio

            # A few connections that requests wait for: 500 streams opened at once each opened its own
            # connection, some timed out, and those were counted only in this process (over the cap).
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                redis_url, max_connections=8, timeout=5, socket_timeout=2, socket_connect_timeout=2
            )
            self._redis = redis.asyncio.Redis(connection_pool=pool)
        self._prefix = prefix
        # Every slot this process holds, whichever way it was counted: with Redis unreachable, this
        # process alone still keeps the cap.
        self._local: dict[str, set[str]] = {}

    def _name(self, team_id: str) -> str:
        return f"{self._prefix}w2s:streams:{team_id}"

    async def acquire(self, team_id: str, limit: int) -> str | None:
        """A slot's token, or None when the team already has ``limit`` streams open."""
        token = uuid.uuid4().hex
        if self._redis is not None:
            now = time.time()
            try:
                taken = await self._redis.eval(
                    self.ACQUIRE,
                    1,
                    self._name(team_id),
                    now,
                    limit,
                    now + SLOT_TTL_S,
                    token,
                    int(SLOT_TTL_S * 2),
                )
                if not taken:
                    return None
                self._local.setdefault(team_id, set()).add(token)
                return token
            except Exception as error:  # Redis down: count in this process rather than refuse everyone
                logger.warning("stream slots: Redis unreachable (%s); counting in this process", error)
        open_here = self._local.setdefault(team_id, set())
        if len(open_here) >= limit:
            return None
        open_here.add(token)
        return token

    async def refresh(self, team_id: str, token: str) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.zadd(self._name(team_id), {token: time.time() + SLOT_TTL_S})

    async def release(self, team_id: str, token: str) -> None:
        self._local.get(team_id, set()).discard(token)
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.zrem(self._name(team_id), token)


class StreamHub:
    """The feeds of one API process and the ticker that serves them."""

    def __init__(self, redis_url: str | None, prefix: str, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.feeds: dict[str, Feed] = {}
        self.slots = StreamSlots(redis_url, prefix)
        self._ticker: asyncio.Task[None] | None = None
        self.reads = 0  # snapshots read, for the tests and the metrics endpoint

    @property
    def open_streams(self) -> int:
        return sum(len(feed.subscribers) for feed in self.feeds.values())

    def subscribe(self, job_id: str, team_id: str, key_hash: str) -> Subscriber:
        subscriber = Subscriber(job_id, team_id, key_hash)
        self.feeds.setdefault(job_id, Feed(job_id)).subscribers.add(subscriber)
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._run(), name="stream-hub")
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        feed = self.feeds.get(subscriber.job_id)
        if feed is None:
            return
        feed.subscribers.discard(subscriber)
        if not feed.subscribers:
            del self.feeds[subscriber.job_id]

    async def _run(self) -> None:
        while self.feeds:
            started = time.monotonic()
            try:
                await self.tick()
            except Exception:  # a database outage: streams wait and the next tick tries again
                logger.warning("stream hub: tick failed", exc_info=True)
            await asyncio.sleep(max(0.05, self.interval_s - (time.monotonic() - started)))

    async def tick(self) -> None:
        feeds = list(self.feeds.values())
        watched = {
            feed.job_id: 0 if any(s.fresh for s in feed.subscribers) else feed.after_id for feed in feeds
        }
        keys = {s.key_hash for feed in feeds for s in feed.subscribers}
        snapshot = await run_in_threadpool(run_transaction, read_snapshot, watched, keys, read_only=True)
        self.reads += 1
        for feed in feeds:
            self._publish(feed, snapshot)

    def _publish(self, feed: Feed, snapshot: Snapshot) -> None:
        found = snapshot.jobs.get(feed.job_id)
        for subscriber in list(feed.subscribers):
            if (subscriber.key_hash, subscriber.team_id) not in snapshot.valid_keys:
                subscriber.closed = "the API key was revoked or its team disabled"
            elif found is None:
                subscriber.closed = "the job no longer exists"
            if subscriber.closed:
                subscriber.send(None)
                self.unsubscribe(subscriber)
        if found is None or not feed.subscribers:
            return
        state, points = found
        newest = max((point.id for point in points), default=feed.after_id)
        update = as_series([point for point in points if point.id > feed.after_id])
        everything = as_series(points) if any(s.fresh for s in feed.subscribers) else []
        state_text = event("status", {"status": state.status, "stages": state.stages})
        changed = state_text != feed.last_state
        for subscriber in feed.subscribers:
            series = everything if subscriber.fresh else update
            if series:
                subscriber.send(event("metrics", series))
            if changed or subscriber.fresh:
                subscriber.send(state_text)
            if state.finished:
                subscriber.send(event("end", {}))
                subscriber.send(None)
            subscriber.fresh = False
        feed.after_id = max(feed.after_id, newest)
        feed.last_state = state_text
        if state.finished:
            for subscriber in list(feed.subscribers):
                self.unsubscribe(subscriber)

    async def stream(self, job_id: str, team_id: str, key_hash: str, limit: int) -> AsyncIterator[str]:
        """Open a stream (LimitExceeded, a 429, over the team's cap): the events of one viewer."""
        token = await self.slots.acquire(team_id, limit)
        if token is None:
            raise LimitExceeded(
                f"your team has {limit} metric streams open (max_streams_per_team); close one, or poll "
                "GET /v1/jobs/{id}/metrics without Accept: text/event-stream",
                limit="max_streams_per_team",
                value=limit,
                retry_after_s=10,
            )
        subscriber = self.subscribe(job_id, team_id, key_hash)
        return self._events(subscriber, token)

    async def _events(self, subscriber: Subscriber, token: str) -> AsyncIterator[str]:
        last_refresh = time.monotonic()
        try:
            while True:
                try:
                    text = await asyncio.wait_for(subscriber.queue.get(), HEARTBEAT_S)
                except TimeoutError:
                    text = ": keep-alive\n\n"
                if text is None or subscriber.closed:
                    if subscriber.closed:
                        yield event("error", {"detail": subscriber.closed})
                    return
                yield text
                if time.monotonic() - last_refresh > SLOT_TTL_S / 3:
                    await self.slots.refresh(subscriber.team_id, token)
                    last_refresh = time.monotonic()
        finally:
            self.unsubscribe(subscriber)
            # Starlette cancels the stream when its client goes away, and a cancelled scope cancels
            # every await in it again: shielded, the slot is given back now rather than lapsing.
            with anyio.CancelScope(shield=True):
                await self.slots.release(subscriber.team_id, token)

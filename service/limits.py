"""Per-team limits: stages per job and per sweep, stages waiting or running, upload storage and
requests per key per minute. Each has a setting (``W2S_MAX_...``) and an admin's per-team override.
And the throttle of failed authentications, per client address and per key prefix."""

from __future__ import annotations

import hashlib
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.errors import LimitExceeded
from service.models import Dataset, Stage, Team
from service.settings import Settings
from service.states import STAGE_BACKLOG

WAITING = sorted(str(status) for status in STAGE_BACKLOG)


def limit_of(team: Team, settings: Settings, name: str) -> int:
    """The team's own value of limit ``name`` if an admin set one, else the setting."""
    own = getattr(team, name)
    return int(own) if own is not None else int(getattr(settings, name))


# Past its time limit a stage is asked to stop at its next step; Celery's soft limit fires this much
# later (it reaches code between steps), its hard limit (killing the process) twice as late, and the
# dispatcher fails a stage still marked running three graces after its deadline (a lost worker).
STAGE_LIMIT_GRACE_S = 30


@dataclass(frozen=True)
class StageTimeLimit:
    seconds: int
    source: str  # where it comes from, as the error message names it


def stage_time_limit(job_limit_s: int | None, team_limit_s: int | None, default_s: int) -> StageTimeLimit:
    """The longest one attempt of a job's stages may run: what the job asked for, at most its team's
    limit (an admin's value ``team_limit_s``, else W2S_STAGE_TIME_LIMIT_S, ``default_s``)."""
    team_limit = team_limit_s if team_limit_s is not None else default_s
    team_source = "your team's stage time limit" if team_limit_s is not None else "W2S_STAGE_TIME_LIMIT_S"
    if job_limit_s is not None and job_limit_s <= team_limit:
        return StageTimeLimit(job_limit_s, "the job's stage_time_limit_s")
    return StageTimeLimit(team_limit, team_source)


def check_stage_time_limit(team: Team, settings: Settings, job_limit_s: int | None) -> None:
    team_limit = limit_of(team, settings, "stage_time_limit_s")
    if job_limit_s is not None and job_limit_s > team_limit:
        raise LimitExceeded(
            f"stage_time_limit_s: {job_limit_s} s is above your team's limit of {team_limit} s; ask for at "
            "most that (or leave it out to get it), or ask an administrator for a longer limit",
            limit="stage_time_limit_s",
            value=team_limit,
        )


def over_time_message(limit: StageTimeLimit) -> str:
    return (
        f"stopped: the stage ran past its time limit of {limit.seconds} s ({limit.source}); give it more "
        "time with stage_time_limit_s (up to your team's limit) or make it shorter (fewer epochs or "
        "examples, mode: lora or probe)"
    )


def check_priority(team: Team, settings: Settings, priority: int) -> None:
    ceiling = limit_of(team, settings, "max_priority")
    if priority > ceiling:
        raise LimitExceeded(
            f"priority: {priority} is above your team's ceiling of {ceiling}; priority orders your own "
            "jobs only (across teams, fair share decides), so a lower value loses nothing against others",
            limit="max_priority",
            value=ceiling,
        )


def check_job_size(team: Team, settings: Settings, n_stages: int, *, what: str = "job") -> None:
    name = "max_stages_per_job" if what == "job" else "max_stages_per_sweep"
    limit = limit_of(team, settings, name)
    if n_stages > limit:
        raise LimitExceeded(
            f"the {what} has {n_stages:,} stages and the limit ({name}) is {limit:,}: use fewer seeds, "
            f"losses or models, split it into several {what}s, or ask an admin to raise your team's {name}",
            limit=name,
            value=limit,
        )


def lock_team(session: Session, team_id: str) -> None:
    """Hold the team's row until the transaction ends: a team's quota checks and the inserts they
    admit are one step, so parallel requests cannot all pass a count that only one of them fits.
    (The lock order is a team, then its jobs, then their stages. On SQLite a writing transaction
    holds the database's one write lock already.)"""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(Team.id).where(Team.id == team_id).with_for_update())


def check_backlog(session: Session, team: Team, settings: Settings, adding: int) -> None:
    """Stages waiting or running for the team, plus ``adding``, within max_queued_stages (429).
    Counted under the team's lock: the caller inserts them in the same transaction."""
    lock_team(session, team.id)
    limit = limit_of(team, settings, "max_queued_stages")
    waiting = session.scalar(
        select(func.count()).select_from(Stage).where(Stage.team_id == team.id, Stage.status.in_(WAITING))
    )
    if (waiting or 0) + adding > limit:
        raise LimitExceeded(
            f"your team has {waiting:,} stages waiting or running and this request adds {adding:,}; the "
            f"limit (max_queued_stages) is {limit:,}. Submit it when some have finished, or cancel jobs "
            "you no longer need",
            limit="max_queued_stages",
            value=limit,
            retry_after_s=60,
        )


def check_upload_quota(session: Session, team: Team, settings: Settings, adding_bytes: int) -> None:
    """The team's uploads plus this one within max_uploads, and plus ``adding_bytes`` within
    upload_quota_mb (422), counted under the team's lock: the caller inserts the upload in the same
    transaction."""
    lock_team(session, team.id)
    most = limit_of(team, settings, "max_uploads")
    held = session.scalar(select(func.count()).select_from(Dataset).where(Dataset.team_id == team.id)) or 0
    if held + 1 > most:
        raise LimitExceeded(
            f"your team keeps {held:,} uploaded datasets and the limit (max_uploads) is {most:,}: delete "
            "uploads you no longer need (DELETE /v1/datasets/<id>) or ask an admin to raise it",
            limit="max_uploads",
            value=most,
        )
    quota_mb = limit_of(team, settings, "upload_quota_mb")
    used = session.scalar(
        select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.team_id == team.id)
    )
    if (used or 0) + adding_bytes > quota_mb * 1024 * 1024:
        raise LimitExceeded(
            f"your team's uploads would take {((used or 0) + adding_bytes) / 2**20:,.1f} MB and the quota "
            f"(upload_quota_mb) is {quota_mb:,} MB: delete uploads you no longer need "
            "(DELETE /v1/datasets/<id>) or ask an admin to raise it",
            limit="upload_quota_mb",
            value=quota_mb,
        )


class RateLimiter:
    """Requests per key per minute, in fixed one-minute windows: in Redis when the service has it
    (every API process shares the count), else in this process."""

    def __init__(self, redis_url: str | None = None, prefix: str = "") -> None:
        self._redis: Any = None
        if redis_url and redis_url.startswith(("redis://", "rediss://")):
            import redis

            self._redis = redis.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._prefix = prefix
        self._counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def hit(self, key_hash: str, limit: int) -> int | None:
        """Count a request; None if within ``limit``, else the seconds until the window resets."""
        now = time.time()
        window = int(now // 60)
        count = self._count(key_hash, window)
        if count is None or count <= limit:
            return None
        return max(1, int(60 - now % 60) + 1)

    def _count(self, key_hash: str, window: int) -> int | None:
        if self._redis is not None:
            name = f"{self._prefix}w2s:rate:{key_hash[:32]}:{window}"
            try:
                pipe = self._redis.pipeline()
                pipe.incr(name)
                pipe.expire(name, 120)
                return int(pipe.execute()[0])
            except Exception:  # Redis unreachable: do not turn an outage of the limiter into one of the API
                return None
        with self._lock:
            if len(self._counts) > 100_000:
                self._counts = {k: v for k, v in self._counts.items() if k[1] >= window}
            count = self._counts.get((key_hash, window), 0) + 1
            self._counts[(key_hash, window)] = count
            return count


@dataclass(frozen=True)
class FailurePolicy:
    """How failed authentications from one source are slowed down.

    ``free`` failures within ``window_s`` cost nothing; after that every attempt from the source
    waits ``backoff_s * 2 ** (failures - free)`` seconds (capped at ``max_wait_s``) after its last
    failure, or, with no back-off, until the window ends."""

    scope: str  # what is counted: "api-address", "api-key-prefix", "signin-address"
    window_s: int
    free: int
    backoff_s: float = 0.0
    max_wait_s: float = 300.0

    def wait_s(self, failures: int, last_failure: float, now: float) -> int | None:
        if failures < self.free:
            return None
        if self.backoff_s <= 0:
            window_ends = (now // self.window_s + 1) * self.window_s
            return max(1, math.ceil(window_ends - now))
        wait = min(self.max_wait_s, self.backoff_s * 2 ** (failures - self.free))
        left = last_failure + wait - now
        return math.ceil(left) if left > 0 else None


class FailureThrottle:
    """Failed authentications per source (a client address, a key's prefix) in fixed windows, in
    Redis when the service has it (every API process shares the counts), else in this process.
    ``wait_s`` is asked before a credential is even looked at: a guesser gets 429 instead of the
    chance to try another key."""

    def __init__(self, redis_url: str | None = None, prefix: str = "") -> None:
        self._redis: Any = None
        if redis_url and redis_url.startswith(("redis://", "rediss://")):
            import redis

            self._redis = redis.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._prefix = prefix
        self._local: dict[str, tuple[int, float]] = {}  # name -> (failures, last failure)
        self._lock = threading.Lock()

    def _name(self, policy: FailurePolicy, source: str, now: float) -> str:
        digest = hashlib.sha256(source.encode()).hexdigest()[:24]  # no raw keys or addresses as names
        return f"{self._prefix}w2s:authfail:{policy.scope}:{digest}:{int(now // policy.window_s)}"

    def _read(self, name: str) -> tuple[int, float]:
        if self._redis is not None:
            try:
                failures, last = self._redis.hmget(name, "n", "last")
                return int(failures or 0), float(last or 0.0)
            except Exception:  # Redis unreachable: count here rather than lock everyone out
                pass
        with self._lock:
            return self._local.get(name, (0, 0.0))

    def wait_s(self, policy: FailurePolicy, source: str) -> int | None:
        """Seconds ``source`` must wait before its next attempt, or None."""
        now = time.time()
        failures, last = self._read(self._name(policy, source, now))
        return policy.wait_s(failures, last, now)

    def failed(self, policy: FailurePolicy, source: str) -> int:
        """Count a failure; the failures of ``source`` in this window."""
        now = time.time()
        name = self._name(policy, source, now)
        if self._redis is not None:
            try:
                pipe = self._redis.pipeline()
                pipe.hincrby(name, "n", 1)
                pipe.hset(name, "last", now)
                pipe.expire(name, policy.window_s * 2)
                return int(pipe.execute()[0])
            except Exception:
                pass
        with self._lock:
            if len(self._local) > 100_000:
                self._local.clear()
            failures = self._local.get(name, (0, 0.0))[0] + 1
            self._local[name] = (failures, now)
            return failures

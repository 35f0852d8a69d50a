"""Request dependencies as ``Annotated`` aliases: the session, the caller's team, the admin, and
jobs, datasets and sweeps loaded for the caller's team (404 for anyone else's, in this one place)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import Counter
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.auth import (
    KNOWN_KEY_HASHES,
    KeyOwner,
    cached_owner,
    hash_key,
    is_admin_key,
    key_of_disabled_team,
    owner_of_key_hash,
    team_for_key_hash,
    unrevoked_key_hashes,
)
from service.db import run_transaction, session_scope
from service.errors import LimitExceeded
from service.jobs import get_job
from service.limits import FailurePolicy, FailureThrottle, RateLimiter
from service.models import Dataset, Job, Sweep, Team
from service.settings import Settings, get_settings
from service.sweeps import get_sweep
from service.uploads import get_dataset

T = TypeVar("T")
logger = logging.getLogger(__name__)

bearer = HTTPBearer(auto_error=False, description="an API key: Authorization: Bearer w2s_...")


def get_session() -> Iterator[Session]:
    with session_scope() as session:
        yield session


# scope="function": commit when the endpoint returns, before the response is sent. With the default
# (after the response), a client's next request could arrive first and miss what it just created.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]

UNAUTHORIZED = HTTPException(
    status.HTTP_401_UNAUTHORIZED,
    "missing or invalid API key: send 'Authorization: Bearer <key>'",
    headers={"WWW-Authenticate": "Bearer"},
)
# A valid key of a disabled team: its holder is told why, not that the key is wrong.
TEAM_DISABLED = HTTPException(
    status.HTTP_403_FORBIDDEN,
    "your team is disabled by an administrator: its keys work again once it is enabled; ask your "
    "administrator",
)


_limiters: dict[tuple[str, str], RateLimiter] = {}


def rate_limiter(settings: Settings) -> RateLimiter:
    """One limiter per broker: Redis counts are shared by every API process; embedded, per process."""
    key = (settings.broker_url, settings.broker_key_prefix)
    if key not in _limiters:
        _limiters[key] = RateLimiter(settings.broker_url, settings.broker_key_prefix)
    return _limiters[key]


def enforce_rate(settings: Settings, key_hash: str, team_limit: int | None) -> None:
    limit = team_limit if team_limit is not None else settings.requests_per_minute
    wait = rate_limiter(settings).hit(key_hash, limit)
    if wait is not None:
        raise LimitExceeded(
            f"more than {limit} requests in a minute with this key (requests_per_minute); retry in {wait} s",
            limit="requests_per_minute",
            value=limit,
            retry_after_s=wait,
        )


# ---- failed authentication: counted per client address and per key prefix, throttled with 429 ----

AUTH_FAILURES = Counter("w2s_auth_failures_total", "failed authentications", ["kind"])
AUTH_THROTTLED = Counter(
    "w2s_auth_throttled_total", "requests refused for too many failed authentications", ["scope"]
)
KEY_PREFIX_CHARS = 12  # "w2s_" and 8 more: enough to tell a targeted key, far too few to guess it


def client_address(request: Request) -> str:
    """The caller's address (behind a proxy, run uvicorn with --forwarded-allow-ips so that this is
    the client's, not the proxy's)."""
    return request.client.host if request.client else "unknown"


def failure_throttle(request: Request) -> FailureThrottle:
    """One per app: Redis counts are shared by every API process; embedded, per process."""
    return request.app.state.failure_throttle  # type: ignore[no-any-return]


def api_failure_sources(
    request: Request, settings: Settings, presented: str
) -> list[tuple[FailurePolicy, str]]:
    per_minute = settings.auth_failures_per_minute
    return [
        (FailurePolicy("api-address", 60, per_minute), client_address(request)),
        (FailurePolicy("api-key-prefix", 60, per_minute), presented[:KEY_PREFIX_CHARS]),
    ]


def throttle_refusal(request: Request, sources: list[tuple[FailurePolicy, str]]) -> LimitExceeded | None:
    """The 429 (with Retry-After) for a source over its failed authentications, or None."""
    throttle = failure_throttle(request)
    for policy, source in sources:
        wait = throttle.wait_s(policy, source)
        if wait is not None:
            what = "address" if policy.scope.endswith("address") else "key prefix"
            AUTH_THROTTLED.labels(policy.scope).inc()
            return LimitExceeded(
                f"too many failed authentications from your {what}; retry in {wait} s with a valid key",
                limit="auth_failures",
                value=policy.free,
                retry_after_s=wait,
            )
    return None


def known_key(key_hash: str) -> bool:
    """Whether ``key_hash`` is an unrevoked key's, from this process's snapshot of the keys (no query
    unless the snapshot is older than a few seconds: see service.auth.KnownKeyHashes)."""
    return KNOWN_KEY_HASHES.contains(key_hash, lambda: run_transaction(unrevoked_key_hashes, read_only=True))


def refuse_guess_if_throttled(
    request: Request, sources: list[tuple[FailurePolicy, str]], key_hash: str
) -> None:
    """A source over its failed authentications gets 429 for any key that does not exist, before
    the key is looked up; a key that exists goes on to the lookup. A correct key is never made to
    wait for others' failures from its address (a shared NAT or proxy) or at its prefix."""
    refusal = throttle_refusal(request, sources)
    if refusal is not None and not known_key(key_hash):
        raise refusal


def record_failure(request: Request, kind: str, sources: list[tuple[FailurePolicy, str]]) -> None:
    """Count a failed authentication; the first time a source reaches its limit in a window, audit it
    (an operator sees a guessing burst in the audit log, not only in the metrics)."""
    AUTH_FAILURES.labels(kind).inc()
    throttle = failure_throttle(request)
    for policy, source in sources:
        if throttle.failed(policy, source) == policy.free:
            shown = source if policy.scope.endswith("address") else f"{source}…"
            logger.warning("authentication failures: %s %s reached %d", policy.scope, shown, policy.free)
            try:
                run_transaction(audit_burst, policy=policy, source=shown, path=request.url.path, kind=kind)
            except Exception:  # the audit must not turn a 401 into a 500
                logger.warning("could not audit an authentication burst", exc_info=True)


def audit_burst(session: Session, *, policy: FailurePolicy, source: str, path: str, kind: str) -> None:
    from service.admin import audit

    details = {"scope": policy.scope, "failures": policy.free, "window_s": policy.window_s, "path": path}
    audit(session, actor="system", action=f"{kind}_failures_throttled", target=source, details=details)


def signin_policy(settings: Settings) -> FailurePolicy:
    """Dashboard sign-ins: a few free failures per 15 minutes, then a doubling wait after each."""
    return FailurePolicy(
        "signin-address", 900, settings.signin_failures_free, backoff_s=1.0, max_wait_s=300.0
    )


def unauthorized(request: Request, sources: list[tuple[FailurePolicy, str]]) -> HTTPException:
    record_failure(request, "api_key", sources)
    return UNAUTHORIZED


def current_team(
    request: Request, session: SessionDep, credentials: Credentials, settings: SettingsDep
) -> Team:
    if credentials is None:
        raise UNAUTHORIZED
    sources = api_failure_sources(request, settings, credentials.credentials)
    key_hash = hash_key(credentials.credentials)
    refuse_guess_if_throttled(request, sources, key_hash)
    team = team_for_key_hash(session, key_hash)
    if team is None:
        if key_of_disabled_team(session, key_hash):
            raise TEAM_DISABLED
        raise unauthorized(request, sources)
    enforce_rate(settings, key_hash, team.requests_per_minute)
    return team


def look_up_key(request: Request, sources: list[tuple[FailurePolicy, str]], key_hash: str) -> KeyOwner | None:
    """The owner of a key not in the cache, unless its source is throttled and the key does not exist."""
    refuse_guess_if_throttled(request, sources, key_hash)
    return run_transaction(owner_of_key_hash, key_hash, read_only=True)


async def current_team_id(request: Request, credentials: Credentials, settings: SettingsDep) -> str:
    """The caller's team id, for the read endpoints. A key checked in the last few seconds comes from
    service.auth's cache: no query, no thread hand-off and no throttle to consult (it is correct;
    revocation takes up to KEY_CACHE_TTL_S). Checked once per request: api.yaml_bodies checks the
    key before it parses a YAML body, and the route's dependency then reuses the answer."""
    checked: str | None = getattr(request.state, "api_team_id", None)
    if checked is not None:
        return checked
    if credentials is None:
        raise UNAUTHORIZED
    sources = api_failure_sources(request, settings, credentials.credentials)
    key_hash = hash_key(credentials.credentials)
    owner = cached_owner(key_hash) or await run_in_threadpool(look_up_key, request, sources, key_hash)
    if owner is None:
        if await in_session(key_of_disabled_team, key_hash, read_only=True):
            raise TEAM_DISABLED
        await run_in_threadpool(record_failure, request, "api_key", sources)
        raise UNAUTHORIZED
    enforce_rate(settings, key_hash, owner.requests_per_minute)
    request.state.api_team_id = owner.team_id
    return owner.team_id


async def in_session(work: Callable[..., T], /, *args: Any, read_only: bool = False, **kwargs: Any) -> T:
    """``work(session, *args, **kwargs)`` in a transaction of its own, committed before it returns,
    in the threadpool: an async endpoint's database work in one thread hand-off (a sync endpoint pays
    one per dependency and more). Work and commit share the thread, so a request never waits for a
    free thread to commit while others wait on its locks; a transaction aborted to break a deadlock
    runs again (service.db.run_transaction). ``read_only``: it only reads."""
    return await run_in_threadpool(run_transaction, work, *args, read_only=read_only, **kwargs)


def team_for_write(session: Session, team_id: str) -> Team:
    """The caller's team, loaded in a write endpoint's own transaction; 403 if it was disabled since
    its key was checked."""
    team = session.scalar(select(Team).where(Team.id == team_id, Team.disabled_at.is_(None)))
    if team is None:
        raise TEAM_DISABLED
    return team


def require_admin(request: Request, settings: SettingsDep, credentials: Credentials) -> None:
    # No credentials at all is a 401 (send a key), as on every other endpoint; a team's key is a 403.
    if credentials is None:
        raise UNAUTHORIZED
    if not settings.admin_key:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "admin endpoints are off: no admin key is configured (W2S_ADMIN_KEY)"
        )
    if is_admin_key(credentials.credentials, settings.admin_key):
        return  # compared in memory: the right key is never made to wait for others' failures
    sources = api_failure_sources(request, settings, credentials.credentials)
    refusal = throttle_refusal(request, sources)
    if refusal is not None:
        raise refusal
    record_failure(request, "admin_key", sources)
    raise HTTPException(status.HTTP_403_FORBIDDEN, "this endpoint needs the admin key")


TeamDep = Annotated[Team, Depends(current_team)]
TeamIdDep = Annotated[str, Depends(current_team_id)]
AdminDep = Annotated[None, Depends(require_admin)]


JobId = Annotated[str, Path(max_length=64)]


# Loaders of the caller's own objects. Another team's object raises service.jobs.NotFound like a
# missing one, which the app turns into the same 404: nobody can infer what others have.
def team_job(session: SessionDep, team: TeamDep, job_id: JobId) -> Job:
    return get_job(session, team_id=team.id, job_id=job_id)


def team_dataset(
    session: SessionDep, team: TeamDep, dataset_id: Annotated[str, Path(max_length=64)]
) -> Dataset:
    return get_dataset(session, team_id=team.id, dataset_id=dataset_id)


def team_sweep(session: SessionDep, team: TeamDep, sweep_id: Annotated[str, Path(max_length=64)]) -> Sweep:
    return get_sweep(session, team_id=team.id, sweep_id=sweep_id)


JobDep = Annotated[Job, Depends(team_job)]
DatasetDep = Annotated[Dataset, Depends(team_dataset)]
SweepDep = Annotated[Sweep, Depends(team_sweep)]

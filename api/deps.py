"""Request dependencies as ``Annotated`` aliases: the session, the caller's team, the admin, and
jobs, datasets and sweeps loaded for the caller's team (404 for anyone else's, in this one place)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Path, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.auth import cached_owner, hash_key, is_admin_key, owner_of_key_hash, team_for_key_hash
from service.db import run_transaction, session_scope
from service.errors import LimitExceeded
from service.jobs import get_job
from service.limits import RateLimiter
from service.models import Dataset, Job, Sweep, Team
from service.settings import Settings, get_settings
from service.sweeps import get_sweep
from service.uploads import get_dataset

T = TypeVar("T")

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


def current_team(session: SessionDep, credentials: Credentials, settings: SettingsDep) -> Team:
    if credentials is None:
        raise UNAUTHORIZED
    key_hash = hash_key(credentials.credentials)
    team = team_for_key_hash(session, key_hash)
    if team is None:
        raise UNAUTHORIZED
    enforce_rate(settings, key_hash, team.requests_per_minute)
    return team


async def current_team_id(credentials: Credentials, settings: SettingsDep) -> str:
    """The caller's team id, for the read endpoints. A key checked in the last few seconds comes from
    service.auth's cache: no query and no thread hand-off (revocation takes up to KEY_CACHE_TTL_S)."""
    if credentials is None:
        raise UNAUTHORIZED
    key_hash = hash_key(credentials.credentials)
    owner = cached_owner(key_hash) or await in_session(owner_of_key_hash, key_hash, read_only=True)
    if owner is None:
        raise UNAUTHORIZED
    enforce_rate(settings, key_hash, owner.requests_per_minute)
    return owner.team_id


async def in_session(work: Callable[..., T], /, *args: Any, read_only: bool = False, **kwargs: Any) -> T:
    """``work(session, *args, **kwargs)`` in a transaction of its own, committed before it returns,
    in the threadpool: an async endpoint's database work in one thread hand-off (a sync endpoint pays
    one per dependency and more). Work and commit share the thread, so a request never waits for a
    free thread to commit while others wait on its locks; a transaction aborted to break a deadlock
    runs again (service.db.run_transaction). ``read_only``: it only reads."""
    return await run_in_threadpool(run_transaction, work, *args, read_only=read_only, **kwargs)


def team_for_write(session: Session, team_id: str) -> Team:
    """The caller's team, loaded in a write endpoint's own transaction; 401 if it was disabled since
    its key was checked."""
    team = session.scalar(select(Team).where(Team.id == team_id, Team.disabled_at.is_(None)))
    if team is None:
        raise UNAUTHORIZED
    return team


def require_admin(settings: SettingsDep, credentials: Credentials) -> None:
    # No credentials at all is a 401 (send a key), as on every other endpoint; a team's key is a 403.
    if credentials is None:
        raise UNAUTHORIZED
    if not settings.admin_key:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "admin endpoints are off: no admin key is configured (W2S_ADMIN_KEY)"
        )
    if not is_admin_key(credentials.credentials, settings.admin_key):
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

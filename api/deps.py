"""Request dependencies as ``Annotated`` aliases: the session, the caller's team, the admin, and
jobs, datasets and sweeps loaded for the caller's team (404 for anyone else's, in this one place)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Path, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.auth import cached_team_id, hash_key, is_admin_key, team_for_key, team_id_for_key_hash
from service.db import session_scope
from service.jobs import get_job
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


def current_team(session: SessionDep, credentials: Credentials) -> Team:
    if credentials is None:
        raise UNAUTHORIZED
    team = team_for_key(session, credentials.credentials)
    if team is None:
        raise UNAUTHORIZED
    return team


async def current_team_id(credentials: Credentials) -> str:
    """The caller's team id, for the read endpoints. A key checked in the last few seconds comes from
    service.auth's cache: no query and no thread hand-off (revocation takes up to KEY_CACHE_TTL_S)."""
    if credentials is None:
        raise UNAUTHORIZED
    key_hash = hash_key(credentials.credentials)
    team_id = cached_team_id(key_hash)
    if team_id is None:
        team_id = await in_session(team_id_for_key_hash, key_hash)
    if team_id is None:
        raise UNAUTHORIZED
    return team_id


async def in_session(work: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``work(session, *args, **kwargs)`` in a session of its own, in the threadpool: an async endpoint's
    database work in one thread hand-off (a sync endpoint pays one per dependency and more)."""

    def run() -> T:
        with session_scope() as session:
            return work(session, *args, **kwargs)

    return await run_in_threadpool(run)


def require_admin(settings: SettingsDep, credentials: Credentials) -> None:
    # No credentials at all is a 401 (send a key), as on every other endpoint; a team's key is a 403.
    if credentials is None:
        raise UNAUTHORIZED
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

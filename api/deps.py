"""Request dependencies as ``Annotated`` aliases: the session, the caller's team, the admin, and
a job loaded for the caller's team (404 for anyone else's, in this one place)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.auth import is_admin_key, team_for_key
from service.db import get_sessionmaker
from service.jobs import NotFound, get_job
from service.models import Job, Team
from service.settings import Settings, get_settings

bearer = HTTPBearer(auto_error=False, description="an API key: Authorization: Bearer w2s_...")


def get_session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]
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


def require_admin(settings: SettingsDep, credentials: Credentials) -> None:
    if credentials is None or not is_admin_key(credentials.credentials, settings.admin_key):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this endpoint needs the admin key")


TeamDep = Annotated[Team, Depends(current_team)]
AdminDep = Annotated[None, Depends(require_admin)]


def team_job(session: SessionDep, team: TeamDep, job_id: Annotated[str, Path(max_length=64)]) -> Job:
    try:
        return get_job(session, team_id=team.id, job_id=job_id)
    except NotFound as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None


JobDep = Annotated[Job, Depends(team_job)]

"""Dashboard sign-in: the session cookie's contents, the signed-in team, and CSRF tokens.

The cookie (Starlette's SessionMiddleware: signed, httponly, same-site lax) holds the sha256 of
the API key, never the key itself: the cookie is signed but not encrypted, and a hash cannot be
replayed as a bearer key against /v1. Every request looks the hash up again, so revoking the key
signs its dashboard sessions out too.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.orm import Session

from api.deps import SessionDep
from service.auth import hash_key, team_for_key, team_for_key_hash
from service.models import Team

CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"


class LoginRequired(Exception):
    """No valid dashboard session; pages answer with a redirect to /login."""

    def __init__(self, next_url: str):
        super().__init__(next_url)
        self.next_url = next_url


def csrf_token(request: Request) -> str:
    """The session's CSRF token, created on first use (the login form needs one before sign-in)."""
    token = request.session.get(CSRF_FIELD)
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        request.session[CSRF_FIELD] = token
    return token


def csrf_valid(request: Request, sent: str | None) -> bool:
    expected = request.session.get(CSRF_FIELD)
    if not isinstance(expected, str) or not expected or not sent:
        return False
    return hmac.compare_digest(expected.encode(), sent.encode())


def sign_in(request: Request, session: Session, key: str) -> Team | None:
    """Verify ``key`` and start a fresh session for its team; None (and no session) if it is wrong."""
    key = key.strip()
    team = team_for_key(session, key) if key else None
    if team is None:
        return None
    # A new session on sign-in (new CSRF token too): nothing set before sign-in carries over.
    request.session.clear()
    request.session.update(
        {
            "team_id": team.id,
            "key_hash": hash_key(key),
            "key_prefix": key[:10],
            CSRF_FIELD: secrets.token_urlsafe(32),
        }
    )
    return team


def sign_out(request: Request) -> None:
    request.session.clear()


def session_team(request: Request, session: Session) -> Team | None:
    data: dict[str, Any] = request.session
    key_hash, team_id = data.get("key_hash"), data.get("team_id")
    if not isinstance(key_hash, str) or not isinstance(team_id, str):
        return None
    team = team_for_key_hash(session, key_hash)
    if team is None or team.id != team_id:
        request.session.clear()  # revoked key or stale cookie: sign out
        return None
    return team


def _local_path(request: Request) -> str:
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def page_team(request: Request, session: SessionDep) -> Team:
    """The signed-in team for an HTML page; otherwise the page redirects to /login."""
    team = session_team(request, session)
    if team is None:
        raise LoginRequired(_local_path(request))
    return team


def ui_team(request: Request, session: SessionDep) -> Team:
    """The signed-in team for the dashboard's JSON endpoints: 401 (JSON) when signed out."""
    team = session_team(request, session)
    if team is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "sign in to the dashboard at /login")
    return team


PageTeamDep = Annotated[Team, Depends(page_team)]
UiTeamDep = Annotated[Team, Depends(ui_team)]


def safe_next(value: str | None) -> str:
    """Only local paths: an open redirect to another site after sign-in would be a phishing aid."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value

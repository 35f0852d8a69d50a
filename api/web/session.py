"""Dashboard sign-in: the session cookie's contents, the signed-in team, and CSRF tokens.

The cookie (Starlette's SessionMiddleware: signed, httponly, same-site lax) is signed but not
encrypted: anyone holding it can read it. So it holds only random tokens: the id of a server-side
session (``web_sessions``) and the CSRF token (and, for one page, a flash message), never the key
nor any part of it (issue 28: it showed the key's first 10 characters). Every request looks the
session up again: signing out revokes it on the server (a copied cookie stops working too), and
revoking the key or disabling the team signs its sessions out.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.orm import Session

from api.deps import SessionDep
from service.auth import close_web_session, hash_key, open_web_session, team_for_key, team_for_web_session
from service.models import Team

CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
# What cookies set before issue 28 also held (the key's first characters, the team's id): dropped
# from a browser's cookie at its next request.
STALE_FIELDS = ("key_prefix", "team_id")


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
            "session_id": open_web_session(session, team=team, key_hash=hash_key(key)),
            CSRF_FIELD: secrets.token_urlsafe(32),
        }
    )
    return team


def sign_out(request: Request, session: Session) -> None:
    session_id = request.session.get("session_id")
    if isinstance(session_id, str):
        close_web_session(session, session_id)
    request.session.clear()


def session_team(request: Request, session: Session) -> Team | None:
    """The signed-in team; the signing key's listed prefix goes to ``request.state.key_prefix``."""
    data: dict[str, Any] = request.session
    for stale in STALE_FIELDS:
        data.pop(stale, None)
    session_id = data.get("session_id")
    if not isinstance(session_id, str):
        return None
    signed_in = team_for_web_session(session, session_id)
    if signed_in is None:
        request.session.clear()  # signed out, revoked key, disabled team or stale cookie
        return None
    team, request.state.key_prefix = signed_in
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

"""Teams and API keys. Keys are random, shown once, and stored only as a sha256 hash: a key has
256 bits of entropy, so a fast hash is enough and lookups stay a single indexed read."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import ApiKey, Team

KEY_PREFIX = "w2s_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_team(
    session: Session,
    *,
    name: str,
    weight: float = 1.0,
    gpu_quota: int | None = None,
    allow_trust_remote_code: bool = False,
) -> Team:
    if session.scalar(select(Team).where(Team.name == name)) is not None:
        raise ValueError(f"team name {name!r} is taken; choose another")
    team = Team(
        name=name, weight=weight, gpu_quota=gpu_quota, allow_trust_remote_code=allow_trust_remote_code
    )
    session.add(team)
    session.flush()
    return team


def create_api_key(session: Session, *, team: Team, name: str = "") -> tuple[ApiKey, str]:
    """A new key for ``team``: returns the row and the key itself, which is never stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(team_id=team.id, name=name, key_hash=hash_key(key), prefix=key[:10])
    session.add(row)
    session.flush()
    return row, key


def team_for_key(session: Session, key: str) -> Team | None:
    return team_for_key_hash(session, hash_key(key))


def team_for_key_hash(session: Session, key_hash: str) -> Team | None:
    """The team of an unrevoked key, from its hash (what the dashboard's session cookie holds)."""
    # One round trip: every request authenticates, so the key and its team come in one join.
    return session.scalar(
        select(Team)
        .join(ApiKey, ApiKey.team_id == Team.id)
        .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    )


def is_admin_key(key: str, admin_key: str) -> bool:
    return hmac.compare_digest(key.encode(), admin_key.encode())

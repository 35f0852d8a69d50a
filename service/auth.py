"""Teams and API keys. Keys are random, shown once, and stored only as a sha256 hash: a key has
256 bits of entropy, so a fast hash is enough and lookups stay a single indexed read."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.models import ApiKey, Team, utcnow

KEY_PREFIX = "w2s_"
# How long an API process trusts a key it has checked (see KeyCache).
KEY_CACHE_TTL_S = 5.0


class KeyCache:
    """Key hash -> team id of keys checked in the last ``ttl_s`` seconds, in this process.

    Every API request authenticates; at hundreds of requests a second the auth query was a fifth of
    a read's cost. The price: a key revoked in the database by anyone else (another API process, SQL)
    keeps working here for up to ``ttl_s``. ``revoke_api_key`` in this process forgets it at once.
    Only valid keys are remembered, so a new key works immediately. Thread-safe (the API's threadpool).
    """

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[str, float]] = {}  # key hash -> (team id, monotonic expiry)
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> str | None:
        entry = self._entries.get(key_hash)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return entry[0]

    def put(self, key_hash: str, team_id: str) -> None:
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()  # many distinct keys within a TTL: rare, and a miss is only a query
            self._entries[key_hash] = (team_id, time.monotonic() + self.ttl_s)

    def forget(self, key_hash: str) -> None:
        with self._lock:
            self._entries.pop(key_hash, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


KEY_CACHE = KeyCache(KEY_CACHE_TTL_S)


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


def cached_team_id(key_hash: str) -> str | None:
    """The team id of a key checked in the last few seconds; None means: ask the database."""
    return KEY_CACHE.get(key_hash)


def team_id_for_key_hash(session: Session, key_hash: str) -> str | None:
    """The team id of an unrevoked key, from the database; remembered for ``KEY_CACHE_TTL_S``."""
    team_id = session.scalar(
        select(ApiKey.team_id).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    )
    if team_id is not None:
        KEY_CACHE.put(key_hash, team_id)
    return team_id


def revoke_api_key(session: Session, *, key_id: str) -> bool:
    """Revoke a key; False if there is no such unrevoked key. This process stops accepting it at once,
    other API processes within ``KEY_CACHE_TTL_S`` (as does this one, if a request races the commit)."""
    key_hash = session.scalar(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .returning(ApiKey.key_hash)
    )
    if key_hash is None:
        return False
    KEY_CACHE.forget(key_hash)
    return True


def is_admin_key(key: str, admin_key: str) -> bool:
    return hmac.compare_digest(key.encode(), admin_key.encode())

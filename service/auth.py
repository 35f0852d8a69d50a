"""Teams, API keys and dashboard sessions. Keys are random, shown once, and stored only as a sha256
hash: a key has 256 bits of entropy, so a fast hash is enough and lookups stay a single indexed read.
A disabled team's keys and sessions stop working."""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cachetools import TTLCache
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import Conflict
from service.models import ApiKey, Team, WebSession, utcnow
from service.team_names import check_team_name, team_name_key

KEY_PREFIX = "w2s_"
# How long an API process trusts a key it has checked (see KeyCache).
KEY_CACHE_TTL_S = 5.0


@dataclass(frozen=True)
class KeyOwner:
    """What a checked key is worth: its team, and the team's own request rate limit if it has one."""

    team_id: str
    requests_per_minute: int | None


class KeyCache:
    """Key hash -> owner of keys checked in the last ``ttl_s`` seconds, in this process.

    Every API request authenticates; at hundreds of requests a second the auth query was a fifth of
    a read's cost. The price: a key revoked (or a team disabled) by another process keeps working
    here for up to ``ttl_s``; ``revoke_api_key`` and ``set_team_disabled`` in this process take
    effect at once. Only valid keys are remembered, so a new key works immediately. Thread-safe.
    """

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self._cache: TTLCache[str, KeyOwner] = TTLCache(maxsize=max_entries, ttl=ttl_s)
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> KeyOwner | None:
        if self.ttl_s <= 0:
            return None
        with self._lock:
            return self._cache.get(key_hash)

    def put(self, key_hash: str, owner: KeyOwner) -> None:
        with self._lock:
            self._cache[key_hash] = owner

    def forget(self, key_hash: str | None = None, *, team_id: str | None = None) -> None:
        with self._lock:
            if key_hash is not None:
                self._cache.pop(key_hash, None)
            if team_id is not None:
                for cached, owner in list(self._cache.items()):
                    if owner.team_id == team_id:
                        self._cache.pop(cached, None)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


KEY_CACHE = KeyCache(KEY_CACHE_TTL_S)


class KnownKeyHashes:
    """The hashes of every unrevoked key, read from the database at most once per ``max_age_s``.

    Asked only for a request from a source throttled for failed authentications (an address or a
    key prefix over its limit): a correct key is looked up and served whoever else failed from its
    address or at its prefix, a made-up one is refused from this set. So a flood of made-up keys
    costs one query per ``max_age_s`` in each process, not one per key. A key created by another
    process since the last read waits (429) for up to ``max_age_s`` if, and only if, its source is
    throttled. Thread-safe: one thread reads the table, the others wait for its answer."""

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._hashes: frozenset[str] = frozenset()
        self._read_at = -math.inf
        self._lock = threading.Lock()

    def contains(self, key_hash: str, read: Callable[[], Iterable[str]]) -> bool:
        """Whether ``key_hash`` is an unrevoked key's; ``read()`` gives every such hash, and is
        called only when the last read is older than ``max_age_s``."""
        with self._lock:
            if time.monotonic() - self._read_at > self.max_age_s:
                self._hashes = frozenset(read())
                self._read_at = time.monotonic()
            return key_hash in self._hashes

    def clear(self) -> None:
        with self._lock:
            self._hashes, self._read_at = frozenset(), -math.inf


KNOWN_KEY_HASHES = KnownKeyHashes(KEY_CACHE_TTL_S)


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
    """A new team, its name checked and normalised (service/team_names.py: InvalidInput naming what
    to fix). The unique index on the case-folded name decides a race between two requests for one
    name, whatever their case: the second is a Conflict."""
    given, name = name, check_team_name(name)
    key = team_name_key(name)
    team = Team(
        name=name,
        name_key=key,
        weight=weight,
        gpu_quota=gpu_quota,
        allow_trust_remote_code=allow_trust_remote_code,
    )
    try:
        with session.begin_nested():
            session.add(team)
    except IntegrityError:
        holder = session.scalar(select(Team.name).where(Team.name_key == key)) or name
        raise Conflict(
            f"team name {given!r} is taken by team {holder!r} (names are compared NFKC-normalised, "
            "stripped and ignoring case); choose another"
        ) from None
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
    """The enabled team of an unrevoked key, from its hash."""
    # One round trip: every request authenticates, so the key and its team come in one join.
    return session.scalar(
        select(Team)
        .join(ApiKey, ApiKey.team_id == Team.id)
        .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None), Team.disabled_at.is_(None))
    )


def unrevoked_key_hashes(session: Session) -> list[str]:
    """Every key that may still work (a disabled team's too: its holder is told why it is refused)."""
    return list(session.scalars(select(ApiKey.key_hash).where(ApiKey.revoked_at.is_(None))))


def key_of_disabled_team(session: Session, key_hash: str) -> bool:
    """Whether an unrevoked key belongs to a team an administrator disabled (asked only after a key
    was refused, to say why)."""
    return (
        session.scalar(
            select(ApiKey.id)
            .join(Team, Team.id == ApiKey.team_id)
            .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None), Team.disabled_at.is_not(None))
        )
        is not None
    )


def cached_owner(key_hash: str) -> KeyOwner | None:
    """The owner of a key checked in the last few seconds; None means: ask the database."""
    return KEY_CACHE.get(key_hash)


def owner_of_key_hash(session: Session, key_hash: str) -> KeyOwner | None:
    """The owner of an unrevoked key of an enabled team; remembered for ``KEY_CACHE_TTL_S``."""
    row = session.execute(
        select(Team.id, Team.requests_per_minute)
        .join(ApiKey, ApiKey.team_id == Team.id)
        .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None), Team.disabled_at.is_(None))
    ).first()
    if row is None:
        return None
    owner = KeyOwner(row[0], row[1])
    KEY_CACHE.put(key_hash, owner)
    return owner


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
    # An unset admin key admits nobody, whatever is sent.
    return bool(admin_key) and hmac.compare_digest(key.encode(), admin_key.encode())


# -- dashboard sessions ---------------------------------------------------------------------------------


def open_web_session(session: Session, *, team: Team, key_hash: str) -> str:
    """A server-side dashboard session for a signed-in key; its id goes in the signed cookie."""
    session_id = secrets.token_urlsafe(32)
    session.add(WebSession(id=session_id, key_hash=key_hash, team_id=team.id))
    session.flush()
    return session_id


def team_for_web_session(session: Session, session_id: str) -> tuple[Team, str] | None:
    """The team of an open session whose key still works (not revoked, team enabled), and the
    key's listed prefix (the dashboard shows which key signed in; the cookie never holds any of it)."""
    row = session.execute(
        select(Team, ApiKey.prefix)
        .join(WebSession, WebSession.team_id == Team.id)
        .join(ApiKey, ApiKey.key_hash == WebSession.key_hash)
        .where(
            WebSession.id == session_id,
            WebSession.revoked_at.is_(None),
            ApiKey.revoked_at.is_(None),
            Team.disabled_at.is_(None),
        )
    ).first()
    return (row[0], row[1]) if row is not None else None


def close_web_session(session: Session, session_id: str) -> None:
    session.execute(
        update(WebSession)
        .where(WebSession.id == session_id, WebSession.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )

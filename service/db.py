"""Engine and sessions. SQLite (the embedded default) gets WAL and a busy timeout so the API, the
dispatcher and a worker can share one file."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, Insert, Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.auth import KEY_CACHE
from service.settings import get_settings

logger = logging.getLogger(__name__)

T = TypeVar("T")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # pool_pre_ping costs a round trip per checkout (0.03-0.07 ms of CPU, under a tenth of a read) and
    # buys that after a Postgres restart or failover no request meets a dead pooled connection: without
    # it, each stale connection fails one request with a 503.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def insert_ignoring_duplicates(session: Session, table: Table) -> Insert:
    """INSERT ... ON CONFLICT DO NOTHING, for rows a retried or redelivered write may repeat."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing()


def database_unreachable(error: BaseException) -> bool:
    """A connection problem (retry later), as opposed to a bad statement (a bug: fail now)."""
    return isinstance(error, OperationalError) or (
        isinstance(error, DBAPIError) and bool(error.connection_invalidated)
    )


def retry_database(action: Callable[[], T], what: str, budget_s: float) -> T:
    """Run ``action`` (its own transaction), retrying for up to ``budget_s`` while the database is
    unreachable (Postgres restarting, a failover): 0.5 s, 1 s, 2 s ... 10 s apart."""
    deadline = time.monotonic() + budget_s
    wait = 0.5
    while True:
        try:
            return action()
        except DBAPIError as error:
            if not database_unreachable(error) or time.monotonic() + wait > deadline:
                raise
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            logger.warning("%s: database unreachable, retrying in %.1f s: %s", what, wait, first_line)
            time.sleep(wait)
            wait = min(wait * 2, 10.0)


def reset_caches() -> None:
    """Forget the cached settings, engine, sessions and checked API keys (tests switch databases)."""
    KEY_CACHE.clear()
    get_settings.cache_clear()
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()

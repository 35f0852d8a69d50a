"""Engine and sessions. SQLite (the embedded default) gets WAL and a busy timeout so the API, the
dispatcher and a worker can share one file."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, Insert, Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

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
    unreachable (Postgres restarting, a failover): 0.5 s, 1 s, 2 s ... 10 s apart, with jitter.
    Any other error, or the budget spent, raises at once."""

    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        first_line = str(error).splitlines()[0] if error and str(error) else type(error).__name__
        wait = state.next_action.sleep if state.next_action else 0.0
        logger.warning("%s: database unreachable, retrying in %.1f s: %s", what, wait, first_line)

    retrying = Retrying(
        retry=retry_if_exception(lambda error: isinstance(error, DBAPIError) and database_unreachable(error)),
        wait=wait_exponential(multiplier=0.5, max=10.0) + wait_random(0, 0.25),
        stop=stop_after_delay(budget_s),
        before_sleep=log_retry,
        reraise=True,
    )
    return retrying(action)


def reset_caches() -> None:
    """Forget the cached settings, engine, sessions and checked API keys (tests switch databases)."""
    KEY_CACHE.clear()
    get_settings.cache_clear()
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()

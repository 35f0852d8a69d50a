"""Engine and sessions. SQLite (the embedded default) gets WAL and a busy timeout so the API, the
dispatcher and a worker can share one file."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Engine, Insert, String, Table, any_, create_engine, event, literal
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
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

from service.auth import KEY_CACHE, KNOWN_KEY_HASHES
from service.settings import get_settings

logger = logging.getLogger(__name__)

T = TypeVar("T")


# Marks a session that only reads: on SQLite it starts a deferred transaction instead of taking
# the write lock (service/db.py read_session).
READ_ONLY = "w2s_read_only"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _record: Any) -> None:
            # SQLAlchemy emits BEGIN itself (below), not the driver: see _begin.
            connection.isolation_level = None
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection: Any) -> None:
            # One writer at a time is SQLite's rule. A transaction that starts as a reader and then
            # writes cannot wait for the lock (SQLite refuses at once: "database is locked"), so a
            # transaction that may write takes the write lock when it begins and waits its turn
            # (busy_timeout): concurrent writes queue instead of failing. Readers (WAL) never wait.
            read_only = connection.get_execution_options().get(READ_ONLY, False)
            connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    # pool_pre_ping costs a round trip per checkout (0.03-0.07 ms of CPU, under a tenth of a read) and
    # buys that after a Postgres restart or failover no request meets a dead pooled connection: without
    # it, each stale connection fails one request with a 503.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().database_url)


@lru_cache
def get_sessionmaker(read_only: bool = False) -> sessionmaker[Session]:
    engine = get_engine()
    return sessionmaker(
        engine.execution_options(**{READ_ONLY: True}) if read_only else engine, expire_on_commit=False
    )


def _forget_engine_in_child() -> None:
    """A forked child (a Celery pool process) builds its own engine. The parent's registration
    thread may be inside the pool (holding its lock, or mid-query on a connection) at the instant
    of the fork: a child using that pool can wait forever on a lock no thread of its own holds, or
    interleave its queries with the parent's on one socket. The parent's objects are only dropped,
    never closed: psycopg finishes a connection only in the process that opened it."""
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()


os.register_at_fork(after_in_child=_forget_engine_in_child)


@contextmanager
def session_scope(*, read_only: bool = False) -> Iterator[Session]:
    """A session that commits on success and rolls back on error. ``read_only``: it only reads
    (on SQLite it then never waits for writers)."""
    session = get_sessionmaker(read_only)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# SQLSTATEs of a transaction that lost a race and may simply run again: deadlock detected and
# serialization failure. SQLite's equivalent is "database is locked" past its busy timeout.
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})


def lost_a_race(error: BaseException) -> bool:
    """A transaction aborted by the database to break a deadlock or a serialization conflict (or
    SQLite's lock wait running out): running it again is correct and not the caller's concern."""
    if not isinstance(error, DBAPIError):
        return False
    orig = error.orig
    if getattr(orig, "sqlstate", None) in RETRYABLE_SQLSTATES:
        return True
    return "database is locked" in str(orig)


def run_transaction(work: Callable[..., T], /, *args: Any, read_only: bool = False, **kwargs: Any) -> T:
    """``work(session, *args, **kwargs)`` in a transaction of its own, committed; run again (up to 5
    times, with jittered backoff) when the database aborted it to break a deadlock or a
    serialization conflict, so such a race never reaches a caller as an error."""
    for attempt in range(5):
        try:
            with session_scope(read_only=read_only) as session:
                return work(session, *args, **kwargs)
        except DBAPIError as error:
            if not lost_a_race(error) or attempt == 4:
                raise
            logger.info("transaction lost a race (%s); running it again", str(error.orig).splitlines()[0])
            time.sleep(random.uniform(0.01, 0.05) * 2**attempt)
    raise AssertionError("unreachable")


def wake_file(url: Any) -> Path | None:
    """For a SQLite database file (the embedded default, one host): the file whose modification time
    wakes the dispatcher, Postgres's NOTIFY's stand-in. None for other databases."""
    url = make_url(str(url)) if not hasattr(url, "get_backend_name") else url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(f"{url.database}.wake")


def _touch_wake_file(session: Session) -> None:
    if session.info.pop("wake_dispatcher", False):
        path = wake_file(session.get_bind().url)
        if path is not None:
            with contextlib.suppress(OSError):  # a missed wake-up costs one interval, nothing more
                path.touch()


def _forget_wake(session: Session, *_: Any) -> None:
    session.info.pop("wake_dispatcher", None)


event.listen(Session, "after_commit", _touch_wake_file)
event.listen(Session, "after_rollback", _forget_wake)


def insert_ignoring_duplicates(session: Session, table: Table) -> Insert:
    """INSERT ... ON CONFLICT DO NOTHING, for rows a retried or redelivered write may repeat."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing()


def upsert(session: Session, table: Table, keys: tuple[str, ...]) -> Insert:
    """INSERT ... ON CONFLICT (keys) DO UPDATE every other column to the inserted row's values."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table)
    return statement.on_conflict_do_update(
        index_elements=list(keys),
        set_={
            column.name: statement.excluded[column.name]
            for column in table.columns
            if column.name not in keys
        },
    )


def among(session: Session, column: Any, values: Collection[str]) -> ColumnElement[bool]:
    """``column IN values`` for a long list of strings. On Postgres ``= ANY(array)``: one parameter,
    so the statement's text is the same whatever the list's length (SQLAlchemy renders and psycopg
    parses an IN list's parameters one by one: milliseconds a round for a few hundred stage keys)."""
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(literal(list(values), postgresql.ARRAY(String)))
    return column.in_(list(values))


def database_unreachable(error: BaseException) -> bool:
    """A connection problem (retry later), as opposed to a bad statement (a bug: fail now) or a lost
    race (:func:`lost_a_race`: run the transaction again)."""
    if lost_a_race(error):
        return False
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
        retry=retry_if_exception(
            lambda error: (
                isinstance(error, DBAPIError) and (database_unreachable(error) or lost_a_race(error))
            )
        ),
        wait=wait_exponential(multiplier=0.5, max=10.0) + wait_random(0, 0.25),
        stop=stop_after_delay(budget_s),
        before_sleep=log_retry,
        reraise=True,
    )
    return retrying(action)


def reset_caches() -> None:
    """Forget the cached settings, engine, sessions and checked API keys (tests switch databases)."""
    KEY_CACHE.clear()
    KNOWN_KEY_HASHES.clear()
    get_settings.cache_clear()
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()

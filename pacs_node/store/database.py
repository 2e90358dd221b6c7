"""Engines for the two backends, and the translation of their failures.

SQLite is set up for several writer threads: WAL (readers never block the
writer), a 30 s busy timeout, foreign keys on, and write transactions that
start with BEGIN IMMEDIATE, so a writer waits for the lock up front instead of
failing when it upgrades a read transaction. PostgreSQL runs at READ COMMITTED
and relies on row locks (FOR UPDATE [SKIP LOCKED]) where it matters.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.sql.dml import Insert

from pacs_node.errors import ConfigurationError, StoreUnavailableError
from pacs_node.store.schema import Base

SQLITE_BUSY_TIMEOUT_SECONDS = 30.0
POSTGRES_CONNECT_TIMEOUT_SECONDS = 10
# Execution option read by the SQLite "begin" hook.
_BEGIN_MODE = "pacs_node_sqlite_begin"
# How a writer's transaction begins on SQLite: with the write lock.
WRITER_BEGIN_MODE = "IMMEDIATE"


def create_store_engine(url: str) -> Engine:
    """An engine for `url`; transactions on it read (BEGIN DEFERRED on SQLite)."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigurationError("database URL cannot be parsed") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        connect_args: dict[str, Any] = {}
        # A URL may ask for a different wait, e.g. `?timeout=0.5`.
        if "timeout" not in parsed.query:
            connect_args["timeout"] = SQLITE_BUSY_TIMEOUT_SECONDS
        engine = create_engine(parsed, connect_args=connect_args)
        event.listen(engine, "connect", _configure_sqlite_connection)
        event.listen(engine, "begin", _begin_sqlite_transaction)
        return engine
    if backend == "postgresql":
        connect_args = {}
        if "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_SECONDS
        # pre_ping: connections broken by a server restart are replaced, not handed out.
        return create_engine(parsed, connect_args=connect_args, pool_pre_ping=True)
    raise ConfigurationError(f"unsupported database backend {backend!r}: use sqlite or postgresql")


def writer(engine: Engine) -> Engine:
    """The same engine and pool, with transactions that take the write lock at BEGIN."""
    return engine.execution_options(**{_BEGIN_MODE: WRITER_BEGIN_MODE})


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy emit BEGIN itself (see _begin_sqlite_transaction).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed row survives power loss; an acknowledged C-STORE depends on it.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _begin_sqlite_transaction(connection: Connection) -> None:
    mode = connection.get_execution_options().get(_BEGIN_MODE, "DEFERRED")
    connection.exec_driver_sql(f"BEGIN {mode}")


def insert_ignoring_conflicts(dialect: str, entity: type[Base]) -> Insert:
    """INSERT ... ON CONFLICT DO NOTHING, the race-free way to create a row once."""
    if dialect == "postgresql":
        return postgresql.insert(entity).on_conflict_do_nothing()
    return sqlite.insert(entity).on_conflict_do_nothing()


@contextmanager
def translated_errors() -> Iterator[None]:
    """Turn "the database is not there" into StoreUnavailableError.

    Only connection-level failures are translated; other database errors are
    bugs and propagate. Messages carry the driver's first line, never the SQL
    or its parameters.
    """
    try:
        yield
    # sqlite3's own: ingest.NewInstanceWriter runs on the driver's connection.
    except (OperationalError, PoolTimeoutError, sqlite3.OperationalError) as exc:
        raise StoreUnavailableError(f"job store unavailable: {_reason(exc)}") from exc
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        raise StoreUnavailableError(f"job store connection lost: {_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    lines = str(cause).strip().splitlines()
    return (lines[0] if lines else type(cause).__name__)[:200]

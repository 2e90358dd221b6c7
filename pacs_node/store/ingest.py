"""Recording a received instance and keeping its series row up to date.

This is the receive path's only database work, once per C-STORE, so it runs
on a Core connection (no ORM unit of work) with three statements built once
per dialect: building a statement costs SQLAlchemy about twice what running it
costs SQLite (measured: 0.98 ms per instance before, 0.39 ms after).
Rows are created with INSERT ... ON CONFLICT DO NOTHING and counters change
with `count = count + n`, so receiver threads (or processes) recording the
same series at once neither collide nor lose an update.

On SQLite a new instance, the common case, goes further: `NewInstanceWriter`
runs the same three statements, compiled once with SQLAlchemy's own SQL and
parameter conversions, on the sqlite3 connection itself. SQLAlchemy's work
around each statement and transaction was more than half of the row's time
(0.39 -> 0.22 ms per row alone; ingest 1.10x, tests/benchmarks/README.md). Anything else, a
repeat or PostgreSQL (whose connection failures SQLAlchemy must see to replace
the connection), takes `record_instance`. Being outside SQLAlchemy's execution, these
writes run no engine events and are not echoed by its logging.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import Connection, Engine, Insert, bindparam, case, select, update
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import ReturningInsert, ReturningUpdate
from sqlalchemy.sql.expression import ClauseElement

from pacs_node.store.database import WRITER_BEGIN_MODE, insert_ignoring_conflicts
from pacs_node.store.records import InstanceOutcome, NewInstance, RecordedInstance, SeriesState
from pacs_node.store.schema import InstanceRow, SeriesRow, UTCDateTime


def record_instance(connection: Connection, instance: NewInstance) -> RecordedInstance:
    statements = _statements(connection.dialect.name)
    values = _row_values(instance)
    connection.execute(statements.create_series, values)
    inserted = connection.execute(statements.insert_instance, values).first()
    if inserted is not None:
        classifiable = connection.execute(
            statements.add_to_series, _new_in_series(instance)
        ).scalar_one()
        return RecordedInstance(InstanceOutcome.NEW, classifiable_in_series=classifiable)

    existing = connection.execute(
        select(
            InstanceRow.sha256,
            InstanceRow.series_instance_uid,
            InstanceRow.classifiable,
            InstanceRow.path,
            InstanceRow.removed_at,
        )
        .where(InstanceRow.sop_instance_uid == instance.sop_instance_uid)
        .with_for_update()
    ).one()
    if existing.sha256 == instance.sha256:
        if existing.removed_at is not None:
            # Retention removed this content after its series was reported; the
            # copy just written would be a file no row keeps.
            return RecordedInstance(InstanceOutcome.IDENTICAL, instance.path)
        return RecordedInstance(InstanceOutcome.IDENTICAL)

    connection.execute(
        update(InstanceRow)
        .where(InstanceRow.sop_instance_uid == instance.sop_instance_uid)
        .values({**values, "removed_at": None})
    )
    old_series, old_classifiable = existing.series_instance_uid, int(existing.classifiable)
    new_classifiable = int(instance.classifiable)
    if old_series == instance.series_instance_uid:
        classifiable = _add_to_series(
            connection, old_series, 0, new_classifiable - old_classifiable, instance.received_at
        )
    else:
        # The series it left changed as well: reopen it so it is reported again.
        _add_to_series(connection, old_series, -1, -old_classifiable, None)
        classifiable = _add_to_series(
            connection, instance.series_instance_uid, 1, new_classifiable, instance.received_at
        )
    replaced = existing.path if existing.path != instance.path else None
    return RecordedInstance(InstanceOutcome.CHANGED, replaced, classifiable)


@dataclass(frozen=True)
class _Statements:
    create_series: Insert
    insert_instance: ReturningInsert[str]
    add_to_series: ReturningUpdate[int]


@cache
def _statements(dialect: str) -> _Statements:
    """The receive path's statements, built once: building one costs more than running it."""
    # Create an empty open series row unless it exists; counts come from add_to_series.
    create_series = insert_ignoring_conflicts(dialect, SeriesRow).values(
        series_instance_uid=bindparam("series_instance_uid"),
        study_instance_uid=bindparam("study_instance_uid"),
        calling_ae=bindparam("calling_ae"),
        state=SeriesState.OPEN,
        revision=0,
        instance_count=0,
        classifiable_count=0,
        first_received_at=bindparam("received_at"),
        last_received_at=bindparam("received_at"),
    )
    columns = [field.name for field in fields(NewInstance)]
    insert_instance = (
        insert_ignoring_conflicts(dialect, InstanceRow)
        .values({column: bindparam(column) for column in columns})
        .returning(InstanceRow.sop_instance_uid)
    )
    # Count changes reopen the series: its content changed. Threads commit out
    # of order, so last_received_at keeps the latest arrival (NULL: unchanged).
    received = bindparam("p_received", type_=UTCDateTime())
    add_to_series = (
        update(SeriesRow)
        .where(SeriesRow.series_instance_uid == bindparam("p_series"))
        .values(
            instance_count=SeriesRow.instance_count + bindparam("p_instances"),
            classifiable_count=SeriesRow.classifiable_count + bindparam("p_classifiable"),
            state=SeriesState.OPEN,
            completed_at=None,
            skip_reason=None,
            last_received_at=case(
                (SeriesRow.last_received_at < received, received),
                else_=SeriesRow.last_received_at,
            ),
        )
        .returning(SeriesRow.classifiable_count)
    )
    return _Statements(create_series, insert_instance, add_to_series)


def _row_values(instance: NewInstance) -> dict[str, Any]:
    """The statements' parameters for `instance`, by column name."""
    # Not dataclasses.asdict: its deep copy took a third of record_instance's CPU time.
    return {field.name: getattr(instance, field.name) for field in fields(instance)}


def _series_change(
    series_instance_uid: str, instances: int, classifiable: int, received_at: datetime | None
) -> dict[str, Any]:
    """add_to_series's parameters."""
    return {
        "p_series": series_instance_uid,
        "p_instances": instances,
        "p_classifiable": classifiable,
        "p_received": received_at,
    }


def _new_in_series(instance: NewInstance) -> dict[str, Any]:
    """add_to_series's parameters for a new instance of the series."""
    return _series_change(
        instance.series_instance_uid, 1, int(instance.classifiable), instance.received_at
    )


def _add_to_series(
    connection: Connection,
    series_instance_uid: str,
    instances: int,
    classifiable: int,
    received_at: datetime | None,
) -> int:
    """Change the series' counts; returns its classifiable count after the change."""
    return connection.execute(
        _statements(connection.dialect.name).add_to_series,
        _series_change(series_instance_uid, instances, classifiable, received_at),
    ).scalar_one()


class NewInstanceWriter:
    """Records new instances on SQLite through the sqlite3 connection (see the module
    docstring); `record` returns None, having written nothing, for an instance the
    store already has."""

    def __init__(self, engine: Engine) -> None:
        if engine.dialect.name != "sqlite":
            raise ValueError(f"NewInstanceWriter serves SQLite, not {engine.dialect.name}")
        self._engine = engine
        statements = _statements("sqlite")
        self._create_series = _DriverStatement(statements.create_series, engine.dialect)
        self._insert_instance = _DriverStatement(statements.insert_instance, engine.dialect)
        self._add_to_series = _DriverStatement(statements.add_to_series, engine.dialect)

    def record(self, instance: NewInstance) -> RecordedInstance | None:
        """Raises sqlite3's own errors; `database.translated_errors` turns those that
        mean "the database is not there" (OperationalError)."""
        values = _row_values(instance)
        pooled = self._engine.raw_connection()
        cursor = pooled.cursor()
        try:
            # The writer's transaction: the write lock up front (see database.writer).
            cursor.execute(f"BEGIN {WRITER_BEGIN_MODE}")
            try:
                cursor.execute(*self._create_series.bound(values))
                if cursor.execute(*self._insert_instance.bound(values)).fetchone() is None:
                    pooled.rollback()  # a repeat: nothing written
                    return None
                (classifiable,) = cursor.execute(
                    *self._add_to_series.bound(_new_in_series(instance))
                ).fetchone()
                cursor.execute("COMMIT")
            except BaseException:
                # Here, not left to the pool: whether the pool rolls back a connection
                # in autocommit mode as it takes it back is an engine setting.
                pooled.rollback()
                raise
        finally:
            cursor.close()
            pooled.close()
        return RecordedInstance(InstanceOutcome.NEW, classifiable_in_series=classifiable)


class _DriverStatement:
    """A Core statement's SQL for one dialect, with its parameters converted as
    SQLAlchemy would convert them (bind processors: UTC datetimes, enums, booleans)."""

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        if not isinstance(compiled, SQLCompiler) or compiled.positiontup is None:
            raise ValueError(f"{dialect.name}: expected SQL with positional parameters")
        self._compiled = compiled
        self._names = tuple(compiled.positiontup)
        # The dialect's own form of each type, as SQLAlchemy converts: SQLite's
        # DATETIME writes fixed-width text, where sqlite3 would drop zero microseconds.
        self._processors = tuple(
            compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
            for name in self._names
        )

    def bound(self, values: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
        """The SQL and its positional parameters for `values` (by bind name)."""
        # Unescaped, as positiontup names them (SQLAlchemy's own execution does the same).
        given = self._compiled.construct_params(values, escape_names=False)
        assert given is not None  # None only for a compiled DDL statement
        return self._compiled.string, tuple(
            given[name] if process is None else process(given[name])
            for name, process in zip(self._names, self._processors, strict=True)
        )

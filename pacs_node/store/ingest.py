"""Recording a received instance and keeping its series row up to date.

This is the receive path's only database work, once per C-STORE, so it runs
on a Core connection (no ORM unit of work) with at most three statements.
Rows are created with INSERT ... ON CONFLICT DO NOTHING and counters change
with `count = count + n`, so receiver threads (or processes) recording the
same series at once neither collide nor lose an update.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime

from sqlalchemy import Connection, case, literal, select, update

from pacs_node.store.database import insert_ignoring_conflicts
from pacs_node.store.records import InstanceOutcome, NewInstance, RecordedInstance, SeriesState
from pacs_node.store.schema import InstanceRow, SeriesRow, UTCDateTime


def record_instance(connection: Connection, instance: NewInstance) -> RecordedInstance:
    values = asdict(instance)
    _create_series(connection, instance)
    inserted = connection.execute(
        insert_ignoring_conflicts(connection, InstanceRow)
        .values(values)
        .returning(InstanceRow.sop_instance_uid)
    ).first()
    if inserted is not None:
        _add_to_series(
            connection,
            instance.series_instance_uid,
            1,
            int(instance.classifiable),
            instance.received_at,
        )
        return RecordedInstance(InstanceOutcome.NEW)

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
        _add_to_series(
            connection, old_series, 0, new_classifiable - old_classifiable, instance.received_at
        )
    else:
        # The series it left changed as well: reopen it so it is reported again.
        _add_to_series(connection, old_series, -1, -old_classifiable, None)
        _add_to_series(
            connection, instance.series_instance_uid, 1, new_classifiable, instance.received_at
        )
    replaced = existing.path if existing.path != instance.path else None
    return RecordedInstance(InstanceOutcome.CHANGED, replaced)


def _create_series(connection: Connection, instance: NewInstance) -> None:
    """Create an empty open series row unless it exists; counts come from _add_to_series."""
    connection.execute(
        insert_ignoring_conflicts(connection, SeriesRow).values(
            series_instance_uid=instance.series_instance_uid,
            study_instance_uid=instance.study_instance_uid,
            calling_ae=instance.calling_ae,
            state=SeriesState.OPEN,
            revision=0,
            instance_count=0,
            classifiable_count=0,
            first_received_at=instance.received_at,
            last_received_at=instance.received_at,
        )
    )


def _add_to_series(
    connection: Connection,
    series_instance_uid: str,
    instances: int,
    classifiable: int,
    received_at: datetime | None,
) -> None:
    """Apply count changes and (re)open the series: its content changed."""
    values: dict[str, object] = {
        "instance_count": SeriesRow.instance_count + instances,
        "classifiable_count": SeriesRow.classifiable_count + classifiable,
        "state": SeriesState.OPEN,
        "completed_at": None,
        "skip_reason": None,
    }
    if received_at is not None:
        # Threads commit out of order; keep the latest arrival.
        received = literal(received_at, UTCDateTime())
        values["last_received_at"] = case(
            (SeriesRow.last_received_at < received, received),
            else_=SeriesRow.last_received_at,
        )
    connection.execute(
        update(SeriesRow).where(SeriesRow.series_instance_uid == series_instance_uid).values(values)
    )

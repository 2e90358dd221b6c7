"""Which received instances retention may remove, and marking them removed.

A series' instances may go once the series is delivered and nothing has
arrived for it for the retention period (`last_received_at` before the
cutoff). Delivered means:

- the series is COMPLETE and its current revision has a result (the SR), or
  it is SKIPPED (no classifiable instance: nothing will ever be reported);
- every job of the current revision is done: its inference and its send to
  each destination (with no destinations there are none, and the stored SR is
  enough). A send that is queued, running, waiting for a retry or dead keeps
  the files;
- no job of an earlier revision is still queued or running, as an inference
  reads the series' files whatever its revision.

An OPEN series is never delivered: a late instance reopened it, and its next
revision is reported from the instances whose files are still there (or
skipped when no classifiable one is left, see `assembly`).

Rows stay: `removed_at` records that the file is gone. They are marked in
this transaction and the caller deletes the files after the commit, so a row
that says its file is there is never wrong; a crash in between leaves files no
row keeps, never a row without its file.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, exists, or_, select
from sqlalchemy.orm import Session

from pacs_node.store.records import Instance, JobStatus, SeriesState
from pacs_node.store.schema import InstanceRow, JobRow, ResultRow, SeriesRow


def expire_instances(
    session: Session, received_before: datetime, now: datetime, limit: int
) -> list[Instance]:
    unfinished_job = exists().where(
        JobRow.series_instance_uid == SeriesRow.series_instance_uid,
        or_(
            JobRow.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
            and_(JobRow.revision == SeriesRow.revision, JobRow.status != JobStatus.DONE),
        ),
    )
    reported = exists().where(
        ResultRow.series_instance_uid == SeriesRow.series_instance_uid,
        ResultRow.revision == SeriesRow.revision,
    )
    # Locked and skipping rows locked elsewhere: concurrent sweepers share the
    # work, and a receiver replacing one of these instances keeps its row.
    # SQLite serialises writers by BEGIN IMMEDIATE instead.
    instances = session.scalars(
        select(InstanceRow)
        .join(SeriesRow, SeriesRow.series_instance_uid == InstanceRow.series_instance_uid)
        .where(
            InstanceRow.removed_at.is_(None),
            SeriesRow.last_received_at < received_before,
            or_(
                SeriesRow.state == SeriesState.SKIPPED,
                and_(SeriesRow.state == SeriesState.COMPLETE, reported),
            ),
            ~unfinished_job,
        )
        .order_by(InstanceRow.series_instance_uid, InstanceRow.sop_instance_uid)
        .limit(limit)
        .with_for_update(skip_locked=True, of=InstanceRow)
    ).all()
    for instance in instances:
        instance.removed_at = now
    return [instance.to_record() for instance in instances]

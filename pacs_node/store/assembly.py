"""Deciding that an open series is complete and handing it to inference.

DICOM has no end-of-series message. A series is ready after a quiet period
without new instances (per calling AE if configured), or earlier when its
classifiable instances say they are all there: each states the same
ImagesInAcquisition, it equals their number, and their InstanceNumbers are
distinct and contiguous.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta

from sqlalchemy import distinct, exists, func, select
from sqlalchemy.orm import Session

from pacs_node.store.jobs import enqueue
from pacs_node.store.records import JobKind, Series, SeriesState
from pacs_node.store.schema import InstanceRow, SeriesRow

NO_CLASSIFIABLE_INSTANCE = "no classifiable instance"
CLASSIFIABLE_FILES_REMOVED = "no classifiable instance left: retention removed their files"


def complete_ready_series(
    session: Session,
    now: datetime,
    quiet_seconds: float,
    quiet_seconds_by_ae: Mapping[str, float],
    max_attempts: int,
) -> list[Series]:
    # Locked, so a second sweeper skips these rows and a receiver reopening
    # one waits for this transaction. SQLite serialises by BEGIN IMMEDIATE.
    open_series = session.scalars(
        select(SeriesRow)
        .where(SeriesRow.state == SeriesState.OPEN)
        .order_by(SeriesRow.first_received_at)
        .with_for_update(skip_locked=True)
    ).all()
    if not open_series:
        return []
    complete_by_content = _complete_by_content(session)
    completed = []
    for series in open_series:
        quiet = timedelta(seconds=quiet_seconds_by_ae.get(series.calling_ae, quiet_seconds))
        is_quiet = series.last_received_at <= now - quiet
        if not is_quiet and series.series_instance_uid not in complete_by_content:
            continue
        series.revision += 1
        series.completed_at = now
        if series.classifiable_count == 0:
            series.state = SeriesState.SKIPPED
            series.skip_reason = NO_CLASSIFIABLE_INSTANCE
        elif not _has_classifiable_file(session, series):
            series.state = SeriesState.SKIPPED
            series.skip_reason = CLASSIFIABLE_FILES_REMOVED
        else:
            series.state = SeriesState.COMPLETE
            enqueue(
                session,
                JobKind.INFER,
                series.series_instance_uid,
                series.revision,
                now,
                max_attempts,
            )
        completed.append(series.to_record())
    return completed


def _has_classifiable_file(session: Session, series: SeriesRow) -> bool:
    """Whether inference has a file to read.

    A late instance may reopen a series whose other files retention removed.
    """
    return bool(
        session.scalar(
            select(
                exists().where(
                    InstanceRow.series_instance_uid == series.series_instance_uid,
                    InstanceRow.classifiable.is_(True),
                    InstanceRow.removed_at.is_(None),
                )
            )
        )
    )


def _complete_by_content(session: Session) -> set[str]:
    """UIDs of open series whose classifiable instances are all there, by their own account."""
    count = func.count()
    expected = InstanceRow.images_in_acquisition
    number = InstanceRow.instance_number
    complete = (
        select(InstanceRow.series_instance_uid)
        .join(SeriesRow, SeriesRow.series_instance_uid == InstanceRow.series_instance_uid)
        .where(SeriesRow.state == SeriesState.OPEN, InstanceRow.classifiable.is_(True))
        .group_by(InstanceRow.series_instance_uid)
        .having(
            # Every instance states the count (COUNT skips NULL) and all agree with it.
            func.count(expected) == count,
            func.min(expected) == count,
            func.max(expected) == count,
            # Distinct, non-null InstanceNumbers without gaps.
            func.count(distinct(number)) == count,
            func.max(number) - func.min(number) + 1 == count,
        )
    )
    return set(session.scalars(complete))

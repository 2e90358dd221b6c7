"""Series assembly: decide when a series is complete and queue its inference.

DICOM has no end-of-series message. The store marks a series complete after
a quiet period with no new instance (per calling AE if configured) or earlier
when its content says so; this module runs that sweep and logs the outcome.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from pacs_node.config import SeriesSettings
from pacs_node.store import JobStore, Series, SeriesState

log = logging.getLogger(__name__)


class Assembler:
    def __init__(self, store: JobStore, settings: SeriesSettings, max_attempts: int) -> None:
        self.store = store
        self.settings = settings
        self.max_attempts = max_attempts

    def sweep(self, now: datetime | None = None) -> list[Series]:
        now = now or datetime.now(timezone.utc)
        completed = self.store.complete_ready_series(
            now,
            self.settings.quiet_seconds,
            self.settings.quiet_seconds_by_ae,
            max_attempts=self.max_attempts,
        )
        for series in completed:
            if series.state is SeriesState.SKIPPED:
                log.info(
                    "series complete, not classified",
                    extra={
                        "action": "assemble",
                        "series_uid": series.series_instance_uid,
                        "count": series.instance_count,
                        "reason": series.skip_reason,
                    },
                )
            else:
                # Seconds from its last instance: the quiet period, or far less
                # when the content said the series was complete.
                waited = now - series.last_received_at
                log.info(
                    f"series complete (revision {series.revision}), queued for inference",
                    extra={
                        "action": "assemble",
                        "series_uid": series.series_instance_uid,
                        "count": series.classifiable_count,
                        "wait_seconds": f"{waited.total_seconds():.2f}",
                    },
                )
        return completed

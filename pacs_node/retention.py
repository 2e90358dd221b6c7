"""Retention: delete received instance files once their series is delivered and old.

The job store decides which instances may go (`JobStore.expire_instances`:
delivered series, last instance older than `retention.keep_days`) and marks
their rows removed; the rows, jobs and results stay as the history, and so
do the SRs under `reports/`. The files go after that commit, then the series
and study folders left empty. Any number of processes may sweep at once: the
store hands each instance to one of them.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from pathlib import PurePosixPath

from pacs_node.storage import Storage
from pacs_node.store import JobStore

log = logging.getLogger(__name__)

# Instances marked per transaction: a short hold on SQLite's write lock.
BATCH_SIZE = 500


class Retention:
    def __init__(
        self, store: JobStore, storage: Storage, keep_days: float, batch_size: int = BATCH_SIZE
    ) -> None:
        if keep_days <= 0:
            raise ValueError(f"keep_days must be positive, got {keep_days}")
        self.store = store
        self.storage = storage
        self.keep = timedelta(days=keep_days)
        self.batch_size = batch_size

    def sweep(self, now: datetime | None = None) -> int:
        """Delete the files of delivered series last received before `now - keep_days`.

        Returns how many files were deleted.
        """
        now = now or datetime.now(timezone.utc)
        deleted = 0
        series: set[str] = set()
        folders: set[str] = set()
        while True:
            batch = self.store.expire_instances(now - self.keep, now, self.batch_size)
            for instance in batch:
                series.add(instance.series_instance_uid)
                folders.add(str(PurePosixPath(instance.path).parent))
                try:
                    self.storage.remove(instance.path)
                except OSError as error:
                    # The row says removed already; the file stays behind, unreferenced.
                    log.warning(
                        "cannot delete instance file",
                        extra={
                            "action": "retention",
                            "sop_uid": instance.sop_instance_uid,
                            "reason": error.strerror,
                        },
                    )
                else:
                    deleted += 1
            if len(batch) < self.batch_size:
                break
        for folder in sorted(folders):
            self.storage.remove_empty_folders(folder)
        if series:
            log.info(
                f"retention deleted {deleted} instance file(s) of {len(series)} delivered series",
                extra={"action": "retention", "count": deleted},
            )
        return deleted

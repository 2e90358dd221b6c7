"""Back-pressure: whether the receiver may accept new data right now.

A node that fills its disk or queues more work than it can ever finish harms
everything else on the machine; a C-STORE refused with 0xA700 ("out of
resources") tells the sender to try again later, which every PACS does. The
checks are cached for a second so that the receive path stays cheap.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pacs_node.errors import StoreUnavailableError

log = logging.getLogger(__name__)

CHECK_INTERVAL_SECONDS = 1.0


class Admission:
    def __init__(
        self,
        storage_root: Path,
        min_free_bytes: int,
        queue_depth: Callable[[], int],
        max_queue_depth: int,
    ) -> None:
        self.storage_root = storage_root
        self.min_free_bytes = min_free_bytes
        self.queue_depth = queue_depth
        self.max_queue_depth = max_queue_depth
        self._lock = threading.Lock()
        self._checked_at = float("-inf")
        self._refusal: str | None = None

    def refusal(self) -> str | None:
        """Why new data must be refused now, or None to accept it."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= CHECK_INTERVAL_SECONDS:
                self._checked_at = now
                self._update(self._check())
            return self._refusal

    def _check(self) -> str | None:
        free = shutil.disk_usage(self.storage_root).free
        if free < self.min_free_bytes:
            return (
                f"free disk {free // 2**20} MiB is below storage.min_free_mb "
                f"{self.min_free_bytes // 2**20} MiB"
            )
        try:
            depth = self.queue_depth()
        except StoreUnavailableError:
            return None  # the store call in the C-STORE itself will answer 0xA700
        if depth > self.max_queue_depth:
            return f"{depth} jobs queued, above queue.max_depth {self.max_queue_depth}"
        return None

    def _update(self, refusal: str | None) -> None:
        if refusal and not self._refusal:
            log.warning("refusing new instances", extra={"action": "admit", "reason": refusal})
        elif self._refusal and not refusal:
            log.info("accepting new instances again", extra={"action": "admit"})
        self._refusal = refusal

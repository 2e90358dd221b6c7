"""Inference gives way to receiving: the infer process waits between batches while C-STOREs arrive.

Why: at CPU priority 19 the infer process still slowed receiving on two cores
to 0.77 of its idle rate (`tests.benchmarks.ingest_under_load`); with the infer
process stopped (SIGSTOP) during the same sends it was 1.09 (3 alternating rounds
each, scratch variant of the benchmark). Priority decides who runs, not what two
running processes do to each other's caches and memory bandwidth; only not
running in the meantime does.

The receiver records when it last took a C-STORE in shared memory (a RawValue:
no lock that a killed process could leave held); the infer process reads it
after each batch. A wait is bounded, so a sender that never stops slows
classification but never stops it.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import time

_CONTEXT = multiprocessing.get_context("spawn")
# A C-STORE this recent means the receiver is busy: within one association the
# next follows in milliseconds.
BUSY_SECONDS = 0.1
_POLL_SECONDS = 0.01


class Reception:
    """When the receiver last took a C-STORE; shared with a spawned infer process."""

    def __init__(self) -> None:
        # CLOCK_MONOTONIC is one clock for every process on the machine.
        self._last_store = _CONTEXT.RawValue(ctypes.c_double, -math.inf)

    def stored(self) -> None:
        """The receiver took a C-STORE now."""
        self._last_store.value = time.monotonic()

    def busy(self) -> bool:
        return time.monotonic() - self._last_store.value < BUSY_SECONDS

    def give_way(self, limit_seconds: float) -> float:
        """Wait while the receiver is busy, at most `limit_seconds`; the seconds waited."""
        started = time.monotonic()
        while self.busy() and time.monotonic() - started < limit_seconds:
            time.sleep(_POLL_SECONDS)
        return time.monotonic() - started

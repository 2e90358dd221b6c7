"""How a `serve` process learns that it must stop: SIGTERM or SIGINT, waited for without a lock.

Why not a handler that sets a `threading.Event`, as this node first did: Python
runs a signal's handler in the main thread between two bytecodes, and when those
lie inside `Event.wait`, that thread already holds the Event's lock, so `set()`
waits on its own thread for good. A signal sent just as the main thread begins
to wait lands there, as when an infer process is told to stop moments after it
reported ready. Here the handler does nothing; Python's own C-level handler
writes the signal's number to a pipe (`signal.set_wakeup_fd`), and `wait` reads it.
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Iterable
from types import FrameType


def _nothing(signum: int, frame: FrameType | None) -> None:
    """A Python-level handler, so that the signal's number reaches the pipe."""


class StopSignals:
    def __init__(self, signals: Iterable[signal.Signals]) -> None:
        """From the main thread (Python's rule for signal handlers), once per process."""
        self._signals = frozenset(signals)
        self._reader, writer = os.pipe()
        os.set_blocking(writer, False)  # set_wakeup_fd's requirement: a handler never blocks
        signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
        for stop_signal in self._signals:
            signal.signal(stop_signal, _nothing)

    def wait(self, timeout: float | None = None) -> signal.Signals | None:
        """The stop signal received since the last call, or None after `timeout` seconds
        (or sooner, when a signal of another kind arrived)."""
        ready, _, _ = select.select([self._reader], [], [], timeout)
        if not ready:
            return None
        for number in os.read(self._reader, 512):
            if number in self._signals:
                return signal.Signals(number)
        return None

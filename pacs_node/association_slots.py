"""dicom.max_associations, counted across every receiving process of one `serve`.

With dicom.receive_processes above 1, several processes accept associations
from one listening socket; the limit is still the node's, not each process's.
Each process counts its associations in its own cell of shared memory, and
taking a slot adds up every cell. A lock file makes that check-and-take one
step across processes: the kernel drops the lock of a process that dies
holding it, where a multiprocessing lock would stay held for good (the reason
Reception and PipeWake use no lock either).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import fcntl
import multiprocessing
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CONTEXT = multiprocessing.get_context("spawn")


class AssociationSlots:
    def __init__(self, limit: int, processes: int = 1, lock_file: Path | None = None) -> None:
        """`lock_file` is needed with more than one process; any path they all can open."""
        if processes > 1 and lock_file is None:
            raise ValueError("several receiving processes need a lock file to share the limit")
        self.limit = limit
        self._counts = _CONTEXT.RawArray(ctypes.c_int, processes)
        self._lock_file = lock_file
        self._index = 0
        self._local = threading.Lock()

    def for_process(self, index: int) -> AssociationSlots:
        """The same slots as the receiving process numbered `index` (0: the parent) takes them."""
        if not 0 <= index < len(self._counts):
            raise ValueError(f"process {index} is not one of {len(self._counts)}")
        view = copy.copy(self)
        view._index = index
        return view

    def take(self) -> bool:
        """One association more, if the limit allows it."""
        with self._exclusive():
            if sum(self._counts) >= self.limit:
                return False
            self._counts[self._index] += 1
            return True

    def give_back(self) -> None:
        """One association of this process has ended."""
        with self._exclusive():
            self._counts[self._index] -= 1

    def clear(self) -> None:
        """This process has ended, and its associations with it (called by its parent)."""
        with self._exclusive():
            self._counts[self._index] = 0

    def in_use(self) -> int:
        return sum(self._counts)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._local:
            if self._lock_file is None:
                yield
                return
            # Opened by name each time: flock excludes other open files, in this
            # process or another, and a file removed meanwhile is made again.
            with self._lock_file.open("a") as file:
                fcntl.flock(file, fcntl.LOCK_EX)
                # Touched: cleaners of /tmp remove files left unchanged for days.
                os.utime(file.fileno())
                yield

    # A threading lock cannot cross into a spawned process; each process has its own.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_local"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.Lock()

"""The benchmarks' own parts: CPU figures (user and kernel time read apart from /proc),
and the copies of the real series they send."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.benchmarks.receivers import cpu_times
from tests.dicom_data import renamed_series

# Pure Python arithmetic: user time. Reading /dev/zero in 1 MB pieces: the kernel
# fills the buffers, so nearly all of that time is system time.
USER_WORK = "sum(range(30_000_000))"
KERNEL_WORK = (
    "import os\n"
    "zero = os.open('/dev/zero', os.O_RDONLY)\n"
    "for _ in range(20_000): os.read(zero, 1 << 20)"
)


@contextmanager
def finished(work: str) -> Iterator[int]:
    """A Python process that has done `work` and waits; its pid."""
    child = subprocess.Popen(
        [sys.executable, "-c", f"{work}\nprint('done', flush=True)\ninput()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "done\n"
        yield child.pid
    finally:
        child.kill()
        child.wait()


def test_user_and_kernel_time_are_told_apart() -> None:
    with finished(USER_WORK) as pid:
        computing = cpu_times(pid)
    with finished(KERNEL_WORK) as pid:
        reading = cpu_times(pid)
    assert computing.user > 0.1 and computing.user > 3 * computing.kernel, computing
    assert reading.kernel > 0.1 and reading.kernel > 3 * reading.user, reading
    assert computing.total == computing.user + computing.kernel


def test_a_series_cannot_be_copied_from_a_folder_without_one(tmp_path: Path) -> None:
    # The ingest benchmark copies the series until it has enough instances: from a
    # folder without the shared data it made empty folders until it was stopped.
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.dcm files"):
        renamed_series(tmp_path / "elsewhere", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()

"""Receivers under test for the ingest benchmarks, each a real process.

Each receiver is started, measured (wall time of one storescu run, CPU
seconds (and the kernel's part of them) and peak RSS of the receiver process
from /proc, CPU seconds of the storescu processes) and stopped.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tests.peers import dcmtk_environment, free_port, tool
from tests.polling import wait_for
from tests.processes import NodeProcess, descendants, echo


@dataclass(frozen=True)
class Measurement:
    seconds: float
    images: int
    megabytes: float
    cpu_seconds: float
    # The kernel's part of cpu_seconds (system time: socket reads, file writes,
    # syncs); the rest ran the receiver's own code.
    kernel_cpu_seconds: float
    peak_rss_mb: float
    sender_cpu_seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    @property
    def cores_busy(self) -> float:
        """Receiver and senders together, in cores: near the machine's count, the
        CPU is what limits the rate (the kernel's share of loopback TCP included)."""
        return (self.cpu_seconds + self.sender_cpu_seconds) / self.seconds

    @property
    def megabytes_per_second(self) -> float:
        return self.megabytes / self.seconds


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds in user space and in the kernel."""

    user: float
    kernel: float

    @property
    def total(self) -> float:
        return self.user + self.kernel

    def __add__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.user + other.user, self.kernel + other.kernel)

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.user - other.user, self.kernel - other.kernel)


NO_CPU = CpuTimes(0.0, 0.0)
# What `_over_tree` adds up over a process tree.
_Sum = TypeVar("_Sum", float, CpuTimes)


def cpu_times(pid: int) -> CpuTimes:
    """The CPU times of `pid`, its reaped children's included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    # utime, stime, cutime, cstime: fields 14-17 of /proc/PID/stat (1-based).
    user, kernel, children_user, children_kernel = (int(value) for value in fields[11:15])
    return CpuTimes((user + children_user) / ticks, (kernel + children_kernel) / ticks)


def peak_rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmHWM")


def resident_mb(pid: int) -> float:
    """The RSS of `pid` now; 0 once it has ended."""
    with contextlib.suppress(FileNotFoundError):
        return _status_mb(pid, "VmRSS")
    return 0.0


def _status_mb(pid: int, field: str) -> float:
    """A size from /proc/PID/status in MB; 0 where it has none (a zombie)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def tree_peak_rss_mb(pid: int) -> float:
    """Peak RSS of a process plus its descendants' (`serve` classifies in a child):
    the sum of the peaks, an upper bound on their peak together."""
    return _over_tree(pid, peak_rss_mb)


def tree_resident_mb(pid: int) -> float:
    """The RSS of a process plus its descendants' now."""
    return _over_tree(pid, resident_mb)


def _over_tree(pid: int, measure: Callable[[int], _Sum]) -> _Sum:
    """`measure` of a process plus that of each descendant still there."""
    total = measure(pid)
    for child in descendants(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # ended since listed
            total += measure(child)
    return total


class Receiver(ABC):
    """A receiver process: start it, send to it, read its costs, stop it."""

    name = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.ae_title = "BENCH"
        self.process: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def start(self) -> None: ...

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu_times(self) -> CpuTimes:
        """CPU times the receiver has used so far, in all its processes (the node's
        receiving children run all along; DCMTK's forked ones end and are counted
        in their parent)."""
        return _over_tree(self.pid, cpu_times)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=60)
            self.process = None

    def _spawn(self, command: list[str], environment: dict[str, str] | None = None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            command,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.workdir,
        )
        wait_for(lambda: echo(self.port, self.ae_title), 60, f"{self.name} to answer C-ECHO")


class DcmtkStoreSCP(Receiver):
    """DCMTK's storescp; with `fork`, one child process per association, the way it
    serves associations in parallel (without it, it takes one association at a time
    and the others wait to be accepted)."""

    name = "dcmtk storescp"

    def __init__(self, workdir: Path, fork: bool = False) -> None:
        super().__init__(workdir)
        self.fork = fork

    def start(self) -> None:
        self._spawn(
            [
                tool("storescp"),
                *(["--fork"] if self.fork else []),
                "--aetitle",
                self.ae_title,
                "--output-directory",
                str(self.workdir),
                str(self.port),
            ],
            dcmtk_environment(),
        )

    def cpu_times(self) -> CpuTimes:
        """With its children, running or exited but not yet reaped (reaped ones are
        in the parent's own figure); read again if one was reaped meanwhile."""
        while True:
            parent = cpu_times(self.pid)
            try:
                children = sum(map(cpu_times, descendants(self.pid)), NO_CPU)
            except (FileNotFoundError, ProcessLookupError):  # a child ended as it was read
                continue
            if cpu_times(self.pid) == parent:
                return parent + children


class PynetdicomStoreSCP(Receiver):
    name = "pynetdicom storescp"

    def start(self) -> None:
        self._spawn(
            [
                sys.executable,
                "-m",
                "pynetdicom",
                "storescp",
                "-aet",
                self.ae_title,
                "-od",
                str(self.workdir),
                str(self.port),
            ]
        )


class PacsNodeReceive(Receiver):
    name = "pacs-node receive"

    def __init__(
        self,
        workdir: Path,
        model: Path,
        stages: str = "receive",
        settings: dict[str, str] | None = None,
    ) -> None:
        super().__init__(workdir)
        self.node = NodeProcess(
            workdir / "var", model, port=self.port, stages=stages, settings=settings
        )
        self.ae_title = "PACSNODE"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.node.start()

    @property
    def pid(self) -> int:
        return self.node.pid

    def stop(self) -> None:
        self.node.stop()


def send(receiver: Receiver, files: list[Path], associations: int = 1) -> Measurement:
    """storescu all `files` to `receiver` over `associations` parallel associations."""
    return send_to([receiver], files, associations)


def send_to(receivers: Sequence[Receiver], files: list[Path], associations: int) -> Measurement:
    """storescu all `files` over `associations` parallel associations, dealt in turn to
    `receivers`; their costs are summed."""
    groups = [files[index::associations] for index in range(associations)]
    targets = [receivers[index % len(receivers)] for index in range(associations)]
    # Data written before (the files to send, what a receiver that does not sync left
    # in the page cache) goes to disk now, not during this receiver's measurement.
    os.sync()
    cpu_before = _receivers_cpu(receivers)
    # The senders are this process's only children that end (and are reaped) meanwhile.
    senders_before = _children_cpu_seconds()
    started = time.perf_counter()
    senders = [
        subprocess.Popen(
            [
                tool("storescu"),
                "-aec",
                target.ae_title,
                "127.0.0.1",
                str(target.port),
                *map(str, group),
            ],
            env=dcmtk_environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for group, target in zip(groups, targets, strict=True)
    ]
    for sender, target in zip(senders, targets, strict=True):
        _, errors = sender.communicate(timeout=600)
        if sender.returncode != 0:
            raise RuntimeError(
                f"storescu to {target.name} failed (exit code {sender.returncode}): "
                f"{errors.decode()[-500:]}"
            )
    seconds = time.perf_counter() - started
    cpu = _receivers_cpu(receivers) - cpu_before
    return Measurement(
        seconds=seconds,
        images=len(files),
        megabytes=sum(path.stat().st_size for path in files) / 1e6,
        cpu_seconds=cpu.total,
        kernel_cpu_seconds=cpu.kernel,
        peak_rss_mb=sum(tree_peak_rss_mb(receiver.pid) for receiver in receivers),
        sender_cpu_seconds=_children_cpu_seconds() - senders_before,
    )


def _receivers_cpu(receivers: Sequence[Receiver]) -> CpuTimes:
    return sum((receiver.cpu_times() for receiver in receivers), NO_CPU)


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime

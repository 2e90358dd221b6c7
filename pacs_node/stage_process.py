"""Stages of one `serve` in child processes: its infer stage, and receiving beyond the first.

The infer stage, at a lower CPU priority. Why: classification keeps every
core of a small server busy and holds the GIL for its Python work (reading,
decoding, preprocessing). In the receiving process it halved the ingest rate
while a series was classified (measured with
`tests.benchmarks.ingest_under_load`). In its own process at `inference.nice`,
it gets the CPU the receiver leaves, and the model's memory stays out of the
process that answers C-STOREs. With inference.processes above 1, more infer
processes take series side by side, each on its share of the cores: a series'
SR and job steps run on one core beside its forward passes, and another
process's series fills the cores meanwhile (`infer_process_count`).

Receiving, with more than one receiving process (dicom.receive_processes; its
"auto" starts a second one on 2 cores, up to four from 16 on). Why: one
process serves its associations in threads that take turns at one GIL. Four
associations received 0.74-1.32x one association's rate in one process on
2-core VMs, and 1.03-1.55x with two processes; on a 16-core host 1.04-1.20x in
one process and 2.18x with four (`tests.benchmarks.ingest`). The children
accept from the parent's listening socket, and count associations against one
dicom.max_associations (`AssociationSlots`).

Each child is an ordinary single-stage `Node`; the processes meet in the job
store like any scale-out, plus the two wake-up events, so that a completed
series is picked up at once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Literal

from pacs_node.association_slots import AssociationSlots
from pacs_node.config import Settings
from pacs_node.cores import one_process_per_four_cores
from pacs_node.errors import ConfigurationError, PacsNodeError
from pacs_node.logs import configure_logging, enable_stack_dumps
from pacs_node.reception import Reception
from pacs_node.stop_signals import StopSignals

log = logging.getLogger(__name__)

_CONTEXT = multiprocessing.get_context("spawn")
# How long the child may take to load its model and report.
START_TIMEOUT_SECONDS = 600.0
# How often the child checks that its parent is still there.
_PARENT_CHECK_SECONDS = 1.0
# How often the parent, waiting for a child to start, asks whether it is itself stopping.
_START_CHECK_SECONDS = 0.2


def infer_process_count(setting: int | Literal["auto"], cores: int | None = None) -> int:
    """inference.processes; "auto" is one infer process per 4 cores (`cores`; by
    default those this process may use, `usable_cores`), 1 to 4.

    One process's series takes ~0.2 s of serial work on one core (the SR, the
    job's steps) beside its forward passes. On the 16-core host of an H200 one
    process classified queued series at 558 slices/s on the GPU, two at 1111 and
    four at 1599 (session 14, tests/benchmarks/README.md); on that host's CPU one
    process reached only 0.38-0.41 of the forward pass alone. On a 2-core server
    a second process fits in memory since the CPU path runs without torch (1109
    MB in all at 600 slices, against 764 with one; session 16), but it classified
    queued series only 0.93-1.25x as fast as one there (median 1.05; 1.19x in
    session 14), while a lone series, on one core, takes longer: so it keeps one.
    """
    if setting != "auto":
        return setting
    return one_process_per_four_cores(cores)


def receive_process_count(setting: int | Literal["auto"], cores: int | None = None) -> int:
    """dicom.receive_processes; "auto" is two receiving processes (one on a single
    core), or one per 4 cores (`cores`; by default `usable_cores`) where that is
    more, at most 4.

    One process serves its associations in threads that take turns at one GIL:
    four associations into one process received 0.74-1.32x one association's rate
    on this project's 2-core VMs, 1.04-1.20x on a 16-core host. On that host four
    receiving processes took them at 2.18x (3.15 cores busy; session 12). On a
    2-core VM two processes took them at 1.03-1.55x (median 1.33, six runs of
    session 22; 1.00-1.41x one process's rate in the same runs), for ~135 MB more;
    four processes there gained no more (1.35x, one run). tests/benchmarks/README.md.
    """
    if setting != "auto":
        return setting
    return one_process_per_four_cores(cores, at_least=2)


class StartCancelledError(PacsNodeError):
    """A child was ended while it started: its parent is stopping."""


@dataclass(frozen=True)
class ModelInfo:
    """What the ready line says about the model."""

    model_id: str
    device: str


class PipeWake:
    """A wake-up event that works across processes, over a pipe.

    Not multiprocessing's Event: its internal lock, held by a process killed
    at the wrong moment, would hang the other process for good. A pipe has no
    lock; a pending wake-up is a byte waiting in it.
    """

    def __init__(self) -> None:
        # Connection objects only carry the two ends to the child (spawn pickles them).
        self._reader, self._writer = _CONTEXT.Pipe(duplex=False)

    def set(self) -> None:
        os.set_blocking(self._writer.fileno(), False)
        with contextlib.suppress(BlockingIOError):  # the pipe is full: a wake-up is pending
            os.write(self._writer.fileno(), b"!")

    def clear(self) -> None:
        os.set_blocking(self._reader.fileno(), False)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._reader.fileno(), 4096):
                pass

    def wait(self, timeout: float | None = None) -> bool:
        ready, _, _ = select.select([self._reader.fileno()], [], [], timeout)
        return bool(ready)


@dataclass(frozen=True)
class SharedListener:
    """What a receiving child shares with its parent: the socket, and the association count."""

    socket: socket.socket
    slots: AssociationSlots


class StageProcess:
    def __init__(
        self,
        settings: Settings,
        stage: str,
        wakes: tuple[PipeWake, PipeWake],
        reception: Reception | None = None,
        listener: SharedListener | None = None,
        name: str = "",
    ) -> None:
        """`stage`: "infer", or "receive" with the parent's `listener`;
        `wakes`: the (infer, send) events of the parent."""
        if (stage == "receive") != (listener is not None):
            raise ValueError("a receiving child needs its parent's listener, and only it")
        self.settings = settings
        self.stage = stage
        self.wakes = wakes
        self.reception = reception
        self.listener = listener
        self.name = name or f"{stage} process"  # for the log
        self._process: multiprocessing.process.BaseProcess | None = None
        self._report: Connection | None = None  # the launched child's first answer

    def start(self, cancelled: Callable[[], bool] = lambda: False) -> ModelInfo | None:
        """Start the child and wait until it runs (an infer stage: its model is
        loaded); its model, or raise what stopped it (`wait_until_running`)."""
        self.launch()
        return self.wait_until_running(cancelled)

    def launch(self) -> None:
        """Start the child; `wait_until_running` then waits for it."""
        receiving, sending = _CONTEXT.Pipe(duplex=False)
        # The same values as a plain Settings: the class load_settings makes is
        # local to it, so it cannot be pickled.
        settings = Settings.model_construct(**dict(self.settings))
        process = _CONTEXT.Process(
            target=_child_main,
            args=(
                settings,
                self.stage,
                sending,
                self.wakes,
                self.reception,
                self.listener,
                os.getpid(),
            ),
            name=f"pacs-node-{self.name.replace(' ', '-')}",
            # Should the parent fail to stop it, multiprocessing ends it at exit.
            daemon=True,
        )
        process.start()
        sending.close()
        self._process = process
        self._report = receiving

    def wait_until_running(self, cancelled: Callable[[], bool] = lambda: False) -> ModelInfo | None:
        """Its model once the launched child runs, or raise what stopped it.

        Once `cancelled()` is true the child is killed and `StartCancelledError` raised.
        Why kill: SIGTERM would wait until its model has loaded (seconds; the first
        ONNX export longer), and a starting child holds nothing a kill could spoil
        (the export is written whole or not at all).
        """
        process, receiving = self._process, self._report
        if process is None or receiving is None:
            raise RuntimeError(f"the {self.name} was not launched")
        self._report = None
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        try:
            while not receiving.poll(_START_CHECK_SECONDS):
                if cancelled():
                    process.kill()
                    raise StartCancelledError(f"the {self.name} was ended while it started")
                if time.monotonic() > deadline:
                    raise ConfigurationError(f"the {self.name} did not start in time")
            answer = receiving.recv()
        except EOFError:
            process.join(5)
            answer = f"the {self.name} exited with code {process.exitcode}"
        except BaseException:
            self.stop()
            raise
        finally:
            receiving.close()
        if answer is None or isinstance(answer, ModelInfo):
            return answer
        self.stop()
        raise ConfigurationError(str(answer))

    @property
    def exit_code(self) -> int | None:
        """None while the child runs."""
        return None if self._process is None else self._process.exitcode

    def ask_to_stop(self) -> None:
        """Ask the child to finish its current step and stop (SIGTERM); `stop` waits."""
        if self._process is not None and self._process.is_alive():
            self._process.terminate()

    def stop(self, timeout: float = 120.0) -> None:
        """Ask the child to finish its current step and stop; kill it if it does not."""
        process, self._process = self._process, None
        if self._report is not None:  # launched, never waited for
            self._report.close()
            self._report = None
        if process is None:
            return
        if process.is_alive():
            process.terminate()
            process.join(timeout)
        if process.is_alive():
            log.warning(f"{self.name} did not stop in time; killed", extra={"action": "stop"})
            process.kill()
            process.join()


def _child_main(
    settings: Settings,
    stage: str,
    report: Connection,
    wakes: tuple[PipeWake, PipeWake],
    reception: Reception | None,
    listener: SharedListener | None,
    parent: int,
) -> None:
    # Imported here: service imports this module.
    from pacs_node.service import Node

    _name_this_process(f"pacs-{stage}")
    configure_logging(settings.logging.level)
    enable_stack_dumps()
    if stage == "infer":
        os.nice(settings.inference.nice)
    stop_signals = StopSignals([signal.SIGTERM])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C: the parent decides
    node = Node(settings, [stage], wakes=wakes, reception=reception, listener=listener)
    try:
        node.start()
    except PacsNodeError as error:
        report.send(str(error))
        return
    report.send(node.model)
    report.close()
    try:
        # A parent killed with SIGKILL cannot stop its child: notice it is gone.
        while stop_signals.wait(_PARENT_CHECK_SECONDS) is None and os.getppid() == parent:
            pass
    finally:
        node.stop()


def _name_this_process(name: str) -> None:
    """The name `ps -o comm`, `top` and `pgrep` show for this process (at most 15
    bytes on Linux), so that an operator tells the stages apart; elsewhere nothing."""
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(name)

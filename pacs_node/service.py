"""`serve`: run the chosen stages until told to stop.

Stages never call each other; they meet in the job store and the storage
root. Within one `serve` the only link is a pair of wake-up events, so a
series that completes is picked up at once instead of at the next poll. A
`serve` that receives runs its infer stage in inference.processes child
processes, and more receiving ones where dicom.receive_processes gives more
than one (its "auto" does from 8 cores on); one that only infers is the first
of its infer processes (see `stage_process`). Each infer process takes the
report jobs too, before its next infer job: a report names the model that
classified, and only those processes load it. Every process also runs the
periodic work (series completion sweep, lease reaper, retention): all are safe
to run from many processes at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

from models.manifest import ArtifactError
from models.onnx_cache import (
    ExportCancelledError,
    ExportError,
    default_cache,
    export_unless_cached,
)
from models.predictor import cuda_driver_loads
from pacs_node.admission import Admission
from pacs_node.assembler import Assembler
from pacs_node.association_slots import AssociationSlots
from pacs_node.config import Settings
from pacs_node.errors import ConfigurationError, PacsNodeError
from pacs_node.receiver import Receiver, listen_on
from pacs_node.reception import Reception
from pacs_node.report import reporting_node
from pacs_node.retention import Retention
from pacs_node.sender import SendStage
from pacs_node.stage import Worker, first_with_work
from pacs_node.stage_process import (
    ModelInfo,
    PipeWake,
    SharedListener,
    StageProcess,
    StartCancelledError,
    infer_process_count,
    receive_process_count,
)
from pacs_node.storage import Storage
from pacs_node.store import JobStatus, JobStore

log = logging.getLogger(__name__)

STAGES = ("receive", "infer", "send")
# How often a `serve` checks that its child processes are still running.
WATCH_SECONDS = 10.0


class Wake(Protocol):
    """A wake-up event: threading.Event, or PipeWake across processes."""

    def set(self) -> None: ...

    def clear(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


def open_store(settings: Settings) -> JobStore:
    """The job store, migrated if it is the embedded SQLite, else checked."""
    store = JobStore(settings.database_url)
    if settings.database_url.startswith("sqlite"):
        store.upgrade()
    else:
        store.check_schema()
    return store


def abandoned_local_workers(store: JobStore) -> list[str]:
    """Workers on this host, of earlier processes now gone, that still hold jobs.

    Their jobs can go back to the queue at once instead of when the lease
    expires: after a crash and restart the series is taken up again in seconds.
    """
    host = socket.gethostname()
    gone = set()
    for job in store.list_jobs(status=JobStatus.RUNNING, limit=10_000):
        job_host, _, rest = (job.worker_id or "").partition(":")
        pid = rest.partition(":")[0]
        if job_host == host and pid.isdigit() and not _process_alive(int(pid)):
            gone.add(job.worker_id or "")
    return sorted(gone)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


class Node:
    def __init__(
        self,
        settings: Settings,
        stages: Sequence[str] = STAGES,
        wakes: tuple[Wake, Wake] | None = None,
        reception: Reception | None = None,
        listener: SharedListener | None = None,
    ) -> None:
        """`wakes`: the (infer, send) events shared with a parent `serve`, if any;
        `reception`: that parent's receiving activity, to give way to, or to record;
        `listener`: that parent's, to receive from beside it."""
        unknown = sorted(set(stages) - set(STAGES))
        if unknown or not stages:
            raise ConfigurationError(
                f"--stages must name some of {', '.join(STAGES)}; got {', '.join(stages) or 'none'}"
            )
        self.settings = settings
        self.stages = tuple(stage for stage in STAGES if stage in stages)
        self._stopping = threading.Event()
        # A node that receives keeps CPU-heavy classification in other processes,
        # and receives in more than one if told to. A child (given `wakes`) runs
        # its one stage itself.
        receiving = "receive" in self.stages
        first = wakes is None
        self._infer_processes = (
            infer_process_count(settings.inference.processes) if "infer" in self.stages else 0
        )
        self._infer_here = "infer" in self.stages and not receiving
        self._exports_ahead = "infer" in self.stages and first
        self._infer_children = (
            self._infer_processes - (1 if self._infer_here else 0) if first else 0
        )
        self._receive_children = (
            receive_process_count(settings.dicom.receive_processes) - 1
            if receiving and listener is None
            else 0
        )
        self._listener = listener
        self._slots_lock_file: Path | None = None
        self._children: list[StageProcess] = []
        self._shared_wakes = (
            (PipeWake(), PipeWake()) if self._infer_children or self._receive_children else None
        )
        self._reception = Reception() if receiving and self._infer_children else reception
        self._infer_wake: Wake
        self._send_wake: Wake
        self._infer_wake, self._send_wake = (
            wakes or self._shared_wakes or (threading.Event(), threading.Event())
        )
        self.model: ModelInfo | None = None
        self._threads: list[threading.Thread] = []
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self.receiver: Receiver | None = None
        self.store: JobStore | None = None

    def start(self, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Start everything, or raise `PacsNodeError` having started nothing.

        Once `cancelled()` is true, infer processes still loading their model, and
        this process's own ONNX export if it runs one, are ended and
        `StartCancelledError` raised: a stop need not wait for a first start's export.
        """
        try:
            self._start(cancelled)
        except BaseException:
            self._stop_children()
            if self._listener is not None:
                self._listener.socket.close()
            self._remove_slots_lock_file()
            raise

    def _start(self, cancelled: Callable[[], bool]) -> None:
        settings = self.settings
        worker_id = f"{socket.gethostname()}:{os.getpid()}"
        # Load the model before opening the port: a node that cannot classify
        # must not accept series it would only queue. Imported here because
        # the model's libraries cost hundreds of MB and seconds of start-up,
        # which receive- and send-only processes never need.
        classifier = None
        try:
            if self._exports_ahead:
                self._export_model_ahead(cancelled)
            if self._infer_here:
                from pacs_node.inference import load_classifier

                classifier = load_classifier(settings, self._infer_processes, cancelled)
                self.model = ModelInfo(
                    classifier.predictor.manifest.model_id, classifier.predictor.device
                )
        except ExportCancelledError as error:
            raise StartCancelledError("stopped while exporting the model") from error
        self._start_infer_children(cancelled)
        storage = Storage(settings.storage.root, settings.storage.fsync)
        # A transfer stalls at most network_timeout between fragments; a file
        # in incoming/ untouched for much longer has no live writer.
        stale_seconds = max(300.0, 2 * settings.dicom.network_timeout_seconds)

        def discard_partial_files() -> None:
            removed = storage.discard_incoming(stale_seconds)
            if removed:
                log.info("removed partial files of interrupted transfers", extra={"count": removed})

        discard_partial_files()
        store = self.store = open_store(settings)
        released = store.release_abandoned(abandoned_local_workers(store))
        if released:
            log.info("requeued jobs of a stopped process", extra={"count": released})
        assembler = Assembler(store, settings.series, settings.inference.max_attempts)
        self._scheduler.add_job(
            self._sweep_with(assembler),
            "interval",
            seconds=settings.series.sweep_seconds,
            max_instances=1,
            coalesce=True,
            id="assemble",
        )
        self._scheduler.add_job(
            discard_partial_files, "interval", seconds=60, max_instances=1, coalesce=True
        )
        self._scheduler.add_job(
            store.reap_expired_leases,
            "interval",
            seconds=settings.queue.reap_seconds,
            max_instances=1,
            coalesce=True,
            id="reap",
        )
        if settings.retention.enabled:
            retention = Retention(store, storage, settings.retention.keep_days)

            def retain() -> None:
                try:
                    retention.sweep()
                except PacsNodeError as error:  # e.g. the database is down: the next one catches up
                    log.warning(
                        "retention sweep failed",
                        extra={"action": "retention", "reason": str(error)},
                    )

            self._scheduler.add_job(
                retain,
                "interval",
                seconds=settings.retention.sweep_seconds,
                max_instances=1,
                coalesce=True,
                id="retention",
            )

        def worker(stage: str) -> Worker:
            return Worker(
                worker_id=f"{worker_id}:{stage}",
                lease_seconds=settings.queue.lease_seconds,
                retry_base_seconds=settings.results.retry_base_seconds,
                retry_max_seconds=settings.results.retry_max_seconds,
            )

        if classifier is not None:
            from pacs_node.reporter import ReportStage
            from pacs_node.worker import InferenceStage

            infer = InferenceStage(
                store,
                worker("infer"),
                storage,
                classifier,
                give_way=self._give_way(settings.inference.pause_while_receiving_seconds),
            )
            report = ReportStage(
                store,
                worker("report"),
                storage,
                classifier.predictor.manifest,
                reporting_node(settings),
                [destination.key for destination in settings.results.destinations],
                send_max_attempts=settings.results.max_attempts,
            )
            # One thread, a series' SR before the next series' classification: with
            # the reports in a thread beside it, the forward lanes waited for the GIL
            # and a queue of series went at 0.48-0.55 of the model, against 0.60-0.64
            # in one thread (tests/benchmarks/README.md, session 21).
            self._add_loop(
                "infer",
                first_with_work(report, infer),
                self._infer_wake,
                after_work=self._send_wake.set,
            )
        if "send" in self.stages:
            send = SendStage(
                store,
                worker("send"),
                storage,
                settings.results.destinations,
                calling_ae=settings.dicom.ae_title,
            )
            self._add_loop("send", send.run_once, self._send_wake)
        if "receive" in self.stages:
            self._start_receiving_children()
            admission = Admission(
                storage.root,
                settings.storage.min_free_mb * 2**20,
                store.queue_depth,
                settings.queue.max_depth,
            )
            self.receiver = Receiver(
                settings.dicom,
                settings.intake,
                storage,
                store,
                admit=admission.refusal,
                series_filled=self._assemble_now,
                on_store=self._reception.stored if self._reception else lambda: None,
            )
            if self._listener is None:
                self.receiver.start()
            else:
                self.receiver.start(self._listener.socket, self._listener.slots)
        self._scheduler.start()
        for thread in self._threads:
            thread.start()
        if self._children:
            self._scheduler.add_job(
                self._watch_children,
                "interval",
                seconds=WATCH_SECONDS,
                max_instances=1,
                coalesce=True,
                id="watch-children",
            )

    def _export_model_ahead(self, cancelled: Callable[[], bool]) -> None:
        """On a CPU, export the model to ONNX (once: it is cached) before any process
        loads the libraries that classify: the export child's ~1.2 GB then adds to
        this process's ~120 MB alone, not also to an infer process's ~300.
        `ExportCancelledError` once `cancelled()` is true while it runs."""
        device = self.settings.inference.device
        if device == "cuda" or (device == "auto" and cuda_driver_loads()):
            return  # CUDA runs the artifact itself; the infer process decides
        try:
            export_unless_cached(self.settings.inference.model, default_cache(), cancelled)
        except (ArtifactError, ExportError) as error:
            raise ConfigurationError(f"inference.model: {error}") from error

    def _start_infer_children(self, cancelled: Callable[[], bool]) -> None:
        """The first alone, unless this process loaded the model already: it may
        still have to export the ONNX model (a cached export that disagrees with the
        artifact, a CUDA host whose torch finds no GPU), which the others then read.
        Then the others at once."""
        if not self._infer_children:
            return
        assert self._shared_wakes is not None
        children = [
            StageProcess(
                self.settings,
                "infer",
                self._shared_wakes,
                self._reception,
                name=f"infer process {index}" if self._infer_processes > 1 else "",
            )
            for index in range(1, self._infer_children + 1)
        ]
        self._children += children
        if not self._infer_here:
            self.model = children[0].start(cancelled)
            children = children[1:]
        for child in children:
            child.launch()
        for child in children:
            self.model = child.wait_until_running(cancelled) or self.model

    def _start_receiving_children(self) -> None:
        """With more than one receiving process: the listening socket, shared with
        that many processes less one, this one's receiver being the first."""
        if not self._receive_children:
            return
        assert self._shared_wakes is not None
        processes = self._receive_children + 1
        # On local disk and this serve's own: a storage root may be shared by other hosts.
        descriptor, name = tempfile.mkstemp(prefix="pacs-node-associations-", suffix=".lock")
        os.close(descriptor)
        self._slots_lock_file = Path(name)
        slots = AssociationSlots(
            self.settings.dicom.max_associations, processes, self._slots_lock_file
        )
        listener = listen_on(self.settings.dicom)
        self._listener = SharedListener(listener, slots.for_process(0))
        for index in range(1, processes):
            child = StageProcess(
                self.settings,
                "receive",
                self._shared_wakes,
                self._reception,
                SharedListener(listener, slots.for_process(index)),
                name=f"receive process {index}",
            )
            self._children.append(child)
            child.start()

    def _give_way(self, limit_seconds: float) -> Callable[[], float]:
        """What the infer stage calls between batches: wait for the parent's receiver."""
        reception = self._reception
        if reception is None:
            return lambda: 0.0
        return lambda: reception.give_way(limit_seconds)

    def describe(self) -> str:
        """What runs, for the ready line: stages, port, model, destinations."""
        settings = self.settings
        model = self.model.model_id if self.model else "none"
        device = self.model.device if self.model else "none"
        listening = (
            f"{settings.dicom.ae_title}@{settings.dicom.bind}:{self.receiver.port}"
            + (" (TLS)" if settings.dicom.tls.enabled else "")
            if self.receiver
            else "no"
        )
        if self._receive_children:
            listening += f" ({self._receive_children + 1} processes)"
        if self._infer_processes > 1:
            device += f" ({self._infer_processes} processes)"
        return (
            f"stages {','.join(self.stages)}; listening {listening}; model {model} on {device}; "
            f"{len(settings.results.destinations)} destination(s)"
        )

    def stop(self) -> None:
        """Stop accepting, let running jobs finish their current step, close."""
        self._stopping.set()
        self._infer_wake.set()
        self._send_wake.set()
        if self.receiver is not None:
            self.receiver.stop()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        self._stop_children()
        self._remove_slots_lock_file()
        for thread in self._threads:
            thread.join()
        if self.store is not None:
            self.store.close()
        log.info(f"pacs-node stopped: stages {','.join(self.stages)}", extra={"action": "stop"})

    def _stop_children(self) -> None:
        for child in self._children:  # all at once: each finishes its current step
            child.ask_to_stop()
        for child in self._children:
            child.stop()

    def _remove_slots_lock_file(self) -> None:
        if self._slots_lock_file is not None:
            self._slots_lock_file.unlink(missing_ok=True)

    def _watch_children(self) -> None:
        """Restart a crashed child: receiving alone would only fill the queue, and a
        receiving child's share of the associations would go unserved."""
        for child in self._children:
            code = child.exit_code
            if code is None or self._stopping.is_set():
                continue
            log.error(
                f"{child.name} exited with code {code}; restarting it",
                extra={"action": child.stage},
            )
            child.stop()
            if child.listener is not None:  # its associations ended with it
                child.listener.slots.clear()
            try:
                child.start(cancelled=self._stopping.is_set)
            except StartCancelledError:
                return  # the node is stopping: `stop` must not wait for a model to load
            except PacsNodeError as error:
                log.error(
                    f"{child.name} failed to start; trying again",
                    extra={"action": child.stage, "reason": str(error)},
                )

    def _assemble_now(self) -> None:
        """A series may be complete by content: sweep now, not at the next interval."""
        with contextlib.suppress(JobLookupError):  # stopping: the job is gone
            self._scheduler.modify_job("assemble", next_run_time=datetime.now(timezone.utc))

    def _sweep_with(self, assembler: Assembler) -> Callable[[], None]:
        def sweep() -> None:
            try:
                if assembler.sweep():
                    self._infer_wake.set()
            except PacsNodeError as error:
                log.warning(
                    "series sweep failed", extra={"action": "assemble", "reason": str(error)}
                )

        return sweep

    def _add_loop(
        self,
        name: str,
        run_once: Callable[[], bool],
        wake: Wake,
        after_work: Callable[[], None] = lambda: None,
    ) -> None:
        poll = self.settings.queue.poll_seconds

        def loop() -> None:
            while not self._stopping.is_set():
                # Cleared before looking for work, so a wake-up during it is kept.
                wake.clear()
                try:
                    worked = run_once()
                except PacsNodeError as error:  # e.g. the database is down: wait, try again
                    log.warning(
                        f"{name} stage waiting", extra={"action": name, "reason": str(error)}
                    )
                    worked = False
                if worked:
                    after_work()
                else:
                    wake.wait(poll)

        self._threads.append(threading.Thread(target=loop, name=f"pacs-node-{name}", daemon=True))

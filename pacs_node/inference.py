"""Classify one series: read, decode, preprocess, batch, predict, aggregate.

The same code serves the infer stage and `pacs-node classify`, so the network
path and the offline path cannot disagree. Slices are decoded on a small
thread pool one batch ahead of the model, so decoding overlaps the forward
pass; on a CPU the model runs up to `inference.forward_lanes` batches at once.
Memory holds at most that many batches of pixels, and two more.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from models.aggregation import SeriesResult, aggregate
from models.manifest import ArtifactError, Manifest
from models.onnx_cache import ExportError
from models.predictor import SlicePredictor, resolve_device
from models.preprocessing import PixelLayout, input_from_dataset, input_from_layout
from pacs_node.config import Settings
from pacs_node.cores import forward_threads, usable_cores
from pacs_node.errors import ConfigurationError, PermanentError
from pacs_node.report import ReportError, ReportingNode, rehearse_report, reporting_node
from pacs_node.store import Instance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredSlice:
    """A slice as the job store knows it: its file, where its words lie, its UIDs."""

    path: Path
    # None: the file is parsed (compressed, or stored before layouts were kept).
    layout: PixelLayout | None
    # The slice's REFERENCE_KEYWORDS, from its row.
    reference: Dataset


Slice = Path | StoredSlice


@dataclass(frozen=True)
class DecodedSlice:
    path: Path
    header: Dataset | None
    # The model's (3, S, S) input.
    pixels: np.ndarray | None
    error: str | None
    # False when `header` holds only the REFERENCE_KEYWORDS (read through a layout).
    whole: bool = True


@dataclass(frozen=True)
class SeriesClassification:
    result: SeriesResult
    # The classified slices' REFERENCE_KEYWORDS; result.evidence indexes them.
    headers: list[Dataset]
    # The first classified slice's file: a report copies its patient and study
    # attributes (`report_sources`).
    first_path: Path
    # One JSON-able entry per classified slice: SOP Instance UID, instance number, probabilities.
    slices: list[dict[str, Any]]
    # Slices that could not be used, with the reason.
    skipped: list[tuple[str, str]]
    # Seconds the stage waited for decoded slices, and for the model's forward passes.
    decode_seconds: float = 0.0
    forward_seconds: float = 0.0

    @property
    def evidence_uids(self) -> list[str]:
        return [str(self.headers[index].SOPInstanceUID) for index in self.result.evidence]

    def sources_for_report(self) -> list[Dataset]:
        """The report's sources (`report_sources`): the first slice's whole header, read
        from its file, then the others' references."""
        return report_sources(self.first_path, self.headers[1:])


class SeriesClassifier:
    def __init__(self, predictor: SlicePredictor, batch_size: int, decode_threads: int = 2) -> None:
        self.predictor = predictor
        self.batch_size = batch_size
        self.decode_threads = decode_threads

    def classify(
        self, paths: Sequence[Slice], on_batch: Callable[[], None] = lambda: None
    ) -> SeriesClassification:
        """Classify the slices at `paths` (one series, in slice order): files, or
        `StoredSlice`s whose words are read through their layout without parsing.

        `on_batch` runs after every batch (the worker renews its lease there, when due).
        Unreadable slices are skipped and reported; a series with none left
        is a `PermanentError`.
        """
        with _without_garbage_collection():
            return self._classify(paths, on_batch)

    def _classify(
        self, paths: Sequence[Slice], on_batch: Callable[[], None]
    ) -> SeriesClassification:
        manifest = self.predictor.manifest
        headers: list[Dataset] = []
        first_path: Path | None = None
        rows: list[np.ndarray] = []
        skipped: list[tuple[str, str]] = []
        decode_seconds = forward_seconds = 0.0
        waiting_since = time.perf_counter()
        with self.predictor.in_flight() as forwards:
            for batch in self._decoded_batches(paths):
                decode_seconds += time.perf_counter() - waiting_since
                usable = [
                    (item, item.pixels, item.header)
                    for item in batch
                    if item.pixels is not None and item.header is not None
                ]
                skipped.extend(
                    (item.path.name, item.error or "unreadable")
                    for item in batch
                    if item.pixels is None
                )
                if usable:
                    inputs = np.stack([pixels for _, pixels, _ in usable])
                    forward_started = time.perf_counter()
                    rows.extend(forwards.put(inputs))
                    forward_seconds += time.perf_counter() - forward_started
                    if first_path is None:
                        first_path = usable[0][0].path
                    headers += [_reference(header, item.whole) for item, _, header in usable]
                on_batch()
                waiting_since = time.perf_counter()
            rows.extend(forwards.drain())
            forward_seconds += time.perf_counter() - waiting_since
        if first_path is None:
            raise PermanentError(f"none of the {len(paths)} slices could be classified")
        probabilities = np.concatenate(rows)
        result = aggregate(probabilities, manifest.classes, manifest.aggregation)
        slices = [
            {
                "sop_instance_uid": str(header.SOPInstanceUID),
                "instance_number": _instance_number(header),
                "probabilities": dict(zip(manifest.classes, map(float, row), strict=True)),
            }
            for header, row in zip(headers, probabilities, strict=True)
        ]
        return SeriesClassification(
            result=result,
            headers=headers,
            first_path=first_path,
            slices=slices,
            skipped=skipped,
            decode_seconds=decode_seconds,
            forward_seconds=forward_seconds,
        )

    def _decoded_batches(self, paths: Sequence[Slice]) -> Iterator[list[DecodedSlice]]:
        """Yield decoded batches, decoding the next batch while one is in use."""
        preprocessing = self.predictor.manifest.preprocessing
        chunks = [
            paths[start : start + self.batch_size]
            for start in range(0, len(paths), self.batch_size)
        ]
        with ThreadPoolExecutor(max_workers=self.decode_threads) as pool:

            def submit(chunk: Sequence[Slice]) -> list[Future[DecodedSlice]]:
                return [pool.submit(decode_slice, path, preprocessing) for path in chunk]

            pending = submit(chunks[0]) if chunks else []
            for index in range(len(chunks)):
                current = pending
                pending = submit(chunks[index + 1]) if index + 1 < len(chunks) else []
                yield [future.result() for future in current]


@contextmanager
def _without_garbage_collection() -> Iterator[None]:
    """No cyclic garbage collection while a series is classified.

    A series leaves no cycles to collect (none found after 150 slices), yet pydicom's
    many small objects set off ~65 collections per 150 slices, ~25 ms under the GIL
    in all: without them the uncompressed stage ran ~8% faster (3 alternating runs).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_classifier(
    settings: Settings, processes: int = 1, cancelled: Callable[[], bool] = lambda: False
) -> SeriesClassifier:
    """The configured model artifact, verified, on the configured device; a first
    start's ONNX export is ended once `cancelled()` is true (`ExportCancelledError`).

    `processes`: how many infer processes share this host's cores (inference.processes).
    This process then takes its share of the threads the forward passes may run
    (`forward_threads`: the usable cores, or fewer under OMP_NUM_THREADS), which the
    forward lanes split, and of the cores the decode threads are chosen by.
    On a CPU this imports no torch (`models.predictor`).
    """
    cores = usable_cores()
    threads = max(1, forward_threads() // processes)
    try:
        device = resolve_device(settings.inference.device)
        lanes = forward_lane_count(settings.inference.forward_lanes, device, threads)
        predictor = SlicePredictor(
            settings.inference.model, device, lanes=lanes, threads=threads, cancelled=cancelled
        )
    except (ArtifactError, ExportError) as error:
        raise ConfigurationError(f"inference.model: {error}") from error
    except RuntimeError as error:
        raise ConfigurationError(f"inference.device: {error}") from error
    try:
        settle_long_lived_objects(predictor.manifest, reporting_node(settings))
    except ReportError as error:
        raise ConfigurationError(f"no valid report can be made: {error}") from error
    decode_threads = decode_thread_count(
        settings.inference.decode_threads, predictor.device, max(1, cores // processes)
    )
    return SeriesClassifier(predictor, settings.inference.batch_size, decode_threads)


def decode_thread_count(
    setting: int | Literal["auto"], device: str, cores: int | None = None
) -> int:
    """inference.decode_threads; "auto" as measured on a 16-core host
    (tests/benchmarks/README.md, session 12). On a CPU the forward pass takes most
    cores: JPEG Lossless went from 362 slices/s with 2 threads to 590 with 4, and no
    further with 8. With CUDA the host decodes for the GPU: 561 with 4, 804 with 8,
    638 with 16 (session 11). Uncompressed slices gained little from more than 2
    either way.
    """
    if setting != "auto":
        return setting
    cores = cores or usable_cores()
    if device == "cuda":
        return min(8, max(2, cores // 2))
    return min(4, max(2, cores // 4))


def forward_lane_count(
    setting: int | Literal["auto"], device: str, threads: int | None = None
) -> int:
    """inference.forward_lanes; "auto" is two lanes where the forward passes may run
    two threads or more (`threads`; by default `forward_threads()`, one per core
    unless limited, as by OMP_NUM_THREADS): the lanes share those threads, so a
    limit still holds.

    On the 2-core VM (session 13) two sessions of one thread ran the bundled model
    at 1.11-1.31x one session of two threads (tests/benchmarks/README.md,
    "Forward lanes"). On a 16-core
    host (session 14) two lanes of 8 threads ran 1.79x one of 16, and 4 or 8 lanes
    no more than the rounds' spread beyond that (1.90x). With CUDA the GPU runs one
    batch at a time.
    """
    if device == "cuda":
        return 1
    if setting != "auto":
        return setting
    return min(2, threads or forward_threads())


def settle_long_lived_objects(manifest: Manifest, node: ReportingNode) -> None:
    """Once the model is loaded: rehearse a report (`rehearse_report`, which raises
    `ReportError`), so that highdicom's tables exist, then keep them and the other
    long-lived objects out of every full garbage collection: when the process also
    held torch's and the exporter's ~500 000 objects, scanning them took ~0.2 s, in
    every third series measured."""
    rehearse_report(manifest, node)
    gc.collect()
    gc.freeze()


def decode_slice(item: Slice, preprocessing: Any) -> DecodedSlice:
    """One slice as the infer stage decodes it: through its layout, or parsed."""
    path = item.path if isinstance(item, StoredSlice) else item
    try:
        if isinstance(item, StoredSlice) and item.layout is not None:
            pixels = input_from_layout(path, item.layout, preprocessing)
            return DecodedSlice(path, item.reference, pixels, error=None, whole=False)
        dataset = pydicom.dcmread(path)
        pixels = input_from_dataset(dataset, preprocessing)
    except Exception as error:  # any decoder may fail on damaged pixel data
        log.warning(
            "slice skipped",
            extra={"action": "decode", "reason": f"{type(error).__name__}: {error}"},
        )
        return DecodedSlice(
            path=path, header=None, pixels=None, error=f"{type(error).__name__}: {error}"
        )
    del dataset.PixelData  # keep only the header in memory
    return DecodedSlice(path=path, header=dataset, pixels=pixels, error=None)


# What the per-slice results and the report's references read of a slice. The
# report's first source is whole (`report_sources`).
REFERENCE_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "InstanceNumber",
)


def report_sources(first: Path, others: Iterable[Dataset]) -> list[Dataset]:
    """A report's sources, in slice order: the first classified slice's header,
    whole but its pixel data, read from its file `first` (the report copies its
    patient and study attributes), then the other slices' REFERENCE_KEYWORDS."""
    return [pydicom.dcmread(first, stop_before_pixels=True), *others]


def reference_header(
    sop_class_uid: str,
    sop_instance_uid: str,
    series_instance_uid: str,
    study_instance_uid: str,
    instance_number: int | None,
) -> Dataset:
    """A header with only the REFERENCE_KEYWORDS, from values the job store holds."""
    reference = Dataset()
    reference.SOPClassUID = sop_class_uid
    reference.SOPInstanceUID = sop_instance_uid
    reference.SeriesInstanceUID = series_instance_uid
    reference.StudyInstanceUID = study_instance_uid
    if instance_number is not None:
        reference.InstanceNumber = instance_number
    return reference


def instance_reference(instance: Instance) -> Dataset:
    """The REFERENCE_KEYWORDS of a stored instance, from its row."""
    return reference_header(
        instance.sop_class_uid,
        instance.sop_instance_uid,
        instance.series_instance_uid,
        instance.study_instance_uid,
        instance.instance_number,
    )


def _reference(header: Dataset, whole: bool) -> Dataset:
    """The slice's REFERENCE_KEYWORDS only: whole headers (~50 KB each) would
    make the node's memory grow with the length of the series."""
    if not whole:
        return header  # read through its layout: it holds only these already
    reference = Dataset()
    for keyword in REFERENCE_KEYWORDS:
        if keyword in header:
            setattr(reference, keyword, header[keyword].value)
    return reference


def _instance_number(header: Dataset) -> int | None:
    value = header.get("InstanceNumber")
    return None if value is None or value == "" else int(value)

"""Infer stage on a queue of series, job store included, against the model alone.

    .venv/bin/python -m tests.benchmarks.queue [--series 4] [--slices 300]
        [--device cpu|cuda] [--decode-threads 2] [--lanes N] [--rounds 3]

The node's own `InferenceStage` takes queued infer jobs from a SQLite job store
until none is left. For each series it reads the rows, reads the slices
through the layouts a receiver would have recorded, classifies them, renews
its lease when due, and commits the result, its REPORT job and the job's end.
So it measures more of the stage than `tests.benchmarks.inference`, whose
stage is one series' classification, with no job store. Then the same queue
as an infer process runs it: in one thread, each series' report job (the SR
built and written, fsynced, its sends queued) before the next infer job,
timed until the last SR is written. The reference is the node's
forward pass alone on the first series' slices as ready tensors, same batch
size, same lanes, same process, measured in each round. Then where a series'
time went, from the stages' own log fields: waiting for decoded slices, for
the forward passes, the rest of the infer job (rows, headers, aggregation,
the commit), and the report job. The last lines are the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pydicom
from pydicom.filereader import read_file_meta_info

from models.predictor import SlicePredictor
from models.preprocessing import input_from_dataset
from pacs_node.config import BUNDLED_MODEL, IntakeSettings
from pacs_node.inference import SeriesClassifier, settle_long_lived_objects
from pacs_node.receiver import read_instance
from pacs_node.reporter import ReportStage
from pacs_node.stage import Worker, first_with_work
from pacs_node.storage import Storage
from pacs_node.store import JobStore, NewInstance
from pacs_node.worker import InferenceStage
from tests.benchmarks.inference import NODE, REPORTING_NODE, node_model_only, node_predictor
from tests.benchmarks.series import long_series


def queued_store(path: Path, instances: list[NewInstance]) -> JobStore:
    """A new job store holding `instances`, their series complete and queued."""
    store = JobStore(f"sqlite:///{path}")
    store.upgrade()
    for instance in instances:
        store.record_instance(instance)
    store.complete_ready_series(datetime.now(timezone.utc), quiet_seconds=1)
    return store


def stored_instances(root: Path, series: int, slices: int) -> list[NewInstance]:
    """`series` series of `slices` uncompressed slices, in `root/instances`, with the
    rows the receiver records for them (read by its own `read_instance`)."""
    received = datetime.now(timezone.utc) - timedelta(hours=1)
    instances = []
    for number in range(series):
        for path in long_series(root / "made" / str(number), slices):
            relative = f"instances/{number}/{path.name}"
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, root / relative)
            size = path.stat().st_size
            transfer_syntax = str(read_file_meta_info(path).TransferSyntaxUID)
            read = read_instance(root / relative, size, transfer_syntax, IntakeSettings())
            instances.append(
                NewInstance(
                    **dataclasses.asdict(read.info),
                    transfer_syntax_uid=transfer_syntax,
                    path=relative,
                    size=size,
                    sha256="0" * 64,
                    calling_ae="BENCH",
                    received_at=received,
                    pixel_layout=read.pixel_layout,
                )
            )
    return instances


def first_series_batches(
    root: Path,
    instances: list[NewInstance],
    slices: int,
    predictor: SlicePredictor,
    batch_size: int,
) -> list[np.ndarray]:
    """The first series' slices as ready inputs, in batches: the model-only input."""
    preprocessing = predictor.manifest.preprocessing
    inputs = [
        input_from_dataset(pydicom.dcmread(root / instance.path), preprocessing)
        for instance in instances[:slices]
    ]
    return [np.stack(inputs[i : i + batch_size]) for i in range(0, slices, batch_size)]


class StageSplit(logging.Handler):
    """The seconds of each series, from the stages' own log lines (`Done`)."""

    INFER_FIELDS = ("decode_seconds", "forward_seconds", "seconds")

    def __init__(self) -> None:
        super().__init__()
        self.series: list[dict[str, float]] = []
        self.reports: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "forward_seconds"):
            self.series.append({name: float(getattr(record, name)) for name in self.INFER_FIELDS})
        elif hasattr(record, "report_seconds"):
            self.reports.append(float(record.report_seconds))

    def clear(self) -> None:
        self.series.clear()
        self.reports.clear()

    def summary(self) -> str:
        def median(name: str) -> float:
            return statistics.median(entry[name] for entry in self.series)

        parts = {name: median(f"{name}_seconds") for name in ("decode", "forward")}
        total = median("seconds")
        words = ", ".join(f"{name} {value:.2f}" for name, value in parts.items())
        return (
            f"per series, medians of {len(self.series)} (s): {words}, "
            f"other {total - sum(parts.values()):.2f}, infer job {total:.2f}; "
            f"report job {statistics.median(self.reports):.2f}"
        )


def print_rates(rows: dict[str, list[float]], width: int) -> None:
    """One line per row: the median slices/s, then each round's."""
    for name, rates in rows.items():
        per_round = ", ".join(f"{rate:.0f}" for rate in rates)
        print(f"{name:<{width}} {statistics.median(rates):8.1f} slices/s ({per_round})")


def drain(step: Callable[[], bool]) -> int:
    """Run `step` until it finds no job; the jobs it took."""
    jobs = 0
    while step():
        jobs += 1
    return jobs


def stages(
    store: JobStore, storage: Storage, classifier: SeriesClassifier
) -> tuple[InferenceStage, ReportStage]:
    def worker(stage: str) -> Worker:
        return Worker(
            f"bench:1:{stage}", lease_seconds=60, retry_base_seconds=1, retry_max_seconds=1
        )

    manifest = classifier.predictor.manifest
    return (
        InferenceStage(store, worker("infer"), storage, classifier),
        ReportStage(store, worker("report"), storage, manifest, REPORTING_NODE, [], 1),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--series", type=int, default=4)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--lanes", type=int, default=None, help="default: the node's choice")
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pacs-node-queue-") as scratch:
        root = Path(scratch)
        instances = stored_instances(root / "var", arguments.series, arguments.slices)
        storage = Storage(root / "var")
        predictor = node_predictor(BUNDLED_MODEL, arguments.device, arguments.lanes)
        settle_long_lived_objects(predictor.manifest, REPORTING_NODE)
        classifier = SeriesClassifier(predictor, arguments.batch_size, arguments.decode_threads)
        size = arguments.batch_size
        batches = first_series_batches(root / "var", instances, arguments.slices, predictor, size)
        split = StageSplit()
        stage_log = logging.getLogger("pacs_node.stage")
        stage_log.setLevel(logging.INFO)
        stage_log.addHandler(split)
        stage_rates, both_rates, model_rates = [], [], []
        total = arguments.series * arguments.slices
        for round_number in range(arguments.rounds + 1):  # round 0 warms up, uncounted
            store = queued_store(root / f"store-{round_number}.db", instances)
            stage, report = stages(store, storage, classifier)
            started = time.perf_counter()
            jobs = drain(stage.run_once)
            elapsed = time.perf_counter() - started
            store.close()
            if jobs != arguments.series:
                raise RuntimeError(f"{jobs} jobs done of {arguments.series}")
            store = queued_store(root / f"store-{round_number}-both.db", instances)
            stage, report = stages(store, storage, classifier)
            started = time.perf_counter()
            jobs = drain(first_with_work(report, stage))
            both_elapsed = time.perf_counter() - started
            if jobs != 2 * arguments.series:
                raise RuntimeError(f"{jobs} jobs done of {2 * arguments.series}")
            store.close()
            timing = node_model_only(predictor, batches)
            if round_number:
                stage_rates.append(total / elapsed)
                both_rates.append(total / both_elapsed)
                model_rates.append(arguments.slices / timing.seconds)
            else:
                split.clear()
        print(
            f"{arguments.series} series of {arguments.slices} slices, {predictor.device}, "
            f"batch {size}, {arguments.decode_threads} decode threads, {predictor.lanes} lanes, "
            f"{arguments.rounds} rounds (medians; per round in brackets)"
        )
        rows = {
            f"{NODE}, model only": model_rates,
            "infer stage": stage_rates,
            "infer + report stages, as the node": both_rates,
        }
        print_rates(rows, width=40)
        print(split.summary())
        for name, rates in (("infer stage", stage_rates), ("infer + report", both_rates)):
            ratios = [a / b for a, b in zip(rates, model_rates, strict=True)]
            print(
                f"ratio {name}/model-only: {statistics.median(ratios):.2f} "
                f"(per round: {', '.join(f'{ratio:.2f}' for ratio in ratios)})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The infer stage's time: the log's timing fields, as an operator reads them, and
the lease renewals between batches."""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest

from models.predictor import SlicePredictor
from pacs_node.assembler import Assembler
from pacs_node.config import SeriesSettings
from pacs_node.inference import SeriesClassifier
from pacs_node.logs import FieldFormatter
from pacs_node.report import ReportingNode
from pacs_node.reporter import ReportStage
from pacs_node.stage import Worker
from pacs_node.storage import Storage
from pacs_node.store import JobKind, JobStatus, JobStore
from pacs_node.worker import InferenceStage
from tests.dicom_data import renamed_series
from tests.peers import chest_ct
from tests.test_store import T0, instance


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    """SQLite only: the timings do not depend on the backend."""
    store = JobStore(f"sqlite:///{tmp_path / 'store.db'}")
    store.upgrade()
    yield store
    store.close()


def logged_fields(record: logging.LogRecord) -> dict[str, str]:
    """The key=value fields of the line as the node's formatter writes it."""
    return dict(re.findall(r" (\w+)=(\S+)", FieldFormatter().format(record)))


def receive(store: JobStore, storage: Storage, files: list[Path]) -> None:
    """Store `files` and their rows as the receiver would, all received at T0."""
    for number, path in enumerate(files, start=1):
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        relative = f"instances/{path.name}"
        storage.write(relative, [path.read_bytes()])
        row = instance(1, number, images_in_acquisition=len(files))
        store.record_instance(
            dataclasses.replace(
                row,
                sop_instance_uid=str(dataset.SOPInstanceUID),
                series_instance_uid=str(dataset.SeriesInstanceUID),
                study_instance_uid=str(dataset.StudyInstanceUID),
                path=relative,
            )
        )


def queued_series(store: JobStore, tmp_path: Path, names: list[str]) -> Storage:
    """A 3-slice chest CT series per name, received, completed and queued for inference."""
    storage = Storage(tmp_path / "var", fsync=False)
    for name in names:
        receive(store, storage, renamed_series(chest_ct(), tmp_path / name, 3, suffix=name))
    Assembler(store, SeriesSettings(quiet_seconds=60), max_attempts=3).sweep(
        now=T0 + timedelta(seconds=1)
    )
    return storage


def infer_stage(
    store: JobStore,
    storage: Storage,
    model: Path,
    batch_size: int,
    give_way: Callable[[], float] = lambda: 0.0,
) -> InferenceStage:
    return InferenceStage(
        store,
        Worker("test:1:infer", lease_seconds=60, retry_base_seconds=1, retry_max_seconds=1),
        storage,
        SeriesClassifier(SlicePredictor(model, "cpu"), batch_size),
        give_way=give_way,
    )


def report_stage(store: JobStore, storage: Storage, infer: InferenceStage) -> ReportStage:
    return ReportStage(
        store,
        Worker("test:1:report", lease_seconds=60, retry_base_seconds=1, retry_max_seconds=1),
        storage,
        infer.manifest,
        ReportingNode(ae_title="TEST"),
        destinations=[],
        send_max_attempts=1,
    )


def test_the_completion_and_the_inference_log_where_the_seconds_went(
    tmp_path: Path, store: JobStore, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = Storage(tmp_path / "var", fsync=False)
    receive(store, storage, renamed_series(chest_ct(), tmp_path / "series", count=3))
    assembler = Assembler(store, SeriesSettings(quiet_seconds=60), max_attempts=1)
    # As if C-STOREs arrived after each batch.
    stage = infer_stage(store, storage, tiny_model, batch_size=2, give_way=lambda: 0.25)
    with caplog.at_level(logging.INFO):
        # Complete by content 1.5 s after the last instance.
        assembler.sweep(now=T0 + timedelta(seconds=1.5))
        assert stage.run_once()
        assert report_stage(store, storage, stage).run_once()
    completed, classified, reported = (
        record
        for record in caplog.records
        if record.name in ("pacs_node.assembler", "pacs_node.stage")
    )
    assert completed.getMessage().startswith("series complete")
    assert logged_fields(completed)["wait_seconds"] == "1.50"
    assert classified.getMessage().startswith("series classified")
    timings = logged_fields(classified)
    names = {"wait_seconds", "decode_seconds", "forward_seconds", "seconds"}
    assert names <= timings.keys()
    assert timings["receiving_wait_seconds"] == "0.50"  # two batches of at most 2 slices
    # Logged to 0.01 s: a tiny model on ONNX Runtime may well take less.
    assert all(float(timings[name]) >= 0 for name in names)
    # The job was due at T0 + 1.5 s and claimed just now: its queue wait is that gap.
    assert float(timings["wait_seconds"]) > 0
    assert reported.getMessage().startswith("SR written")
    report_timings = logged_fields(reported)
    assert {"wait_seconds", "report_seconds", "seconds"} <= report_timings.keys()
    assert report_timings["action"] == "report"


def test_the_lease_is_renewed_between_batches_once_a_quarter_of_it_has_passed(
    tmp_path: Path, store: JobStore, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = queued_series(store, tmp_path, ["first", "second"])
    stage = infer_stage(store, storage, tiny_model, batch_size=1)  # three batches a series
    renewals: list[int] = []
    heartbeat = store.heartbeat

    def count(job_id: int, worker_id: str, lease_seconds: float) -> bool:
        renewals.append(job_id)
        return heartbeat(job_id, worker_id, lease_seconds)

    monkeypatch.setattr(store, "heartbeat", count)
    assert stage.run_once()  # a 60 s lease: three quick batches renew it never
    assert renewals == []

    def slow_batches() -> float:
        time.sleep(0.11)
        return 0.0

    stage.worker = dataclasses.replace(stage.worker, lease_seconds=0.4)
    stage.give_way = slow_batches  # 0.11 s a batch, more than a quarter of the lease
    assert stage.run_once()
    assert len(renewals) == 3
    jobs = store.list_jobs(kind=JobKind.INFER)
    assert [job.status for job in jobs] == [JobStatus.DONE, JobStatus.DONE]

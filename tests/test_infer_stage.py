"""The infer stage: what it does between batches."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from models.artifact import load_artifact
from models.predictor import SlicePredictor
from pacs_node.assembler import Assembler
from pacs_node.config import SeriesSettings
from pacs_node.inference import SeriesClassifier
from pacs_node.report import ReportingNode
from pacs_node.stage import Worker
from pacs_node.storage import Storage
from pacs_node.store import JobKind, JobStatus, JobStore
from pacs_node.worker import InferenceStage
from tests.dicom_data import renamed_series
from tests.peers import chest_ct
from tests.test_stage_timings import receive
from tests.test_store import T0


@pytest.fixture
def stage(tmp_path: Path, tiny_model: Path) -> Iterator[InferenceStage]:
    """An infer stage with two series of 3 slices queued, complete by content."""
    store = JobStore(f"sqlite:///{tmp_path / 'store.db'}")
    store.upgrade()
    storage = Storage(tmp_path / "var", fsync=False)
    for name in ("first", "second"):
        receive(store, storage, renamed_series(chest_ct(), tmp_path / name, 3, suffix=name))
    Assembler(store, SeriesSettings(quiet_seconds=60), max_attempts=3).sweep(
        now=T0 + timedelta(seconds=1)
    )
    stage = InferenceStage(
        store,
        Worker("test:1:infer", lease_seconds=60, retry_base_seconds=1, retry_max_seconds=1),
        storage,
        SeriesClassifier(SlicePredictor(load_artifact(tiny_model), "cpu"), batch_size=4),
        ReportingNode(ae_title="TEST"),
        destinations=[],
        send_max_attempts=1,
    )
    yield stage
    store.close()


def infer_jobs(stage: InferenceStage) -> list[JobStatus]:
    return [job.status for job in stage.store.list_jobs(kind=JobKind.INFER)]


def test_the_lease_is_renewed_between_batches_once_a_quarter_of_it_has_passed(
    stage: InferenceStage, monkeypatch: pytest.MonkeyPatch
) -> None:
    renewals: list[int] = []
    heartbeat = stage.store.heartbeat

    def count(job_id: int, worker_id: str, lease_seconds: float) -> bool:
        renewals.append(job_id)
        return heartbeat(job_id, worker_id, lease_seconds)

    monkeypatch.setattr(stage.store, "heartbeat", count)
    stage.classifier.batch_size = 1  # three batches per series
    assert stage.run_once()  # a 60 s lease: three quick batches renew it never
    assert renewals == []

    def slow_batches() -> float:
        time.sleep(0.11)
        return 0.0

    stage.worker = dataclasses.replace(stage.worker, lease_seconds=0.4)
    stage.give_way = slow_batches  # 0.11 s a batch, more than a quarter of the lease
    assert stage.run_once()
    assert len(renewals) == 3
    assert infer_jobs(stage) == [JobStatus.DONE, JobStatus.DONE]

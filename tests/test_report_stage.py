"""The report stage: the SR written from the stored result, its sends queued only then,
and a failed write retried without classifying the series again. On both job store
backends (the `store` fixture), as the result's JSON comes back from either."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pydicom
import pytest

from pacs_node.report import read_report
from pacs_node.stage import first_with_work
from pacs_node.store import JobKind, JobStatus, JobStore
from pacs_node.worker import InferenceStage
from tests.test_stage_timings import infer_stage, queued_series, report_stage


@pytest.fixture
def classified(tmp_path: Path, store: JobStore, tiny_model: Path) -> InferenceStage:
    """A 3-slice chest CT received, completed and classified: its REPORT job queued."""
    storage = queued_series(store, tmp_path, ["series"])
    stage = infer_stage(store, storage, tiny_model, batch_size=2)
    assert stage.run_once()
    return stage


def test_the_sr_is_written_from_the_stored_result_and_only_then_sent(
    tmp_path: Path, store: JobStore, classified: InferenceStage
) -> None:
    storage = classified.storage
    (result,) = store.results_for_series(store.list_jobs(kind=JobKind.INFER)[0].series_instance_uid)
    sr_file = storage.absolute(result.sr_path)
    assert not sr_file.exists()  # the infer stage names the SR but does not write it
    assert store.list_jobs(kind=JobKind.SEND) == []

    reporter = report_stage(store, storage, classified)
    reporter.destinations = ["PACS", "ARCHIVE"]
    assert reporter.run_once()
    (report_job,) = store.list_jobs(kind=JobKind.REPORT)
    assert (report_job.status, report_job.result_id) == (JobStatus.DONE, result.id)
    assert sorted(job.destination or "" for job in store.list_jobs(kind=JobKind.SEND)) == [
        "ARCHIVE",
        "PACS",
    ]
    sr = pydicom.dcmread(sr_file)
    assert str(sr.SOPInstanceUID) == result.sr_sop_instance_uid
    assert str(sr.SeriesInstanceUID) == result.sr_series_instance_uid
    assert (str(sr.StudyInstanceUID), sr.InstanceNumber) == (result.study_instance_uid, 1)
    summary = read_report(sr)
    assert (summary.label, summary.model_hash) == (result.label, result.model_hash)
    assert summary.probabilities == pytest.approx(result.probabilities)
    assert list(summary.evidence_sop_uids) == result.evidence
    assert summary.source_series_uid == result.series_instance_uid
    # The patient and study come from the first classified slice's own header.
    first = storage.absolute(store.series_instances(result.series_instance_uid)[0].path)
    source = pydicom.dcmread(first, stop_before_pixels=True)
    for keyword in ("PatientID", "PatientName", "AccessionNumber", "StudyDate"):
        assert sr.get(keyword) == source.get(keyword), keyword


def test_a_failed_sr_write_is_retried_without_classifying_again(
    store: JobStore, classified: InferenceStage, monkeypatch: pytest.MonkeyPatch
) -> None:
    classifications: list[Any] = []
    classify = classified.classifier.classify

    def counted(*args: Any, **kwargs: Any) -> Any:
        classifications.append(args)
        return classify(*args, **kwargs)

    monkeypatch.setattr(classified.classifier, "classify", counted)
    storage = classified.storage
    write = storage.write
    failures = [OSError(28, "No space left on device")]

    def full_disk(relative_path: str, chunks: Any) -> Any:
        if failures:
            raise failures.pop()
        return write(relative_path, chunks)

    monkeypatch.setattr(storage, "write", full_disk)
    reporter = report_stage(store, storage, classified)
    reporter.worker = dataclasses.replace(
        reporter.worker, retry_base_seconds=0.01, retry_max_seconds=0.01
    )
    assert reporter.run_once()
    (job,) = store.list_jobs(kind=JobKind.REPORT)
    assert job.status is JobStatus.QUEUED and "No space left" in (job.last_error or "")
    assert not classified.run_once()  # nothing to classify: the result is stored
    (result,) = store.results_for_series(job.series_instance_uid)
    assert not storage.absolute(result.sr_path).exists()

    while store.get_job(job.id).status is JobStatus.QUEUED:  # type: ignore[union-attr]
        reporter.run_once()
    done = store.get_job(job.id)
    assert done is not None and (done.status, done.attempts) == (JobStatus.DONE, 2)
    assert storage.absolute(result.sr_path).is_file()
    (infer,) = store.list_jobs(kind=JobKind.INFER)
    assert (infer.status, infer.attempts, classifications) == (JobStatus.DONE, 1, [])


def test_a_result_of_another_model_is_not_reported_under_this_ones_name(
    store: JobStore, classified: InferenceStage
) -> None:
    reporter = report_stage(store, classified.storage, classified)
    reporter.manifest = dataclasses.replace(reporter.manifest, content_hash="sha256:" + "0" * 64)
    assert reporter.run_once()
    (job,) = store.list_jobs(kind=JobKind.REPORT)
    assert job.status is JobStatus.DEAD
    assert "this process runs" in (job.last_error or "")
    assert store.list_jobs(kind=JobKind.SEND) == []


def test_an_infer_process_writes_each_sr_before_it_classifies_the_next_series(
    tmp_path: Path, store: JobStore, tiny_model: Path
) -> None:
    storage = queued_series(store, tmp_path, ["first", "second"])
    infer = infer_stage(store, storage, tiny_model, batch_size=2)
    step = first_with_work(report_stage(store, storage, infer), infer)  # as `serve` runs them
    assert [step() for _ in range(5)] == [True, True, True, True, False]
    jobs = {job.id: job for job in store.list_jobs()}
    claims = sorted(
        (event.id, jobs[job_id].kind, jobs[job_id].series_instance_uid)
        for job_id in jobs
        for event in store.job_events(job_id)
        if event.event == "claimed"
    )
    first, second = (claims[0][2], claims[2][2])
    assert [(kind, uid) for _, kind, uid in claims] == [
        (JobKind.INFER, first),
        (JobKind.REPORT, first),
        (JobKind.INFER, second),
        (JobKind.REPORT, second),
    ]
    assert first != second

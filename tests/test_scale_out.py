"""Scale-out: several `serve --stages infer` processes share one PostgreSQL queue."""

from __future__ import annotations

import io
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from pacs_node.storage import Storage
from pacs_node.store import JobKind, JobStatus, JobStore, NewInstance
from tests.peers import chest_ct
from tests.polling import wait_for
from tests.processes import NodeProcess

SERIES = 200
WORKERS = 4


def queue_one_slice_series(store: JobStore, storage: Storage, count: int) -> None:
    """`count` one-slice CT series, recorded as received and completed."""
    template = pydicom.dcmread(sorted(chest_ct().glob("*.dcm"))[10])
    received = datetime.now(timezone.utc) - timedelta(hours=1)
    for _ in range(count):
        template.StudyInstanceUID = generate_uid()
        template.SeriesInstanceUID = generate_uid()
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        template.save_as(buffer, enforce_file_format=True)
        incoming = storage.incoming_file()
        incoming.write(buffer.getvalue())
        written = storage.adopt_instance(
            template.StudyInstanceUID,
            template.SeriesInstanceUID,
            template.SOPInstanceUID,
            incoming.finish(),
        ).wait()
        store.record_instance(
            NewInstance(
                sop_instance_uid=template.SOPInstanceUID,
                sop_class_uid=template.SOPClassUID,
                series_instance_uid=template.SeriesInstanceUID,
                study_instance_uid=template.StudyInstanceUID,
                modality="CT",
                transfer_syntax_uid=template.file_meta.TransferSyntaxUID,
                path=written.relative_path,
                size=written.size,
                sha256=written.sha256,
                calling_ae="TEST",
                received_at=received,
                instance_number=1,
                images_in_acquisition=None,
                classifiable=True,
                exclusion_reason=None,
            )
        )
    completed = store.complete_ready_series(datetime.now(timezone.utc), quiet_seconds=1)
    assert len(completed) == count


def test_four_infer_processes_process_each_of_200_series_exactly_once(
    tmp_path: Path, tiny_model: Path, postgres_url: str
) -> None:
    root = tmp_path / "var"
    storage = Storage(root)
    store = JobStore(postgres_url)
    store.upgrade()
    try:
        queue_one_slice_series(store, storage, SERIES)
        workers = [
            NodeProcess(
                root,
                tiny_model,
                stages="infer",
                settings={"PACS_NODE_DATABASE__URL": postgres_url},
            )
            for _ in range(WORKERS)
        ]
        for worker in workers:
            worker.start()
        try:
            wait_for(
                lambda: (
                    len(store.list_jobs(JobStatus.DONE, JobKind.REPORT, limit=SERIES + 1)) == SERIES
                ),
                600,
                f"{SERIES} infer and report jobs done",
                interval=1.0,
            )
        finally:
            for worker in workers:
                worker.stop()

        jobs = store.list_jobs(kind=JobKind.INFER, limit=SERIES * 2)
        assert len(jobs) == SERIES and all(job.status is JobStatus.DONE for job in jobs)
        results = [store.results_for_series(job.series_instance_uid) for job in jobs]
        assert Counter(len(of_series) for of_series in results) == Counter({1: SERIES})
        assert all(storage.absolute(result.sr_path).is_file() for (result,) in results)
        reports = store.list_jobs(kind=JobKind.REPORT, limit=SERIES * 2)
        assert len(reports) == SERIES
        jobs += reports
        # Each job was claimed once: no two workers ever held the same job,
        # and none failed on the way.
        histories = {job.id: [event.event for event in store.job_events(job.id)] for job in jobs}
        repeated = {
            job_id: events for job_id, events in histories.items() if events.count("claimed") != 1
        }
        assert not repeated, repeated
        # And the work really was shared.
        shares = Counter(job.worker_id for job in jobs if job.kind is JobKind.INFER)
        print(f"jobs per worker: {sorted(shares.values())}")
        assert len(shares) >= 2
    finally:
        store.close()

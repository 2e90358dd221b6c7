"""The infer stage: claim a series job, classify it, write its SR, queue sends.

The result row, the send jobs and the job's completion are committed in one
transaction after the SR file is durable. The SR's SOP Instance UID depends
only on (series, model version, revision), so a crash anywhere before that
commit makes the retry write the very same object again, never a second one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite
from pydicom.uid import Comprehensive3DSRStorage

from models.manifest import Manifest
from models.pixel_layout import PixelLayout
from pacs_node.errors import PermanentError
from pacs_node.inference import (
    SeriesClassification,
    SeriesClassifier,
    StoredSlice,
    reference_header,
)
from pacs_node.report import PredecessorReport, ReportingNode, build_report
from pacs_node.stage import Done, JobStage, Worker
from pacs_node.storage import Storage
from pacs_node.store import Job, JobKind, JobStore, NewResult

log = logging.getLogger(__name__)


class InferenceStage(JobStage):
    kind = JobKind.INFER

    def __init__(
        self,
        store: JobStore,
        worker: Worker,
        storage: Storage,
        classifier: SeriesClassifier,
        node: ReportingNode,
        destinations: Sequence[str],
        send_max_attempts: int,
        give_way: Callable[[], float] = lambda: 0.0,
    ) -> None:
        """`give_way` runs between batches and returns the seconds it waited for the
        receiver (see `pacs_node.reception`)."""
        super().__init__(store, worker)
        self.storage = storage
        self.classifier = classifier
        self.node = node
        self.destinations = list(destinations)
        self.send_max_attempts = send_max_attempts
        self.give_way = give_way

    @property
    def manifest(self) -> Manifest:
        return self.classifier.predictor.manifest

    def process(self, job: Job) -> Done:
        instances = self.store.series_instances(job.series_instance_uid)
        if not instances:
            raise PermanentError("the series has no classifiable instance")
        paths = [
            StoredSlice(
                self.storage.absolute(instance.path),
                PixelLayout.from_text(instance.pixel_layout) if instance.pixel_layout else None,
                reference_header(
                    instance.sop_class_uid,
                    instance.sop_instance_uid,
                    instance.series_instance_uid,
                    instance.study_instance_uid,
                    instance.instance_number,
                ),
            )
            for instance in instances
        ]
        waited = 0.0
        renewed = time.monotonic()

        def between_batches() -> None:
            nonlocal waited, renewed
            waited += self.give_way()
            # Not after every batch: each renewal is a synced commit (~1.5 ms here,
            # 19 per 300 slices), and a quarter of the lease leaves time enough.
            if time.monotonic() - renewed >= self.worker.lease_seconds / 4:
                self.renew(job)
                renewed = time.monotonic()

        classification = self.classifier.classify(paths, on_batch=between_batches)
        for name, reason in classification.skipped:
            log.warning(
                "slice not classified",
                extra={"action": "infer", "job_id": job.id, "sop_uid": name, "reason": reason},
            )
        report_started = time.perf_counter()
        report = build_report(
            sources=classification.headers,
            result=classification.result,
            manifest=self.manifest,
            revision=job.revision,
            node=self.node,
            predecessor=self._predecessor(job),
        )
        written = self.storage.write(
            self.storage.report_path(str(report.StudyInstanceUID), str(report.SOPInstanceUID)),
            [encode_report(report)],
        )
        self.store.complete_inference(
            job.id,
            self.worker.worker_id,
            _new_result(job, classification, report, self.manifest, written.relative_path),
            self.destinations,
            max_attempts=self.send_max_attempts,
        )
        report_seconds = time.perf_counter() - report_started
        probabilities = ", ".join(
            f"{name} {value:.3f}"
            for name, value in zip(
                classification.result.classes, classification.result.probabilities, strict=True
            )
        )
        return Done(
            f"series classified as {classification.result.label} ({probabilities}) from "
            f"{len(classification.headers)} slices, revision {job.revision}",
            {
                "decode_seconds": classification.decode_seconds,
                "forward_seconds": classification.forward_seconds,
                "report_seconds": report_seconds,
                "receiving_wait_seconds": waited,
            },
        )

    def _predecessor(self, job: Job) -> PredecessorReport | None:
        previous = self.store.previous_result(
            job.series_instance_uid, self.manifest.version, before_revision=job.revision
        )
        if previous is None:
            return None
        return PredecessorReport(
            study_instance_uid=previous.study_instance_uid,
            series_instance_uid=previous.sr_series_instance_uid,
            sop_instance_uid=previous.sr_sop_instance_uid,
            sop_class_uid=Comprehensive3DSRStorage,
        )


def encode_report(report: Dataset) -> bytes:
    """The SR as the bytes of a DICOM file."""
    buffer = DicomBytesIO()
    dcmwrite(buffer, report, enforce_file_format=True)
    return buffer.getvalue()


def _new_result(
    job: Job,
    classification: SeriesClassification,
    report: Dataset,
    manifest: Manifest,
    sr_path: str,
) -> NewResult:
    result = classification.result
    return NewResult(
        series_instance_uid=job.series_instance_uid,
        study_instance_uid=str(report.StudyInstanceUID),
        revision=job.revision,
        model_name=manifest.name,
        model_version=manifest.version,
        model_hash=manifest.content_hash,
        label=result.label,
        probabilities=dict(zip(result.classes, result.probabilities, strict=True)),
        slices=classification.slices,
        evidence=classification.evidence_uids,
        sr_sop_instance_uid=str(report.SOPInstanceUID),
        sr_series_instance_uid=str(report.SeriesInstanceUID),
        sr_path=sr_path,
    )

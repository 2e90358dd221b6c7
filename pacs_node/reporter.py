"""The report stage: write the SR of one stored result, then queue its sends.

The infer stage stores the result (classes, probabilities, the classified
slices, the SR's UIDs and path, all derived from the series, model version and
revision) and queues a REPORT job. This stage rebuilds the report's sources
from the job store (the classified slices' rows; the first slice's header,
whose patient and study the report copies, from its file), writes the SR
durably at the result's path, and only then queues one SEND job per
destination. A crash before that commit makes the retry write the very same
object again; a failed SR write is retried without classifying again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite
from pydicom.uid import Comprehensive3DSRStorage

from models.aggregation import SeriesResult
from models.manifest import Manifest
from pacs_node.errors import PermanentError
from pacs_node.inference import instance_reference, report_sources
from pacs_node.report import PredecessorReport, ReportingNode, build_report
from pacs_node.stage import Done, JobStage, Worker
from pacs_node.storage import Storage
from pacs_node.store import Job, JobKind, JobStore, Result


class ReportStage(JobStage):
    kind = JobKind.REPORT

    def __init__(
        self,
        store: JobStore,
        worker: Worker,
        storage: Storage,
        manifest: Manifest,
        node: ReportingNode,
        destinations: Sequence[str],
        send_max_attempts: int,
    ) -> None:
        """`manifest`: the model this process classifies with; it reports only results
        of that very model, as the SR names it."""
        super().__init__(store, worker)
        self.storage = storage
        self.manifest = manifest
        self.node = node
        self.destinations = list(dict.fromkeys(destinations))  # each once, in order
        self.send_max_attempts = send_max_attempts

    def process(self, job: Job) -> Done:
        started = time.perf_counter()
        result = self.store.get_result(job.result_id) if job.result_id is not None else None
        if result is None:
            raise PermanentError(f"job {job.id} has no result to report")
        if result.model_hash != self.manifest.content_hash:
            raise PermanentError(
                f"the result was made by model {result.model_name} {result.model_version} "
                f"({result.model_hash}); this process runs {self.manifest.model_id} "
                f"({self.manifest.content_hash}), whose name the SR would carry"
            )
        sources = self._sources(result)
        report = build_report(
            sources=sources,
            result=series_result(result, self.manifest.classes),
            manifest=self.manifest,
            revision=result.revision,
            node=self.node,
            predecessor=self._predecessor(result),
        )
        if str(report.SOPInstanceUID) != result.sr_sop_instance_uid:
            raise PermanentError(
                f"the SR would be {report.SOPInstanceUID}, not the result's "
                f"{result.sr_sop_instance_uid}"
            )
        self.storage.write(result.sr_path, [encode_report(report)])
        self.store.complete_report(
            job.id,
            self.worker.worker_id,
            self.destinations,
            max_attempts=self.send_max_attempts,
        )
        return Done(
            f"SR written for revision {result.revision}, {len(self.destinations)} send(s) queued",
            {"report_seconds": time.perf_counter() - started},
        )

    def _sources(self, result: Result) -> list[Dataset]:
        """The classified slices' headers, in the result's order: the first whole but
        its pixel data, the others only what the report references."""
        instances = {
            instance.sop_instance_uid: instance
            for instance in self.store.series_instances(result.series_instance_uid)
        }
        uids = [str(item["sop_instance_uid"]) for item in result.slices]
        missing = [uid for uid in uids if uid not in instances]
        if missing:
            raise PermanentError(
                f"{len(missing)} classified slice(s) are no longer stored, e.g. {missing[0]}"
            )
        first = self.storage.absolute(instances[uids[0]].path)
        return report_sources(first, (instance_reference(instances[uid]) for uid in uids[1:]))

    def _predecessor(self, result: Result) -> PredecessorReport | None:
        previous = self.store.previous_result(
            result.series_instance_uid, result.model_version, before_revision=result.revision
        )
        if previous is None:
            return None
        return PredecessorReport(
            study_instance_uid=previous.study_instance_uid,
            series_instance_uid=previous.sr_series_instance_uid,
            sop_instance_uid=previous.sr_sop_instance_uid,
            sop_class_uid=Comprehensive3DSRStorage,
        )


def series_result(result: Result, classes: Sequence[str]) -> SeriesResult:
    """The aggregate a stored result records, as `build_report` takes it."""
    if set(result.probabilities) != set(classes):
        raise PermanentError(
            f"the result's classes {sorted(result.probabilities)} are not the model's "
            f"{sorted(classes)}"
        )
    positions = {str(item["sop_instance_uid"]): index for index, item in enumerate(result.slices)}
    return SeriesResult(
        classes=tuple(classes),
        label=result.label,
        probabilities=tuple(result.probabilities[name] for name in classes),
        evidence=tuple(positions[uid] for uid in result.evidence),
    )


def encode_report(report: Dataset) -> bytes:
    """The SR as the bytes of a DICOM file."""
    buffer = DicomBytesIO()
    dcmwrite(buffer, report, enforce_file_format=True)
    return buffer.getvalue()

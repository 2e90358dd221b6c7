"""The infer stage: claim a series job, classify it, store the result.

The result row, the series' REPORT job and the job's completion are committed
in one transaction; the report stage (`pacs_node.reporter`) writes the SR from
that row. The result names the SR it will have: its UIDs and path depend only
on (series, model version, revision), so a retry after a crash stores the very
same result, never a second one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from models.manifest import Manifest
from models.pixel_layout import PixelLayout
from pacs_node.errors import PermanentError
from pacs_node.inference import (
    SeriesClassification,
    SeriesClassifier,
    StoredSlice,
    instance_reference,
)
from pacs_node.report import sr_series_uid, sr_sop_instance_uid
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
        give_way: Callable[[], float] = lambda: 0.0,
    ) -> None:
        """`give_way` runs between batches and returns the seconds it waited for the
        receiver (see `pacs_node.reception`)."""
        super().__init__(store, worker)
        self.storage = storage
        self.classifier = classifier
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
                instance_reference(instance),
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
        self.store.complete_inference(
            job.id, self.worker.worker_id, self._new_result(job, classification)
        )
        result = classification.result
        probabilities = ", ".join(
            f"{name} {value:.3f}"
            for name, value in zip(result.classes, result.probabilities, strict=True)
        )
        return Done(
            f"series classified as {result.label} ({probabilities}) from "
            f"{len(classification.slices)} slices, revision {job.revision}",
            {
                "decode_seconds": classification.decode_seconds,
                "forward_seconds": classification.forward_seconds,
                "receiving_wait_seconds": waited,
            },
        )

    def _new_result(self, job: Job, classification: SeriesClassification) -> NewResult:
        result = classification.result
        manifest = self.manifest
        # The report joins the study of its sources (one study: `build_report` checks).
        study_uid = str(classification.headers[0].StudyInstanceUID)
        sr_uid = sr_sop_instance_uid(job.series_instance_uid, manifest.version, job.revision)
        return NewResult(
            series_instance_uid=job.series_instance_uid,
            study_instance_uid=study_uid,
            revision=job.revision,
            model_name=manifest.name,
            model_version=manifest.version,
            model_hash=manifest.content_hash,
            label=result.label,
            probabilities=dict(zip(result.classes, result.probabilities, strict=True)),
            slices=classification.slices,
            evidence=classification.evidence_uids,
            sr_sop_instance_uid=sr_uid,
            sr_series_instance_uid=sr_series_uid(job.series_instance_uid, manifest.version),
            sr_path=self.storage.report_path(study_uid, sr_uid),
        )

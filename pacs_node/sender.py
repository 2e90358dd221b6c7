"""The send stage: deliver each result's SR to each configured destination.

One of the two modules that import pynetdicom (the other is `receiver`).
Each (result, destination) pair is its own job, so a destination that is
down delays only its own deliveries; failures are retried with exponential
backoff and jitter until the job's attempts run out, then it is `dead` and
visible in `pacs-node jobs list` until an operator retries it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from pacs_node.config import Destination
from pacs_node.errors import PermanentError, RetryableError
from pacs_node.stage import Done, JobStage, Worker
from pacs_node.storage import Storage
from pacs_node.store import Job, JobKind, JobStore

# C-STORE statuses that mean the object is stored (PS3.4 B.2.3: Success and Warnings).
_STORED = {0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}


class DeliveryFailedError(RetryableError):
    """The destination did not accept the SR this time."""


def send_file(
    path: Path, sop_class_uid: str, calling_ae: str, destination: Destination, timeout: float
) -> int:
    """C-STORE one file to `destination`; returns the status it answered."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(sop_class_uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    association = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not association.is_established:
        why = (
            "rejected" if association.is_rejected else "not established (peer down or unreachable)"
        )
        raise DeliveryFailedError(f"association to {destination.key} {why}")
    try:
        reply = association.send_c_store(path)
    finally:
        association.release()
    if "Status" not in reply:
        raise DeliveryFailedError(f"no C-STORE response from {destination.key}")
    return int(reply.Status)


class SendStage(JobStage):
    kind = JobKind.SEND

    def __init__(
        self,
        store: JobStore,
        worker: Worker,
        storage: Storage,
        destinations: Sequence[Destination],
        calling_ae: str,
        timeout_seconds: float = 30.0,
    ) -> None:
        super().__init__(store, worker)
        self.storage = storage
        self.destinations = {destination.key: destination for destination in destinations}
        self.calling_ae = calling_ae
        self.timeout_seconds = timeout_seconds

    def process(self, job: Job) -> Done:
        status = self._deliver(job)
        self.store.complete_send(job.id, self.worker.worker_id)
        return Done(f"SR delivered (status 0x{status:04X})")

    def _deliver(self, job: Job) -> int:
        destination = self.destinations.get(job.destination or "")
        if destination is None:
            raise PermanentError(f"destination {job.destination} is no longer configured")
        result = self.store.get_result(job.result_id) if job.result_id is not None else None
        if result is None:
            raise PermanentError(f"job {job.id} has no result to send")
        path = self.storage.absolute(result.sr_path)
        if not path.is_file():
            raise PermanentError(f"SR file {result.sr_path} is missing from storage")
        status = send_file(
            path, _sop_class_of(path), self.calling_ae, destination, self.timeout_seconds
        )
        if status not in _STORED:
            raise DeliveryFailedError(f"{destination.key} answered C-STORE status 0x{status:04X}")
        return status


def _sop_class_of(path: Path) -> str:
    return str(read_file_meta_info(path).MediaStorageSOPClassUID)

"""Crash harness: send series continuously while SIGKILLing the node at random.

    .venv/bin/python -m tests.crash_harness --kills 50     # the soak, by hand

`make test` runs a short version (tests/test_crash_safety.py). Afterwards it
checks the node's promises: every instance acknowledged with Success exists
with its row and byte-identical data set; every complete series has exactly
one SR object at the destination; none is missing, none duplicated.
"""

from __future__ import annotations

import argparse
import random
import signal
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association

from pacs_node.report import read_report
from pacs_node.store import JobStatus, JobStore
from tests.dicom_data import tiny_artifact
from tests.peers import CHEST_CT
from tests.polling import wait_for
from tests.processes import NodeProcess, StoreSCP

SLICES_PER_SERIES = 5


@dataclass
class Sent:
    """What the sender knows: instances acknowledged with Success, by series."""

    data_sets: dict[str, bytes] = field(default_factory=dict)  # SOP UID -> data set bytes
    series: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    complete_series: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Sender(threading.Thread):
    """A PACS that sends 5-slice series and retries each instance until Success."""

    def __init__(self, port: int, workdir: Path, sent: Sent) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.workdir = workdir
        self.sent = sent
        self.keep_sending = threading.Event()
        self.keep_sending.set()
        # Set while a C-STORE is on the wire: a kill then interrupts receiving.
        self.storing = threading.Event()
        self.templates = [
            pydicom.dcmread(path) for path in sorted(CHEST_CT.glob("*.dcm"))[:SLICES_PER_SERIES]
        ]
        self._association: Association | None = None

    def run(self) -> None:
        while self.keep_sending.is_set():
            self._send_series()

    def _send_series(self) -> None:
        study, series = generate_uid(), generate_uid()
        for number, template in enumerate(self.templates, start=1):
            template.StudyInstanceUID, template.SeriesInstanceUID = study, series
            template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            template.InstanceNumber = number
            template.ImagesInAcquisition = SLICES_PER_SERIES
            path = self.workdir / f"{template.SOPInstanceUID}.dcm"
            template.save_as(path, enforce_file_format=True)
            self._send_until_stored(pydicom.dcmread(path))
            with self.sent.lock:
                self.sent.data_sets[str(template.SOPInstanceUID)] = _data_set_bytes(path)
                self.sent.series[series].append(str(template.SOPInstanceUID))
            path.unlink()
        with self.sent.lock:
            self.sent.complete_series.add(series)

    def _send_until_stored(self, dataset: Dataset) -> None:
        while True:
            try:
                association = self._connected(dataset)
                if association is not None:
                    self.storing.set()
                    reply = association.send_c_store(dataset)
                    self.storing.clear()
                    if reply and int(reply.get("Status", -1)) == 0x0000:
                        return
            except (ConnectionError, OSError, RuntimeError, AttributeError):
                pass  # the node died under us: reconnect and send again
            self.storing.clear()
            self._drop()
            time.sleep(0.2)

    def _connected(self, dataset: Dataset) -> Association | None:
        if self._association is None or not self._association.is_established:
            ae = AE(ae_title="HARNESS")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
            ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
            association = ae.associate("127.0.0.1", self.port, ae_title="PACSNODE")
            self._association = association if association.is_established else None
        return self._association

    def _drop(self) -> None:
        if self._association is not None:
            self._association.abort()
            self._association = None

    def stop(self) -> None:
        self.keep_sending.clear()
        self.join(timeout=300)
        if self._association is not None and self._association.is_established:
            self._association.release()


def _data_set_bytes(path: Path) -> bytes:
    """The data set after the file meta information, as the receiver must keep it."""
    raw = path.read_bytes()
    meta_length = int.from_bytes(raw[140:144], "little")  # (0002,0000) value
    return raw[144 + meta_length :]


@dataclass
class Figures:
    kills: int
    stages_killed: Counter[str]
    acknowledged: int
    lost: int
    srs_expected: int
    srs_delivered: int
    srs_missing: int
    srs_duplicated: int
    redundant_deliveries: int

    def table(self) -> str:
        stages = ", ".join(
            f"{stage} {count}" for stage, count in sorted(self.stages_killed.items())
        )
        return "\n".join(
            [
                f"kills                     {self.kills} (stages running: {stages})",
                f"instances acknowledged    {self.acknowledged}",
                f"instances lost            {self.lost}",
                f"SRs expected              {self.srs_expected}",
                f"SRs delivered             {self.srs_delivered}",
                f"SRs missing               {self.srs_missing}",
                f"SRs duplicated            {self.srs_duplicated}",
                f"same SR re-delivered      {self.redundant_deliveries}",
            ]
        )


def run(workdir: Path, kills: int, seed: int = 0) -> Figures:
    chance = random.Random(seed)
    model = tiny_artifact(workdir / "model")
    destination = StoreSCP(workdir / "destination", unique_names=True).start()
    node = NodeProcess(
        workdir / "var",
        model,
        destinations=[("DEST", destination.port)],
        # Series complete by content; the quiet period must not cut one short
        # while the node restarts between two of its instances.
        settings={"PACS_NODE_SERIES__QUIET_SECONDS": "120"},
    ).start()
    sent = Sent()
    sender_folder = workdir / "sending"
    sender_folder.mkdir()
    sender = Sender(node.port, sender_folder, sent)
    sender.start()
    stages: Counter[str] = Counter()
    store = JobStore(_sqlite(workdir))
    try:
        for _ in range(kills):
            time.sleep(chance.uniform(0.2, 2.0))
            stages.update(_stages(sender, store))
            node.stop(signal.SIGKILL)
            node.start()
        sender.stop()
        wait_for(lambda: _all_reported(destination, sent), 600, "an SR for every series", 0.5)
        wait_for(lambda: _queue_empty(store), 300, "the job queue to drain", 0.5)
        node.stop()
        return _figures(kills, stages, sent, store, workdir / "var", destination)
    finally:
        sender.keep_sending.clear()
        node.stop(signal.SIGKILL)
        destination.stop()
        store.close()


def _stages(sender: Sender, store: JobStore) -> list[str]:
    """What the node was doing at the moment of a kill."""
    stages = [str(job.kind) for job in store.list_jobs(status=JobStatus.RUNNING)]
    if sender.storing.is_set():
        stages.append("receive")
    return stages or ["idle"]


def _sqlite(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'var' / 'pacs-node.sqlite3'}"


def _reports(destination: StoreSCP) -> list[tuple[str, str]]:
    """(source series, SR SOP Instance UID) for every file the destination received."""
    return [
        (read_report(report).source_series_uid, str(report.SOPInstanceUID))
        for report in (pydicom.dcmread(path) for path in destination.received())
    ]


def _all_reported(destination: StoreSCP, sent: Sent) -> bool:
    reported = {series for series, _ in _reports(destination)}
    return sent.complete_series <= reported


def _queue_empty(store: JobStore) -> bool:
    return store.queue_depth() == 0


def _intact(root: Path, path: str | None, data_set: bytes) -> bool:
    """The instance has its row and its file holds the acknowledged data set."""
    return (
        path is not None
        and (root / path).is_file()
        and (root / path).read_bytes().endswith(data_set)
    )


def _figures(
    kills: int, stages: Counter[str], sent: Sent, store: JobStore, root: Path, destination: StoreSCP
) -> Figures:
    lost = 0
    for series_uid, sop_uids in sent.series.items():
        rows = {row.sop_instance_uid: row.path for row in store.series_instances(series_uid)}
        lost += sum(
            not _intact(root, rows.get(sop_uid), sent.data_sets[sop_uid]) for sop_uid in sop_uids
        )
    receipts = _reports(destination)
    objects: dict[str, set[str]] = defaultdict(set)
    for series_uid, sop_uid in receipts:
        objects[series_uid].add(sop_uid)
    expected = sent.complete_series
    dead = store.list_jobs(status=JobStatus.DEAD, limit=1000)
    assert not dead, f"dead jobs: {[(job.id, job.last_error) for job in dead]}"
    return Figures(
        kills=kills,
        stages_killed=stages,
        acknowledged=len(sent.data_sets),
        lost=lost,
        srs_expected=len(expected),
        srs_delivered=sum(1 for series in expected if objects.get(series)),
        srs_missing=sum(1 for series in expected if not objects.get(series)),
        srs_duplicated=sum(len(uids) - 1 for uids in objects.values() if len(uids) > 1),
        redundant_deliveries=len(receipts) - sum(len(uids) for uids in objects.values()),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pacs-node-crash-") as scratch:
        figures = run(Path(scratch), arguments.kills, arguments.seed)
    print(figures.table())
    clean = figures.lost == figures.srs_missing == figures.srs_duplicated == 0
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())

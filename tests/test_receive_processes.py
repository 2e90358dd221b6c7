"""dicom.receive_processes: several processes accept from one port, within one association limit."""

from __future__ import annotations

import os
import signal
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom.association import Association

from pacs_node import cores
from pacs_node.config import Settings, StorageSettings
from pacs_node.service import Node
from pacs_node.store import JobStore
from tests.bad_input import answer_to, association_request, ct_slice, rejection
from tests.dicom_data import renamed_series, series_uid
from tests.peers import chest_ct
from tests.polling import wait_for
from tests.processes import NodeProcess, descendants, storescu
from tests.scu import associate

LOCAL_LIMIT_EXCEEDED = rejection(2, 3, 2)  # transient, service provider (presentation)


def established_connections(pids: list[int], port: int) -> Counter[int]:
    """How many established TCP connections to local `port` each process holds."""
    on_port: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            local_port = int(fields[1].rpartition(":")[2], 16)
            if local_port == port and fields[3] == "01":  # ESTABLISHED
                on_port.add(fields[9])  # the socket's inode
    held: Counter[int] = Counter()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = str(fd.readlink())
            if target.startswith("socket:[") and target[8:-1] in on_port:
                held[pid] += 1
    return held


def open_associations(
    port: int, count: int, dataset: Dataset | None = None, first: int = 0
) -> list[Association]:
    """`count` associations, called HOLD<first>, HOLD<first + 1>, ... for `dataset`'s
    SOP class (by default a CT slice's)."""
    dataset = dataset or ct_slice()
    return [
        associate(port, dataset, calling_ae=f"HOLD{index}") for index in range(first, first + count)
    ]


def spread_associations(node: NodeProcess, dataset: Dataset, count: int) -> list[Association]:
    """`count` associations to `node`, held by at least two of its processes.

    Which process accepts is the kernel's choice, and an idle node may hand every
    one to the same process. Should it, that process is stopped while the last
    association is made, so that another must accept it.
    """
    held = open_associations(node.port, count - 1, dataset)
    serving = established_connections([node.pid, *descendants(node.pid)], node.port)
    only = next(iter(serving)) if len(serving) == 1 else None
    if only is not None:
        os.kill(only, signal.SIGSTOP)
    try:
        held += open_associations(node.port, 1, dataset, first=count - 1)
    finally:
        if only is not None:
            os.kill(only, signal.SIGCONT)
    return held


def receiving_node(
    folder: Path,
    model: Path,
    processes: int,
    max_associations: int = 16,
    database_url: str | None = None,
) -> NodeProcess:
    settings = {
        "PACS_NODE_DICOM__RECEIVE_PROCESSES": str(processes),
        "PACS_NODE_DICOM__MAX_ASSOCIATIONS": str(max_associations),
    }
    if database_url:
        settings["PACS_NODE_DATABASE__URL"] = database_url
    return NodeProcess(folder, model, stages="receive", settings=settings)


@pytest.mark.parametrize(
    ("usable", "ready_line"), [(1, None), (2, "(2 processes)"), (16, "(4 processes)")]
)
def test_a_receiving_serve_takes_its_receiving_processes_from_its_cores_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, usable: int, ready_line: str | None
) -> None:
    monkeypatch.setattr(cores, "usable_cores", lambda: usable)
    settings = Settings(storage=StorageSettings(root=tmp_path / "storage"))
    assert settings.dicom.receive_processes == "auto"
    described = Node(settings, ["receive"]).describe()
    if ready_line is None:
        assert "processes)" not in described, described
    else:
        assert ready_line in described, described


def test_associations_spread_over_the_processes_and_count_against_one_limit(
    tmp_path: Path, tiny_model: Path
) -> None:
    with receiving_node(tmp_path / "node", tiny_model, 3, max_associations=12) as node:
        assert any("(3 processes)" in line for line in node.lines)
        held = spread_associations(node, ct_slice(), 12)
        try:
            serving = established_connections([node.pid, *descendants(node.pid)], node.port)
            assert sum(serving.values()) == 12
            assert len(serving) >= 2, serving
            for _ in range(6):  # whichever process accepts it, the limit is reached
                assert answer_to(node.port, association_request("ONEMORE")) == LOCAL_LIMIT_EXCEEDED
        finally:
            for association in held:
                association.release()
        # Released everywhere: the whole limit is free again.
        for association in open_associations(node.port, 12):
            association.release()


def test_series_sent_over_associations_in_several_processes_are_stored_whole(
    tmp_path: Path, tiny_model: Path, database_url: str
) -> None:
    JobStore(database_url).upgrade()  # serve migrates only SQLite itself
    paths = sorted(chest_ct().glob("*.dcm"))
    slices = [pydicom.dcmread(path) for path in paths]
    node = receiving_node(tmp_path / "node", tiny_model, 3, database_url=database_url)
    with node:
        # One series over nine associations held open, seen spread over processes.
        associations = spread_associations(node, slices[0], 9)
        try:
            serving = established_connections([node.pid, *descendants(node.pid)], node.port)
            assert len(serving) >= 2, serving
            statuses = [
                int(associations[index % 9].send_c_store(dataset).Status)
                for index, dataset in enumerate(slices)
            ]
        finally:
            for association in associations:
                association.release()
        assert statuses == [0x0000] * len(slices)
        # Another by nine DCMTK senders at once, so that the processes' rows race.
        second = renamed_series(chest_ct(), tmp_path / "second")
        with ThreadPoolExecutor(9) as senders:
            sent = list(
                senders.map(lambda n: storescu(node.port, "PACSNODE", second[n::9]), range(9))
            )
        assert all(result.returncode == 0 for result in sent), [r.stderr for r in sent]
        assert len(list((tmp_path / "node" / "instances").rglob("*.dcm"))) == 2 * len(paths)

        # Their rows make two series, each queued once for inference.
        def both_queued() -> list[dict[str, Any]] | None:
            jobs = node.jobs("infer")
            return jobs if len(jobs) == 2 else None

        jobs = wait_for(both_queued, 30, "the two series' infer jobs")
        assert {job["series_instance_uid"] for job in jobs} == {
            slices[0].SeriesInstanceUID,
            series_uid(second),
        }


def test_a_killed_receive_process_is_restarted_and_its_associations_freed(
    tmp_path: Path, tiny_model: Path
) -> None:
    with receiving_node(tmp_path / "node", tiny_model, 2, max_associations=6) as node:
        children = descendants(node.pid)
        for _ in range(10):  # until the child holds some (the kernel picks who accepts)
            held = open_associations(node.port, 6)
            serving = established_connections(children, node.port)
            if serving:
                break
            for association in held:
                association.release()
        ((child, count),) = serving.items()
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: node.has_logged("restarting it"), 30, "the parent to restart its child")
        wait_for(lambda: len(descendants(node.pid)) == len(children), 30, "the new child to run")
        # The killed process's associations no longer count against the limit.
        freed = open_associations(node.port, count)
        assert answer_to(node.port, association_request("ONEMORE")) == LOCAL_LIMIT_EXCEEDED
        for association in held + freed:
            if association.is_established:
                association.release()

"""Results reach the PACS exactly once: outages, dead jobs, and late instances."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom

from pacs_node.report import read_report
from tests.dicom_data import renamed_series
from tests.peers import chest_ct
from tests.polling import wait_for
from tests.processes import NodeProcess, StoreSCP, storescu


def test_a_dead_delivery_is_listed_retried_by_the_operator_and_delivered_once(
    tmp_path: Path, tiny_model: Path
) -> None:
    files = renamed_series(chest_ct(), tmp_path / "series", count=4)
    destination = StoreSCP(tmp_path / "destination")  # not started: the PACS is down
    node = NodeProcess(
        tmp_path / "node",
        tiny_model,
        destinations=[("DEST", destination.port)],
        settings={"PACS_NODE_RESULTS__MAX_ATTEMPTS": "2"},
    )
    with node:
        assert storescu(node.port, "PACSNODE", files).returncode == 0
        (dead,) = wait_for(lambda: node.jobs("send", "dead"), 120, "the send job to die")
        assert dead["attempts"] == 2
        assert "not established" in dead["last_error"]
        listing = node.run("jobs", "list").stdout
        assert "dead" in listing and "DEST@127.0.0.1" in listing
        history = node.run("jobs", "show", str(dead["id"])).stdout
        assert history.count("failed") >= 1 and "dead" in history

        with destination:
            assert "queued again" in node.run("jobs", "retry", str(dead["id"])).stdout
            wait_for(lambda: node.jobs("send", "done"), 60, "the revived send job to finish")
            assert len(destination.received()) == 1


def test_late_instances_reopen_the_series_and_the_new_sr_supersedes_the_old(
    tmp_path: Path, tiny_model: Path
) -> None:
    files = renamed_series(chest_ct(), tmp_path / "series", count=6)
    with (
        StoreSCP(tmp_path / "destination") as destination,
        NodeProcess(
            tmp_path / "node", tiny_model, destinations=[("DEST", destination.port)]
        ) as node,
    ):
        assert storescu(node.port, "PACSNODE", files[:4]).returncode == 0
        (first_file,) = wait_for(destination.received, 120, "the first SR")
        first = pydicom.dcmread(first_file)

        # The same instances again change nothing ...
        assert storescu(node.port, "PACSNODE", files[:4]).returncode == 0
        # ... but two late instances reopen the series.
        assert storescu(node.port, "PACSNODE", files[4:]).returncode == 0
        reports = wait_for(
            lambda: [path for path in destination.received() if path != first_file] or None,
            120,
            "the superseding SR",
        )

        def infer_jobs_once_both_sent() -> list[dict[str, Any]] | None:
            return node.jobs("infer") if len(node.jobs("send", "done")) == 2 else None

        infer = wait_for(infer_jobs_once_both_sent, 60, "both deliveries")
    (second_file,) = reports
    second = pydicom.dcmread(second_file)
    assert len(infer) == 2 and {job["revision"] for job in infer} == {1, 2}
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    summary = read_report(second)
    assert summary.predecessor_sop_uids == (first.SOPInstanceUID,)
    assert (
        len(
            second.CurrentRequestedProcedureEvidenceSequence[0]
            .ReferencedSeriesSequence[0]
            .ReferencedSOPSequence
        )
        == 6
    )

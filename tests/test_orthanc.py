"""Orthanc as the PACS: it sends a series to the node and receives the node's SR."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pydicom

from pacs_node.report import read_report
from tests.dicom_data import renamed_series
from tests.orthanc import Orthanc
from tests.peers import chest_ct, free_port
from tests.polling import wait_for
from tests.processes import NodeProcess


def test_orthanc_sends_a_series_and_gets_the_sr_in_the_same_study(
    tmp_path: Path, tiny_model: Path
) -> None:
    files = renamed_series(chest_ct(), tmp_path / "series")
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc")
    orthanc.add_modality("node", "PACSNODE", node_port)
    with (
        orthanc,
        NodeProcess(
            tmp_path / "node",
            tiny_model,
            port=node_port,
            destinations=[("ORTHANC", orthanc.dicom_port)],
        ) as node,
    ):
        for path in files:
            orthanc.post("/instances", path.read_bytes(), content_type="application/dicom")
        (study,) = orthanc.get("/studies")
        (series,) = orthanc.get(f"/studies/{study}/series")
        stored = orthanc.post("/modalities/node/store", json.dumps(series["ID"]).encode())
        assert stored["InstancesCount"] == 30 and stored["FailedInstancesCount"] == 0

        def sr_series() -> list[dict[str, Any]]:
            return [
                item
                for item in orthanc.get(f"/studies/{study}/series")
                if item["MainDicomTags"].get("Modality") == "SR"
            ]

        (report_series,) = wait_for(sr_series, 180, "the SR series in Orthanc's study")
        (instance,) = report_series["Instances"]
        report = pydicom.dcmread(io.BytesIO(orthanc.get_bytes(f"/instances/{instance}/file")))
        offline = json.loads(node.run("classify", "--json", str(tmp_path / "series")).stdout)

    summary = read_report(report)
    (expected,) = offline["series"]
    assert report.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID
    assert summary.source_series_uid == expected["series_instance_uid"]
    assert summary.label == expected["label"]
    assert summary.probabilities.keys() == expected["probabilities"].keys()
    for name, value in expected["probabilities"].items():
        assert abs(summary.probabilities[name] - value) < 1e-6
    assert set(summary.evidence_sop_uids) == set(expected["evidence"])

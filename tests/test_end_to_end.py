"""The product's spine over real associations: DCMTK in, the node, an SR out.

Every test runs `pacs-node serve` as a subprocess with a tiny random model,
sends with DCMTK's storescu (or pynetdicom as an SCU where the exact status
matters) and receives the SR with DCMTK's storescp.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage

from pacs_node.report import read_report
from tests.dicom_data import renamed_series, series_uid, variant
from tests.peers import chest_ct, dciodvfy, dcmtk_environment, free_port, tool
from tests.polling import wait_for
from tests.processes import NodeProcess, StoreSCP, echo, storescu
from tests.scu import store_status

SR_TIMEOUT = 180.0


def classify_json(node: NodeProcess, folder: Path) -> dict[str, Any]:
    completed = node.run("classify", "--json", str(folder))
    document = json.loads(completed.stdout)
    (series,) = document["series"]
    return dict(series)


def only_sr(destination: StoreSCP) -> Dataset:
    files = wait_for(destination.received, SR_TIMEOUT, "an SR at the destination")
    assert len(files) == 1, f"expected one SR, got {len(files)}"
    return pydicom.dcmread(files[0])


def test_series_from_storescu_comes_back_as_one_valid_sr(tmp_path: Path, tiny_model: Path) -> None:
    files = renamed_series(chest_ct(), tmp_path / "series")
    with (
        StoreSCP(tmp_path / "destination") as destination,
        NodeProcess(
            tmp_path / "node", tiny_model, destinations=[("DEST", destination.port)]
        ) as node,
    ):
        assert echo(node.port, "PACSNODE")
        sent = storescu(node.port, "PACSNODE", files)
        assert sent.returncode == 0, sent.stderr
        assert (sent.stdout + sent.stderr).count("Received Store Response (Success)") == 30

        report = only_sr(destination)
        done = wait_for(
            lambda: [job for job in node.jobs("send") if job["status"] == "done"],
            30,
            "send job done",
        )
        assert len(done) == 1
        offline = classify_json(node, tmp_path / "series")

    # Everything the node keeps is private to its user.
    for kept in [tmp_path / "node", *(tmp_path / "node").rglob("*")]:
        private = 0o700 if kept.is_dir() else 0o600
        assert kept.stat().st_mode & 0o777 == private, kept
    # Patient identity never reaches the log at INFO (the node's default level).
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    for identifier in (str(source.PatientName), str(source.PatientID)):
        assert identifier and identifier not in node.log
    assert report.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID
    summary = read_report(report)
    assert summary.source_series_uid == series_uid(files)
    # The network path and `classify` are the same pipeline: same numbers.
    assert summary.label == offline["label"]
    expected = offline["probabilities"]
    assert isinstance(expected, dict)
    for name, value in summary.probabilities.items():
        assert value == pytest.approx(expected[name], abs=1e-6)

    sr_file = destination.received()[0]
    dciodvfy(sr_file)
    dumped = subprocess.run(
        [tool("dsrdump"), str(sr_file)], capture_output=True, text=True, check=True
    )
    assert summary.label in dumped.stdout.lower() or _meaning(summary.label) in dumped.stdout


def test_classify_writes_the_sr_the_node_would_send(tmp_path: Path, tiny_model: Path) -> None:
    """`pacs-node classify --sr`: the series' SR, with its patient and study (read
    from the first slice's file), every slice referenced, valid to dciodvfy."""
    files = renamed_series(chest_ct(), tmp_path / "series", count=4)
    sr_file = tmp_path / "report.dcm"
    node = NodeProcess(tmp_path / "node", tiny_model)
    completed = node.run("classify", "--json", "--sr", str(sr_file), str(tmp_path / "series"))
    (series,) = json.loads(completed.stdout)["series"]
    assert series["sr"] == str(sr_file)
    report = pydicom.dcmread(sr_file)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID"):
        assert report[keyword].value == source[keyword].value, keyword
    summary = read_report(report)
    assert summary.label == series["label"]
    (study,) = report.CurrentRequestedProcedureEvidenceSequence
    (referenced,) = study.ReferencedSeriesSequence
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedSOPSequence} == {
        str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files
    }
    dciodvfy(sr_file)


def _meaning(label: str) -> str:
    return {"normal": "Normal", "benign": "Neoplasm, benign", "malignant": "Malignant"}[label]


def test_restart_after_acknowledgement_still_yields_exactly_one_sr(
    tmp_path: Path, tiny_model: Path
) -> None:
    files = renamed_series(chest_ct(), tmp_path / "series", count=10)
    destination = StoreSCP(tmp_path / "destination")
    node = NodeProcess(
        tmp_path / "node",
        tiny_model,
        destinations=[("DEST", destination.port)],
        settings={"PACS_NODE_SERIES__QUIET_SECONDS": "4"},
    ).start()
    sent = storescu(node.port, "PACSNODE", files)
    assert sent.returncode == 0, sent.stderr
    # Killed before the quiet period ends: nothing was assembled yet.
    node.stop(signal.SIGKILL)

    # Restarted while the destination is down: the send job fails and waits.
    node.start()
    wait_for(
        lambda: any(job["attempts"] >= 1 for job in node.jobs("send")),
        90,
        "a failed delivery attempt",
    )
    node.stop()  # a clean stop with the SR written but not delivered

    with destination:
        node.start()
        try:
            only_sr(destination)
            wait_for(
                lambda: [job for job in node.jobs("send") if job["status"] == "done"],
                60,
                "send done",
            )
        finally:
            node.stop()
        assert len(destination.received()) == 1
    infer_jobs = node.jobs("infer")
    assert len(infer_jobs) == 1 and infer_jobs[0]["status"] == "done"


def test_compressed_transfer_syntaxes_give_the_same_probabilities(
    tmp_path: Path, tiny_model: Path
) -> None:
    originals = renamed_series(chest_ct(), tmp_path / "plain", count=8)
    encoders = {
        "jpeg-lossless": [tool("dcmcjpeg"), "+e1"],
        "jpeg-ls": [tool("dcmcjpls")],
    }
    node = NodeProcess(tmp_path / "node", tiny_model)
    reference = classify_json(node, tmp_path / "plain")
    for name, encoder in encoders.items():
        folder = tmp_path / name
        folder.mkdir()
        for path in originals:
            subprocess.run([*encoder, str(path), str(folder / path.name)], check=True)
        assert pydicom.dcmread(folder / originals[0].name).file_meta.TransferSyntaxUID.is_compressed
        compressed = classify_json(node, folder)
        assert compressed["label"] == reference["label"]
        for slice_plain, slice_compressed in zip(
            reference["slices"],
            compressed["slices"],
            strict=True,
        ):
            for label, value in slice_plain["probabilities"].items():
                assert slice_compressed["probabilities"][label] == pytest.approx(value, abs=1e-4)


@pytest.mark.parametrize(
    ("encoder", "proposal", "syntax_name"),
    [
        # Read by the infer stage through the layout the receiver records.
        (["dcmcjpeg", "+e1"], "-xs", "JPEG Lossless"),
        # Parsed by the infer stage.
        (["dcmcjpls"], "-xt", "JPEG-LS Lossless"),
    ],
)
def test_compressed_series_over_the_network(
    tmp_path: Path, tiny_model: Path, encoder: list[str], proposal: str, syntax_name: str
) -> None:
    originals = renamed_series(chest_ct(), tmp_path / "plain", count=6)
    folder = tmp_path / "compressed"
    folder.mkdir()
    for path in originals:
        subprocess.run(
            [tool(encoder[0]), *encoder[1:], str(path), str(folder / path.name)], check=True
        )
    with (
        StoreSCP(tmp_path / "destination") as destination,
        NodeProcess(
            tmp_path / "node", tiny_model, destinations=[("DEST", destination.port)]
        ) as node,
    ):
        sent = storescu(node.port, "PACSNODE", sorted(folder.iterdir()), extra=[proposal])
        assert sent.returncode == 0, sent.stderr
        assert syntax_name in sent.stdout + sent.stderr
        report = read_report(only_sr(destination))
        offline = classify_json(node, tmp_path / "plain")
    assert report.label == offline["label"]


def test_bad_input_gets_a_clear_answer_and_the_node_goes_on(
    tmp_path: Path, tiny_model: Path
) -> None:
    slice_file = sorted(chest_ct().glob("*.dcm"))[0]
    mr = pydicom.dcmread(
        variant(slice_file, tmp_path / "mr.dcm", Modality="MR", SOPClassUID=MRImageStorage)
    )
    no_pixels = pydicom.dcmread(variant(slice_file, tmp_path / "nopixels.dcm", PixelData=None))
    assert no_pixels.SOPClassUID == CTImageStorage
    good = renamed_series(chest_ct(), tmp_path / "good", count=3)
    with (
        StoreSCP(tmp_path / "destination") as destination,
        NodeProcess(
            tmp_path / "node",
            tiny_model,
            destinations=[("DEST", destination.port)],
            settings={
                "PACS_NODE_DICOM__ALLOWED_CALLING_AES": '["STORESCU", "PYNETDICOM", "ECHOSCU"]'
            },
        ) as node,
    ):
        # A non-CT instance is stored (Success) but never classified.
        assert store_status(node.port, mr) == 0x0000
        wait_for(lambda: node.has_logged("not classified"), 10, "the log line for the MR instance")
        # A CT image without pixel data contradicts its SOP class.
        assert store_status(node.port, no_pixels) == 0xA900
        assert node.has_logged("image instance has no pixel data")
        # An unknown calling AE is rejected at association time.
        refused = subprocess.run(
            [tool("echoscu"), "-aet", "INTRUDER", "-aec", "PACSNODE", "127.0.0.1", str(node.port)],
            env=dcmtk_environment(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode != 0
        wait_for(
            lambda: node.has_logged("calling AE title is not in"), 10, "the rejection log line"
        )
        # ... and the node goes on serving a good sender.
        sent = storescu(node.port, "PACSNODE", good)
        assert sent.returncode == 0, sent.stderr
        assert read_report(only_sr(destination)).source_series_uid == series_uid(good)
        mr_series = str(mr.SeriesInstanceUID)
        wait_for(lambda: node.has_logged(f"series_uid={mr_series}"), 10, "the MR series log")
    assert mr_series not in {job["series_instance_uid"] for job in node.jobs("infer")}


def test_serve_refuses_to_start_when_the_port_is_taken_or_the_model_is_bad(
    tmp_path: Path, tiny_model: Path
) -> None:
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        taken = occupant.getsockname()[1]
        node = NodeProcess(tmp_path / "node", tiny_model, port=taken)
        completed = node.run("serve", check=False)
        assert completed.returncode == 2
        assert f"cannot listen on 127.0.0.1:{taken}" in completed.stderr

    broken = NodeProcess(tmp_path / "node", tmp_path / "no-such-model", port=free_port())
    completed = broken.run("serve", check=False)
    assert completed.returncode == 2
    assert "inference.model" in completed.stderr and "does not exist" in completed.stderr


def test_a_series_complete_by_content_is_queued_at_once_not_at_the_next_sweep(
    tmp_path: Path, tiny_model: Path
) -> None:
    files = renamed_series(chest_ct(), tmp_path / "series", count=3)
    for path in files:  # slices 1-3, each saying the acquisition has 3 images
        dataset = pydicom.dcmread(path)
        dataset.ImagesInAcquisition = 3
        dataset.save_as(path, enforce_file_format=True)
    # Neither the quiet period nor the periodic sweep can complete it within the test.
    slow = {"PACS_NODE_SERIES__QUIET_SECONDS": "600", "PACS_NODE_SERIES__SWEEP_SECONDS": "300"}
    with NodeProcess(tmp_path / "node", tiny_model, stages="receive", settings=slow) as node:
        sent = storescu(node.port, "PACSNODE", files)
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: "queued for inference" in node.log, 10, "the series queued")

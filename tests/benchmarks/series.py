"""Long CT series for benchmarks, made from the 30 real slices, and how to send them."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.peers import CHEST_CT, dcmtk_environment, tool
from tests.polling import wait_for
from tests.processes import NodeProcess


def long_series(folder: Path, slices: int) -> list[Path]:
    """One series of `slices` instances (the real slices repeated), numbered 1..n.

    Images in Acquisition says n, so the node can see the series is complete.
    """
    folder.mkdir(parents=True, exist_ok=True)
    templates = sorted(CHEST_CT.glob("*.dcm"))
    study, series = generate_uid(), generate_uid()
    written = []
    for number in range(1, slices + 1):
        dataset = pydicom.dcmread(templates[(number - 1) % len(templates)])
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.InstanceNumber = number
        dataset.ImagesInAcquisition = slices
        path = folder / f"{number:05d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def store_series(port: int, called_ae: str, files: list[Path]) -> float:
    """storescu `files` over one association; the wall-clock time of its last C-STORE response.

    Taken from storescu's verbose log as it is written (DCMTK logs unbuffered to
    stderr), so the association release and process exit are not counted.
    """
    process = subprocess.Popen(
        [tool("storescu"), "-v", "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)],
        env=dcmtk_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    last_response = None
    lines = []
    for line in process.stderr:
        if "Received Store Response" in line:
            last_response = time.time()
        lines.append(line)
    if process.wait() != 0 or last_response is None:
        raise RuntimeError(f"storescu failed: {''.join(lines[-20:])}")
    return last_response


def wait_for_delivery(node: NodeProcess, series_uid: str, timeout: float = 600) -> None:
    """Until the node logs the SR of `series_uid` as delivered."""

    def delivered() -> bool:
        return any(
            "SR delivered" in line and f"series_uid={series_uid}" in line for line in node.lines
        )

    wait_for(delivered, timeout, f"the SR of series {series_uid}", interval=0.2)

"""Long CT series for benchmarks, made from the 30 real slices."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.peers import CHEST_CT


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

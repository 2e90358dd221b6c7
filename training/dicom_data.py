"""Labelled DICOM series: every CT instance under a folder, labelled per series.

`labels.csv` (columns `uid,label`) maps a SeriesInstanceUID, or a
StudyInstanceUID for every series of the study, to a class. Each instance is
read exactly as the node reads a received one (`models.preprocessing`:
modality LUT to HU, window, resize, normalise). Slices of one patient (or,
without PatientID, one study) form one group, so no split separates them.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from models.preprocessing import Preprocessing, input_from_dataset
from training.datasets import DataError, Sample

LABEL_FILE = "labels.csv"


def read_labels(path: Path) -> dict[str, str]:
    """`uid,label` rows as a mapping; a duplicated UID with two labels is refused."""
    if not path.is_file():
        raise DataError(f"label file {path} does not exist")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"uid", "label"} <= set(rows[0]):
        raise DataError(f"{path} needs the columns uid,label")
    labels: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        uid, label = row["uid"].strip(), row["label"].strip()
        if labels.get(uid, label) != label:
            raise DataError(f"{path} line {line}: {uid} labelled both {labels[uid]} and {label}")
        labels[uid] = label
    return labels


def scan_dicom_folder(root: Path, labels_path: Path | None = None) -> list[Sample]:
    """One sample per labelled CT instance; unlabelled series are listed and skipped."""
    labels = read_labels(labels_path or root / LABEL_FILE)
    samples: list[Sample] = []
    unlabelled: set[str] = set()
    files = sorted(path for path in root.rglob("*") if path.is_file() and path.suffix != ".csv")
    for path in files:
        try:
            header = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError) as error:
            raise DataError(f"cannot read DICOM file {path}: {error}") from error
        series = str(header.get("SeriesInstanceUID", ""))
        study = str(header.get("StudyInstanceUID", ""))
        label = labels.get(series) or labels.get(study)
        if label is None:
            unlabelled.add(series)
            continue
        patient = str(header.get("PatientID", "")) or f"study:{study}"
        samples.append(Sample(str(path), label, f"patient:{patient}"))
    if unlabelled:
        print(f"{root}: skipped {len(unlabelled)} series with no label in {LABEL_FILE}")
    if not samples:
        raise DataError(f"{root} holds no DICOM instance of a labelled series")
    return samples


def read_dicom_sample(sample: Sample, preprocessing: Preprocessing) -> torch.Tensor:
    """The node's own path: HU from the modality LUT, then the recorded window."""
    try:
        dataset = dcmread(sample.source)
    except (InvalidDicomError, OSError) as error:
        raise DataError(f"cannot read DICOM file {sample.source}: {error}") from error
    return torch.from_numpy(input_from_dataset(dataset, preprocessing))


def dicom_classes(root: Path, labels_path: Path | None = None) -> Sequence[str]:
    return tuple(sorted(set(read_labels(labels_path or root / LABEL_FILE).values())))

"""Labelled CT volumes (NIfTI, MHA, NRRD) read with SimpleITK, one label per volume.

`labels.csv` (columns `file,label`) names each volume relative to the folder.
Voxel values must be Hounsfield units (as CT volumes converted from DICOM
are); every axial slice is one sample and one volume is one group.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK
import torch

from models.preprocessing import Preprocessing, input_from_hounsfield
from training.datasets import DataError, Sample

LABEL_FILE = "labels.csv"
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")
SLICE_SEPARATOR = "#"


def read_volume_labels(root: Path) -> list[tuple[Path, str]]:
    path = root / LABEL_FILE
    if not path.is_file():
        raise DataError(f"label file {path} does not exist")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"file", "label"} <= set(rows[0]):
        raise DataError(f"{path} needs the columns file,label")
    entries = []
    for line, row in enumerate(rows, start=2):
        volume = root / row["file"]
        if not volume.name.lower().endswith(VOLUME_SUFFIXES):
            raise DataError(f"{path} line {line}: {row['file']!r} is not a volume file")
        if not volume.is_file():
            raise DataError(f"{path} line {line}: {volume} does not exist")
        entries.append((volume, row["label"].strip()))
    return entries


@lru_cache(maxsize=2)
def _volume_hu(path: str) -> np.ndarray:
    """The volume as (slices, rows, columns) float32; cached for slice-by-slice reading."""
    try:
        image = SimpleITK.ReadImage(path)
    except RuntimeError as error:
        raise DataError(f"cannot read volume {path}: {error}") from error
    voxels = np.asarray(SimpleITK.GetArrayFromImage(image), dtype=np.float32)
    if voxels.ndim != 3:
        raise DataError(f"{path} is not a scalar 3-D volume (array shape {voxels.shape})")
    return voxels


def scan_volume_folder(root: Path) -> list[Sample]:
    samples: list[Sample] = []
    for volume, label in read_volume_labels(root):
        count = _volume_hu(str(volume)).shape[0]
        samples.extend(
            Sample(f"{volume}{SLICE_SEPARATOR}{index}", label, f"volume:{volume.name}")
            for index in range(count)
        )
    if not samples:
        raise DataError(f"{root} lists no volumes")
    return samples


def read_volume_sample(sample: Sample, preprocessing: Preprocessing) -> torch.Tensor:
    path, _, index = sample.source.rpartition(SLICE_SEPARATOR)
    return torch.from_numpy(input_from_hounsfield(_volume_hu(path)[int(index)], preprocessing))


def volume_classes(root: Path) -> Sequence[str]:
    return tuple(sorted({label for _, label in read_volume_labels(root)}))

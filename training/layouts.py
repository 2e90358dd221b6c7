"""Which loader a data folder needs, and loading it into train/val slice sets.

`images`: class sub-folders of 8-bit exports (optionally with `split.csv`);
`dicom`: DICOM files with `labels.csv` (`uid,label`); `volumes`: NIfTI/MHA/NRRD
with `labels.csv` (`file,label`). `auto` decides from the `labels.csv` header.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from models.preprocessing import Preprocessing
from training.datasets import (
    DataError,
    Reader,
    Sample,
    SliceSet,
    assign_split,
    check_labels,
    describe,
    image_classes,
    materialise,
    read_image_sample,
    scan_image_folder,
)
from training.dicom_data import dicom_classes, read_dicom_sample, scan_dicom_folder
from training.volumes import read_volume_sample, scan_volume_folder, volume_classes

Layout = Literal["auto", "images", "dicom", "volumes"]
LAYOUTS: tuple[Layout, ...] = ("auto", "images", "dicom", "volumes")


@dataclass(frozen=True)
class Folder:
    """The scanned samples of one data folder and how to read them."""

    root: Path
    layout: Layout
    classes: tuple[str, ...]
    samples: tuple[Sample, ...]
    reader: Reader


def detect_layout(root: Path) -> Layout:
    labels = root / "labels.csv"
    if not labels.is_file():
        return "images"
    with labels.open(newline="") as handle:
        header = next(csv.reader(handle), [])
    return "dicom" if "uid" in header else "volumes"


def scan(root: Path, layout: Layout = "auto", classes: Sequence[str] | None = None) -> Folder:
    """Find every sample and check its label against `classes` (default: all found)."""
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    chosen = detect_layout(root) if layout == "auto" else layout
    reader: Reader
    if chosen == "images":
        found = image_classes(root)
        samples = scan_image_folder(root, classes)
        reader = read_image_sample
    elif chosen == "dicom":
        found = tuple(dicom_classes(root))
        samples = scan_dicom_folder(root)
        reader = read_dicom_sample
    elif chosen == "volumes":
        found = tuple(volume_classes(root))
        samples = scan_volume_folder(root)
        reader = read_volume_sample
    else:
        raise DataError(f"unknown data layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    names = tuple(classes) if classes is not None else found
    check_labels(samples, names, require_all=classes is None)
    return Folder(root, chosen, names, tuple(samples), reader)


@dataclass(frozen=True)
class TrainVal:
    train: SliceSet
    val: SliceSet
    summary: dict[str, dict[str, int]]


def load_train_val(
    folder: Folder, preprocessing: Preprocessing, val_fraction: float, seed: int
) -> TrainVal:
    """Split (fixed by `split.csv`, else grouped and stratified), print and read."""
    samples = assign_split(folder.samples, val_fraction, seed)
    unknown_splits = sorted({s.split or "" for s in samples} - {"train", "val"})
    if unknown_splits:
        # Anything else (for example a held-out "test") is never read by fit.
        print(f"ignoring split(s) {', '.join(unknown_splits)}: fit reads only train and val")
    print(describe(samples, folder.classes, str(folder.root)))
    parts = {}
    for split in ("train", "val"):
        chosen = [s for s in samples if s.split == split]
        check_labels(chosen, folder.classes, require_all=True)
        parts[split] = materialise(chosen, folder.classes, preprocessing, folder.reader, split)
    summary = {split: part.class_counts() for split, part in parts.items()}
    return TrainVal(parts["train"], parts["val"], summary)


def load_all(folder: Folder, preprocessing: Preprocessing, split: str | None = None) -> SliceSet:
    """Every sample (or those of one fixed split), for evaluation and cross-validation."""
    samples = [s for s in folder.samples if split is None or s.split == split]
    if not samples:
        raise DataError(f"{folder.root} has no samples in split {split!r}")
    print(describe(samples, folder.classes, str(folder.root)))
    return materialise(samples, folder.classes, preprocessing, folder.reader, "reading")

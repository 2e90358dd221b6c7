"""Test data made on the spot: tiny model artifacts and DICOM variations of real slices."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, JPEGLosslessSV1, generate_uid

from models.artifact import Aggregation, save_artifact
from models.network import build_mobilenet_v2
from models.preprocessing import Preprocessing, pixel_layout
from pacs_node.inference import StoredSlice, reference_header

CLASSES = ["benign", "malignant", "normal"]


def tiny_artifact(
    folder: Path,
    seed: int = 0,
    version: str = "0.0.1-test",
    input_size: int = 64,
    details: dict[str, Any] | None = None,
) -> Path:
    """A randomly initialised MobileNetV2 artifact (small input size unless asked)."""
    torch.manual_seed(seed)
    network = build_mobilenet_v2(len(CLASSES))
    save_artifact(
        folder,
        network,
        name="test-model",
        version=version,
        classes=CLASSES,
        preprocessing=Preprocessing(window_center=-600, window_width=1200, input_size=input_size),
        aggregation=Aggregation(negative_class="normal", fraction=0.1),
        details=details,
    )
    return folder


def renamed_series(
    source: Path, target: Path, count: int | None = None, suffix: str = ""
) -> list[Path]:
    """Copies of a real series under new Study/Series/SOP UIDs (a new patient visit)."""
    files = sorted(source.glob("*.dcm"))[:count]
    if not files:
        # Callers loop until they have enough copies: none would never be enough.
        raise FileNotFoundError(f"no *.dcm files in {source}")
    target.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    written = []
    for path in files:
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID = study
        dataset.SeriesInstanceUID = series
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        out = target / f"{path.stem}{suffix}.dcm"
        dataset.save_as(out, enforce_file_format=True)
        written.append(out)
    return written


def variant(source: Path, target: Path, **changes: object) -> Path:
    """A copy of one real slice with new UIDs and the given attributes changed (None deletes)."""
    dataset: Dataset = pydicom.dcmread(source)
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    for keyword, value in changes.items():
        if value is None:
            delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    if "SOPClassUID" in changes and changes["SOPClassUID"] is not None:
        dataset.file_meta.MediaStorageSOPClassUID = UID(str(changes["SOPClassUID"]))
    dataset.save_as(target, enforce_file_format=True)
    return target


def series_uid(files: Sequence[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def stored_slice(path: Path) -> StoredSlice:
    """`path` as the infer stage gets it from the job store: the layout the receiver
    recorded from its parse, and the row's UIDs."""
    header = pydicom.dcmread(path, defer_size=1024)  # as the receiver reads it
    reference = reference_header(
        header.SOPClassUID,
        header.SOPInstanceUID,
        header.SeriesInstanceUID,
        header.StudyInstanceUID,
        header.InstanceNumber,
    )
    return StoredSlice(path, pixel_layout(header), reference)


def made_jpeg_lossless(dataset: Dataset, fragments: int = 1) -> Dataset:
    """`dataset` (one frame of 16-bit words) with its pixel data made JPEG Lossless SV1
    by libjpeg-turbo, in `fragments` fragments: as DICOM stores it, the stream holds
    the low BitsStored bits of each word."""
    stored = int(dataset.BitsStored)
    words = np.frombuffer(dataset.PixelData, dtype="<u2").reshape(dataset.Rows, dataset.Columns)
    stream = bytes(
        imagecodecs.jpeg8_encode(
            words & (2**stored - 1), lossless=True, bitspersample=stored, predictor=1
        )
    )
    dataset.PixelData = encapsulate([stream], fragments_per_frame=fragments)
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True  # as encapsulated data must be
    dataset.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    return dataset

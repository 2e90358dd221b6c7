"""Where a slice's uncompressed 16-bit words lie, read off a header parsed once.

Kept free of torch: the receiving process, which has parsed every instance it
stores, records each classifiable instance's layout without loading the model's
libraries; the infer stage then reads the words without parsing the file again
(`models.preprocessing.tensor_from_layout`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian


class TableKey(NamedTuple):
    """All that the modality LUT, pydicom's unused-bit correction and the window read."""

    signed: bool
    bits_stored: int
    # None: no rescale, the stored values are the output of the modality LUT.
    rescale: tuple[float, float] | None
    center: float
    width: float


def table_key(dataset: Dataset, center: float, width: float) -> TableKey | None:
    """None for data a 16-bit table cannot map: other sizes, colour, a Modality LUT Sequence."""
    bits_stored = dataset.get("BitsStored")
    representation = dataset.get("PixelRepresentation")
    if (
        dataset.get("BitsAllocated") != 16
        or not isinstance(bits_stored, int)
        or not 1 <= bits_stored <= 16
        or representation not in (0, 1)
        or dataset.get("SamplesPerPixel", 1) != 1
        or "ModalityLUTSequence" in dataset
    ):
        return None
    rescale = None
    if "RescaleSlope" in dataset and "RescaleIntercept" in dataset:
        slope, intercept = dataset.RescaleSlope, dataset.RescaleIntercept
        # Anything else (empty, multi-valued, Decimal) keeps the reference path and its errors.
        if not all(
            isinstance(value, float) and math.isfinite(value) for value in (slope, intercept)
        ):
            return None
        rescale = (float(slope), float(intercept))
    return TableKey(representation == 1, bits_stored, rescale, center, width)


@dataclass(frozen=True)
class PixelLayout:
    """Where a slice's uncompressed 16-bit words lie in its file, and how to read them."""

    offset: int  # of the first word, in bytes from the start of the file
    rows: int
    columns: int
    signed: bool
    bits_stored: int
    rescale: tuple[float, float] | None  # (slope, intercept); None: none

    def to_text(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_text(cls, text: str) -> PixelLayout:
        values = json.loads(text)
        rescale = values.pop("rescale")
        return cls(**values, rescale=None if rescale is None else tuple(rescale))


def words_in_place(dataset: Dataset, length: int) -> tuple[int, int] | None:
    """(rows, columns) when the `length` bytes of pixel data are one frame of
    little-endian monochrome words that can be read as they lie; None otherwise."""
    rows, columns = dataset.get("Rows"), dataset.get("Columns")
    if (
        getattr(dataset, "file_meta", {}).get("TransferSyntaxUID")
        in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        and dataset.get("NumberOfFrames", 1) in (1, None)
        and dataset.get("PhotometricInterpretation") in ("MONOCHROME1", "MONOCHROME2")
        and isinstance(rows, int)
        and isinstance(columns, int)
        and length >= 2 * rows * columns > 0
    ):
        return rows, columns
    return None


def pixel_layout(dataset: Dataset) -> PixelLayout | None:
    """The layout of a dataset read from a file with its pixel data deferred or raw.

    None where `tensor_from_dataset` would not read the words in place and map
    them through the table: compressed or big-endian data, several frames,
    colour, other sizes, a Modality LUT Sequence.
    """
    # Only the key's word mapping is kept; the window comes from the manifest when read.
    key = table_key(dataset, center=0.0, width=1.0)
    element = dataset.get_item("PixelData", keep_deferred=True)
    if key is None or not isinstance(element, RawDataElement):
        return None
    shape = words_in_place(dataset, element.length)
    if shape is None:
        return None
    rows, columns = shape
    return PixelLayout(element.value_tell, rows, columns, key.signed, key.bits_stored, key.rescale)

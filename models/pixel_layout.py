"""Where a slice's 16-bit words lie, read off a header parsed once: uncompressed
in place, or as one encapsulated JPEG Lossless frame.

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
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLossless,
    JPEGLosslessSV1,
)

# What a layout's words are: in place, or one JPEG Lossless frame whose encapsulated
# items begin at the offset (decoded by `models.jpeg_lossless.frame_words`).
NATIVE = "native"
JPEG_LOSSLESS = "jpeg-lossless"
_UNDEFINED_LENGTH = 0xFFFFFFFF  # encapsulated pixel data


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
    """Where a slice's 16-bit words lie in its file, and how to read them."""

    # In bytes from the start of the file: of the first word (NATIVE), or of the
    # first item of the encapsulated pixel data (JPEG_LOSSLESS).
    offset: int
    rows: int
    columns: int
    signed: bool
    bits_stored: int
    rescale: tuple[float, float] | None  # (slope, intercept); None: none
    encoding: str = NATIVE  # rows written before JPEG layouts lack it

    def to_text(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_text(cls, text: str) -> PixelLayout:
        values = json.loads(text)
        rescale = values.pop("rescale")
        return cls(**values, rescale=None if rescale is None else tuple(rescale))


def _one_monochrome_frame(dataset: Dataset) -> tuple[int, int] | None:
    """(rows, columns) of a single-frame monochrome image; None otherwise."""
    rows, columns = dataset.get("Rows"), dataset.get("Columns")
    if (
        dataset.get("NumberOfFrames", 1) in (1, None)
        and dataset.get("PhotometricInterpretation") in ("MONOCHROME1", "MONOCHROME2")
        and isinstance(rows, int)
        and isinstance(columns, int)
        and rows > 0
        and columns > 0
    ):
        return rows, columns
    return None


def _transfer_syntax(dataset: Dataset) -> str | None:
    syntax: str | None = getattr(dataset, "file_meta", {}).get("TransferSyntaxUID")
    return syntax


def words_in_place(dataset: Dataset, length: int) -> tuple[int, int] | None:
    """(rows, columns) when the `length` bytes of pixel data are one frame of
    little-endian monochrome words that can be read as they lie; None otherwise."""
    shape = _one_monochrome_frame(dataset)
    if (
        shape is not None
        and _transfer_syntax(dataset) in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        and length >= 2 * shape[0] * shape[1]
    ):
        return shape
    return None


def pixel_layout(dataset: Dataset) -> PixelLayout | None:
    """The layout of a dataset read from a file with its pixel data deferred or raw.

    None where `tensor_from_dataset` would not map 16-bit words through the table,
    or where they are neither in place nor one JPEG Lossless frame: other
    compressions, big-endian data, several frames, colour, other sizes, a
    Modality LUT Sequence.
    """
    # Only the key's word mapping is kept; the window comes from the manifest when read.
    key = table_key(dataset, center=0.0, width=1.0)
    element = dataset.get_item("PixelData", keep_deferred=True)
    # Float pixel data beside it: pydicom refuses the data set, so the parse must say so.
    floats = "FloatPixelData" in dataset or "DoubleFloatPixelData" in dataset
    if key is None or not isinstance(element, RawDataElement) or floats:
        return None
    encoding, shape = NATIVE, words_in_place(dataset, element.length)
    if (
        shape is None
        and element.length == _UNDEFINED_LENGTH
        and _transfer_syntax(dataset) in (JPEGLossless, JPEGLosslessSV1)
        # The frame's fragments are then found through this table, which only
        # pydicom's parse follows.
        and "ExtendedOffsetTable" not in dataset
    ):
        encoding, shape = JPEG_LOSSLESS, _one_monochrome_frame(dataset)
    if shape is None:
        return None
    rows, columns = shape
    return PixelLayout(
        element.value_tell, rows, columns, key.signed, key.bits_stored, key.rescale, encoding
    )

"""JPEG Lossless pixel data through libjpeg-turbo (imagecodecs), as a pydicom decoder plugin.

pydicom's own plugins for these transfer syntaxes took, per 512x512 12-bit CT slice
(made with DCMTK's dcmcjpeg +e1), 3.8-5.9 ms of one core (GDCM) and 7.8 ms
(pylibjpeg-libjpeg); libjpeg-turbo 1.3 ms, with the same values on all 30 chest slices.
pydicom still checks and corrects (unused bits, sign) what the plugin returns. Without
imagecodecs, or for a stream libjpeg-turbo refuses, pylibjpeg decodes it.

`frame_words` decodes the one frame of a file whose layout the receiver recorded,
without parsing the file: the window table then does pydicom's corrections.
Which other decoders may run, and on what, is `models.decoder_guard`'s.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels.decoders.base import DecodeRunner, get_decoder

from models import decoder_guard

LABEL = "imagecodecs"
SYNTAXES = (uid.JPEGLossless, uid.JPEGLosslessSV1)
# Read by pydicom when the plugin is unavailable, to say what is missing.
DECODER_DEPENDENCIES = {syntax: ("imagecodecs>=2026.3",) for syntax in SYNTAXES}


def is_available(syntax: str) -> bool:
    return syntax in SYNTAXES and importlib.util.find_spec("imagecodecs") is not None


def _decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    import imagecodecs

    frame: np.ndarray = imagecodecs.jpeg8_decode(src)
    return frame.tobytes()


for _syntax in SYNTAXES:
    get_decoder(_syntax).add_plugin(LABEL, (__name__, "_decode_frame"))


def pixel_array(dataset: Dataset) -> np.ndarray:
    """`dataset.pixel_array`, from libjpeg-turbo first where it can decode it, once its
    frame headers are checked (`decoder_guard.check`)."""
    decoder_guard.check(dataset)
    syntax = getattr(dataset, "file_meta", {}).get("TransferSyntaxUID")
    if syntax in SYNTAXES and is_available(syntax):
        dataset.pixel_array_options(decoding_plugin=LABEL)
        try:
            return dataset.pixel_array
        except Exception:  # pylibjpeg may still read it
            dataset.pixel_array_options(decoding_plugin="")
    return dataset.pixel_array


def frame_words(path: Path, offset: int, rows: int, columns: int) -> np.ndarray | None:
    """The stored words of the one JPEG Lossless frame encapsulated at `offset` in the
    file at `path` (the first item of its pixel data), or None: parsing the file then
    decodes it, or says why not, as for any other slice. None where libjpeg-turbo is
    missing; where the Basic Offset Table is neither empty nor [0] (pydicom reads
    such tables its own way); where the items or the stream cannot be read, or the
    stream is cut short; where it is not `rows` x `columns` 16-bit words."""
    if not is_available(uid.JPEGLosslessSV1):
        return None
    import imagecodecs

    with path.open("rb") as file:
        file.seek(offset)
        if not _offset_table_is_empty_or_zero(file.read(12)):
            return None
        file.seek(offset)
        try:
            frame = get_frame(file, 0, number_of_frames=1)
        except Exception:  # damaged items: refused, or read, by the parse
            return None
    if not decoder_guard.is_complete(frame):
        return None  # the parse refuses it, and says why
    try:
        words: np.ndarray = imagecodecs.jpeg8_decode(frame)
    except Exception:  # a damaged stream: refused, or read, by the parse
        return None
    if words.shape != (rows, columns) or words.dtype != np.uint16:
        return None
    return words


_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000), little endian


def _offset_table_is_empty_or_zero(start: bytes) -> bool:
    """Whether the first item, the Basic Offset Table, is empty or holds only 0."""
    if len(start) < 8 or start[:4] != _ITEM:
        return False
    length = int.from_bytes(start[4:8], "little")
    return length == 0 or (length == 4 and start[8:12] == bytes(4))

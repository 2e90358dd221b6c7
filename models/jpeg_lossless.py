"""JPEG Lossless pixel data through libjpeg-turbo (imagecodecs), as a pydicom decoder plugin.

pydicom's own plugins for these transfer syntaxes took, per 512x512 12-bit CT slice
(made with DCMTK's dcmcjpeg +e1), 3.8-5.9 ms of one core (GDCM) and 7.8 ms
(pylibjpeg-libjpeg); libjpeg-turbo 1.3 ms, with the same values on all 30 chest slices.
pydicom still checks and corrects (unused bits, sign) what the plugin returns. Without
imagecodecs, or for a stream libjpeg-turbo refuses, pylibjpeg decodes it.

GDCM decodes no JPEG (ITU-T T.81) stream here, lossless or not. Its IJG reader's
warnings become C++ exceptions that nothing catches, so the process aborts: one stray
byte between marker segments is enough (before SOS in a baseline JPEG; a libjpeg-turbo
refusal plus such a byte, or a stream cut inside a DNL marker, which made it spin
holding the GIL, in 68 of 17,435 fuzzed JPEG Lossless streams). pylibjpeg and Pillow
answered all of these with an image or an ordinary exception.

`frame_words` decodes the one frame of a file whose layout the receiver recorded,
without parsing the file: the window table then does pydicom's corrections.

No decoder sees a stream whose frame header contradicts its data set
(`check_frame_headers`): on such streams the fallback decoders have taken the
whole process down (GDCM segfaulted on a precision of 17, pylibjpeg allocated
memory until the kernel killed the process on a height of 0; a review's crafted
files).
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, get_frame
from pydicom.pixels.decoders.base import DecodeRunner, get_decoder

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
for _syntax in (*SYNTAXES, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit):
    if "gdcm" in get_decoder(_syntax).available_plugins:
        get_decoder(_syntax).remove_plugin("gdcm")


def pixel_array(dataset: Dataset) -> np.ndarray:
    """`dataset.pixel_array`, from libjpeg-turbo first where it can decode it."""
    syntax = getattr(dataset, "file_meta", {}).get("TransferSyntaxUID")
    if syntax in SYNTAXES:
        check_frame_headers(dataset)
        if is_available(syntax):
            dataset.pixel_array_options(decoding_plugin=LABEL)
            try:
                return dataset.pixel_array
            except Exception:  # pylibjpeg may still read it
                dataset.pixel_array_options(decoding_plugin="")
    return dataset.pixel_array


# Start-of-frame markers: FFC0-FFCF but DHT, JPG and DAC (ITU-T T.81, B.1.1.3), and
# JPEG-LS's FFF7 (T.87), whose frame header has the same fields: a stream labelled
# JPEG Lossless may still hold one, which pylibjpeg decodes. In entropy-coded data an
# FF byte is followed only by 00 or a restart marker, so these two bytes mark frame
# headers wherever they are found.
_START_OF_FRAME = np.array(
    [code for code in range(0xC0, 0xD0) if code not in (0xC4, 0xC8, 0xCC)] + [0xF7]
)


def check_frame_headers(dataset: Dataset) -> None:
    """Raise ValueError, before any decoder runs, if a frame header in the encapsulated
    pixel data gives another size than Rows x Columns, other than SamplesPerPixel
    components, or a precision outside 2-16. All fragments are searched, joined, since
    a frame may begin in any of them and a header may straddle two."""
    rows, columns = dataset.get("Rows"), dataset.get("Columns")
    if not isinstance(rows, int) or not isinstance(columns, int):
        return  # pydicom refuses to decode without them, and says so
    expected = (rows, columns, int(dataset.get("SamplesPerPixel", 1)))
    data = b"".join(_readable_fragments(dataset.PixelData))
    # One vectorised pass: bytes.find stops at every FF, and stuffed FF 00 pairs abound.
    raw = np.frombuffer(data, dtype=np.uint8)
    marks = np.flatnonzero(raw[:-1] == 0xFF)
    for start in marks[np.isin(raw[marks + 1], _START_OF_FRAME)].tolist():
        header = data[start + 4 : start + 10]  # after the marker and the length
        if len(header) < 6:
            raise ValueError("a JPEG frame header is cut short")
        precision = header[0]
        height, width = int.from_bytes(header[1:3], "big"), int.from_bytes(header[3:5], "big")
        found = (height, width, header[5])
        if found != expected or not 2 <= precision <= 16:
            raise ValueError(
                f"a JPEG frame header says {found[0]}x{found[1]}, {found[2]} component(s), "
                f"precision {precision}; the data set says {expected[0]}x{expected[1]}, "
                f"{expected[2]} sample(s) per pixel"
            )


def _readable_fragments(encapsulated: bytes) -> list[bytes]:
    """The fragments after the Basic Offset Table (the first item), up to the first
    that cannot be read: as far as pydicom's own reading of the items goes."""
    items: list[bytes] = []
    try:
        for item in generate_fragments(encapsulated):
            items.append(item)
    except (ValueError, struct.error):
        pass
    return items[1:]


def frame_words(path: Path, offset: int, rows: int, columns: int) -> np.ndarray | None:
    """The stored words of the one JPEG Lossless frame encapsulated at `offset` in the
    file at `path` (the first item of its pixel data), or None: parsing the file then
    decodes it, or says why not, as for any other slice. None where libjpeg-turbo is
    missing; where the Basic Offset Table is neither empty nor [0] (pydicom reads
    such tables its own way); where the items or the stream cannot be read; where
    the stream is not `rows` x `columns` 16-bit words."""
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
            words: np.ndarray = imagecodecs.jpeg8_decode(frame)
        except Exception:  # damaged items or stream: refused, or read, by the parse
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

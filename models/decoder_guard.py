"""What reaches pydicom's pixel decoders: no GDCM, and no compressed frame whose
header contradicts its data set or that is cut short. The first two took the whole
infer process down; the last was decoded into an image partly made up.

GDCM, which pydicom tries first for JPEG, JPEG-LS and JPEG 2000, is taken off
all three. Its readers' errors become C++ exceptions that nothing catches, and
the process aborts; it also segfaulted. One stray byte between JPEG marker
segments was enough; so was a JPEG-LS width of 0 or precision of 17, a JPEG 2000
component precision of 38, or one component where the data set says three.
Fuzzing found 68 such streams among 17,435 damaged JPEG Lossless ones, and 186
(146 aborts, 40 segfaults) among 7,020 damaged JPEG-LS and JPEG 2000 ones, all
made from the chest slices. pylibjpeg, pyjpegls and Pillow answered every one
with an image or an ordinary exception. A stream only GDCM would read is refused:
its slice is left out.

pylibjpeg, though, allocated memory until the kernel killed the process on a
frame height of 0, and hung holding the GIL on a JPEG-LS frame of height 0 or of
65535 x 65535 in a 512 x 512 data set (30 of the 7,020). `check` reads the frame
headers of encapsulated pixel data, without decoding, and raises ValueError on any
that a well-formed file cannot have, on a frame cut short, or on one that would
decode to more than MAX_DECODED_PIXELS. Every one of those crashes and hangs is
refused by it.
"""

from __future__ import annotations

import contextlib
import struct

import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.pixels.decoders.base import get_decoder

# ITU-T T.81 (JPEG) and T.87 (JPEG-LS) streams: frame headers after SOFn markers.
JPEG_SYNTAXES = frozenset(uid.JPEGTransferSyntaxes + uid.JPEGLSTransferSyntaxes)
# ISO/IEC 15444 codestreams, HTJ2K's too: an image and tile size (SIZ) marker segment
# after SOC.
JPEG_2000_SYNTAXES = frozenset(uid.JPEG2000TransferSyntaxes)
GUARDED_SYNTAXES = JPEG_SYNTAXES | JPEG_2000_SYNTAXES
# Start-of-frame markers: FFC0-FFCF but DHT, JPG and DAC (ITU-T T.81, B.1.1.3), and
# JPEG-LS's FFF7 (T.87), whose frame header has the same fields: a stream labelled
# JPEG Lossless may still hold one, which pylibjpeg decodes. In entropy-coded data an
# FF byte is followed only by 00 or a restart marker, so these two bytes mark frame
# headers wherever they are found.
_START_OF_FRAME = np.array(
    [code for code in range(0xC0, 0xD0) if code not in (0xC4, 0xC8, 0xCC)] + [0xF7]
)
# A few kilobytes of stream can declare 65535 x 65535 pixels: 8 GiB for the decoders to
# fill. CT slices are 512 x 512, rarely 2048 x 2048; this is four times the latter.
MAX_DECODED_PIXELS = 4096 * 4096
_SOC_SIZ = b"\xff\x4f\xff\x51"  # start of codestream, then the SIZ marker
# After the SIZ marker: Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz,
# YTOsiz, Csiz; then Ssiz, XRsiz, YRsiz for each component (ISO/IEC 15444-1 A.5.1).
_SIZ = struct.Struct(">HHIIIIIIIIH")


def take_gdcm_off() -> None:
    """Remove GDCM from pydicom's decoders of these syntaxes, installed or not."""
    for syntax in GUARDED_SYNTAXES:
        # pydicom decodes no Part 2 syntax; GDCM may already be gone.
        with contextlib.suppress(NotImplementedError, ValueError):
            get_decoder(syntax).remove_plugin("gdcm")


take_gdcm_off()


def check(dataset: Dataset) -> None:
    """Raise ValueError if `dataset`'s compressed pixel data would decode to more than
    MAX_DECODED_PIXELS pixels; if a frame header gives another size than Rows x
    Columns, other than SamplesPerPixel components, or a precision outside what its
    standard and 16-bit DICOM pixels allow; or if the last frame is cut short. Does
    nothing for other transfer syntaxes, or where Rows or Columns is missing (pydicom
    then refuses to decode, and says so)."""
    syntax = getattr(dataset, "file_meta", {}).get("TransferSyntaxUID")
    rows, columns = dataset.get("Rows"), dataset.get("Columns")
    if syntax not in GUARDED_SYNTAXES or not isinstance(rows, int) or not isinstance(columns, int):
        return
    if rows * columns > MAX_DECODED_PIXELS:
        raise ValueError(
            f"{rows}x{columns} pixels: more than the {MAX_DECODED_PIXELS} a compressed "
            "frame may decode to here"
        )
    expected = (rows, columns, int(dataset.get("SamplesPerPixel", 1)))
    fragments = _readable_fragments(dataset.PixelData)
    if syntax in JPEG_SYNTAXES:
        _check_jpeg(fragments, expected)
    else:
        _check_jpeg_2000(fragments, expected)
    if not is_complete(b"".join(fragments[-2:])):  # two: the end marker may straddle them
        raise ValueError("the compressed frame is cut short: it does not end with its end marker")


def is_complete(frame: bytes) -> bool:
    """Whether a JPEG, JPEG-LS or JPEG 2000 frame ends with its end marker (EOI, EOC:
    both FFD9), after any padding. Cut short, libjpeg-turbo and pylibjpeg still return
    a whole image, its missing part made up, without an error (fuzzing: 298 of 450
    JPEG-LS streams cut at random; libjpeg-turbo on JPEG Lossless cut in half)."""
    # FF D9 cannot occur inside entropy-coded or packet data, so it marks the end. Only
    # the tail is read: padding is one byte (PS3.5 A.4), a few at most.
    return frame[-64:].rstrip(b"\x00\xff").endswith(b"\xff\xd9")


def _check_jpeg(fragments: list[bytes], expected: tuple[int, int, int]) -> None:
    """All fragments are searched, joined, since a frame may begin in any of them and a
    header may straddle two."""
    data = b"".join(fragments)
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


def _check_jpeg_2000(fragments: list[bytes], expected: tuple[int, int, int]) -> None:
    """Each frame begins a fragment (PS3.5 A.4) with SOC and SIZ; the first fragment
    must. In packet data an FF byte may be followed by 4F, so only fragment starts are
    read, not every SOC-like pair."""
    if not fragments or not fragments[0].startswith(_SOC_SIZ):
        raise ValueError("the pixel data does not begin with a JPEG 2000 codestream (SOC, SIZ)")
    for fragment in fragments:
        if fragment.startswith(_SOC_SIZ):
            _check_siz(fragment[4:], expected)


def _check_siz(segment: bytes, expected: tuple[int, int, int]) -> None:
    if len(segment) < _SIZ.size:
        raise ValueError("a JPEG 2000 SIZ marker segment is cut short")
    (length, _, width, height, x_offset, y_offset, tile_width, tile_height, _, _, count) = (
        _SIZ.unpack_from(segment)
    )
    components = segment[_SIZ.size : _SIZ.size + 3 * count]
    if length != _SIZ.size + 3 * count or len(components) != 3 * count:
        raise ValueError(f"a JPEG 2000 SIZ marker segment of {length} bytes has {count} components")
    found = (height - y_offset, width - x_offset, count)
    precisions = [(depth & 0x7F) + 1 for depth in components[0::3]]
    subsampled = any(factor == 0 for factor in components[1::3] + components[2::3])
    if found != expected or not all(1 <= p <= 16 for p in precisions):
        raise ValueError(
            f"a JPEG 2000 SIZ marker says {found[0]}x{found[1]}, {count} component(s), "
            f"precision {precisions}; the data set says {expected[0]}x{expected[1]}, "
            f"{expected[2]} sample(s) per pixel"
        )
    if tile_width == 0 or tile_height == 0 or subsampled:
        raise ValueError("a JPEG 2000 SIZ marker has a tile size or a subsampling of 0")


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

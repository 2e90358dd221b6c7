"""A received instance's header, read as pydicom reads it, without its eager work.

`dcmread` parses every sequence of undefined length into datasets as it reads,
and reads through a buffered file object. For a CT slice that was most of the
0.5 ms the receiver spent reading each header, while the receiver needs a few
top-level values. `read_header` only finds where each top-level element lies
and gives pydicom the raw elements its own reader would give; pydicom converts
a value when it is asked for. A sequence of undefined length is kept as the
bytes of its items, and parsed when first used, as pydicom parses a sequence of
defined length: its items' elements then count their positions from the
sequence's value, and in implicit VR an item's US-or-SS elements take the data
set's Pixel Representation (dcmread's eager parse leaves them US).

To end each sequence where dcmread ends it, the items are walked element by
element. Little endian, explicit or implicit VR, is read here. Everything else
(big endian, deflate, command elements, an encoding that is not the transfer
syntax's, a VR pydicom would have to guess, a sequence that pydicom would read
otherwise than its lengths say, deep nesting, a damaged or truncated element)
is left to `dcmread`, so that pydicom decides, and words, what is wrong.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import cast

from pydicom import dcmread
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

from pacs_node.errors import BadInstanceError

__all__ = ["inflated_size", "read_header"]

UNDEFINED_LENGTH = 0xFFFFFFFF
_PREAMBLE_BYTES = 128
_READ_AHEAD_BYTES = 64 * 1024
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
# "DICM", then (0002,0000) UL of length 4: the File Meta Information Group Length.
_META_GROUP_LENGTH = b"DICM\x02\x00\x00\x00UL\x04\x00"
_CHARACTER_SET = 0x00080005
# Sequences nest a few levels in real data; dcmread's recursion fails near 200.
_MAX_DEPTH = 16
# A header's sequences hold kilobytes; larger ones are left to dcmread.
_MAX_SEQUENCE_BYTES = 16 * 1024 * 1024
_KNOWN_VRS = frozenset(vr.value.encode() for vr in VR if len(vr.value) == 2)
_LONG_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)

_TAG = struct.Struct("<HH")
_EXPLICIT = struct.Struct("<HH2sH")
_IMPLICIT = struct.Struct("<HHL")
_LENGTH_32 = struct.Struct("<L")


Elements = dict[BaseTag, DataElement | RawDataElement]


class _NotReadHereError(Exception):
    """What `dcmread` reads instead: it knows every encoding, and says what is wrong."""


def read_header(path: Path, defer_bytes: int) -> Dataset:
    """`dcmread(path, defer_size=defer_bytes)`: the same elements, raw until used."""
    try:
        return _read(path, defer_bytes)
    except _NotReadHereError:
        return dcmread(path, defer_size=defer_bytes)


def inflated_size(path: Path, limit: int) -> int:
    """The bytes of the data set of a Deflated Explicit VR Little Endian file (PS3.5
    A.5) once inflated, counted without holding them: `dcmread` inflates the whole
    data set in memory, and its positions count in the inflated bytes, which the
    file's size does not bound.

    Raises BadInstanceError where the stream is damaged or cut short, or inflates
    beyond `limit` bytes (a small stream can inflate a thousandfold).
    """
    with path.open("rb") as file:
        start = file.read(_PREAMBLE_BYTES + 16)
        if start[_PREAMBLE_BYTES : _PREAMBLE_BYTES + 12] != _META_GROUP_LENGTH:
            raise BadInstanceError("no File Meta Information Group Length")
        file.seek(len(start) + int.from_bytes(start[-4:], "little"))
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        size = 0
        try:
            while not inflater.eof and (chunk := file.read(_READ_AHEAD_BYTES)):
                while chunk and not inflater.eof:
                    size += len(inflater.decompress(chunk, _READ_AHEAD_BYTES))
                    if size > limit:
                        raise BadInstanceError(f"deflated data set inflates beyond {limit} bytes")
                    chunk = inflater.unconsumed_tail
        except zlib.error as error:
            raise BadInstanceError(f"deflated data set cannot be inflated: {error}") from error
    if not inflater.eof:
        raise BadInstanceError("deflated data set is cut short")
    return size


def _read(path: Path, defer_bytes: int) -> FileDataset:
    with path.open("rb", buffering=0) as file:
        data = _Window(file.fileno())
        if data.read(_PREAMBLE_BYTES, 4) != b"DICM":
            raise _NotReadHereError
        reader = _Reader(data, defer_bytes)
        file_meta, start = reader.file_meta(_PREAMBLE_BYTES + 4)
        transfer_syntax = file_meta.get("TransferSyntaxUID")
        if transfer_syntax is None or not _read_here(transfer_syntax):
            raise _NotReadHereError
        if start >= data.size:
            raise _NotReadHereError  # no data set: dcmread then assumes implicit VR
        implicit = transfer_syntax == ImplicitVRLittleEndian
        elements = reader.top_level(start, implicit)
        preamble = data.read(0, _PREAMBLE_BYTES)
    dataset = Dataset(elements)
    # As read_dataset and dcmread record how the data set was encoded.
    character_set = dataset.get("SpecificCharacterSet")
    encoding = default_encoding if character_set is None else convert_encodings(character_set)
    dataset.set_original_encoding(implicit, True, encoding)
    header = FileDataset(str(path), dataset, preamble, file_meta, implicit, True)
    header.set_original_encoding(implicit, True, encoding)
    return header


def _read_here(transfer_syntax: UID) -> bool:
    """Not a data set compressed as a whole, big endian, or in a private syntax."""
    return transfer_syntax not in (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        *PrivateTransferSyntaxes,
    )


class _Window:
    """An open file's bytes by offset, read ahead: one read holds a whole header."""

    def __init__(self, descriptor: int) -> None:
        self.descriptor = descriptor
        self.size = os.fstat(descriptor).st_size
        self.start = 0
        self.buffer = b""

    def read(self, offset: int, count: int) -> bytes:
        """`count` bytes from `offset`, fewer at the end of the file."""
        begin = offset - self.start
        if begin < 0 or begin + count > len(self.buffer):
            self.buffer = os.pread(self.descriptor, max(count, _READ_AHEAD_BYTES), offset)
            self.start, begin = offset, 0
        return self.buffer[begin : begin + count]


class _Reader:
    """Element boundaries in one file's bytes; raises `_NotReadHereError` on anything odd."""

    def __init__(self, data: _Window, defer_bytes: int) -> None:
        self.data = data
        self.size = data.size
        self.defer_bytes = defer_bytes

    def file_meta(self, start: int) -> tuple[FileMetaDataset, int]:
        """Group 0002 (explicit VR little endian, read whole, as _read_file_meta_info
        reads it), and where the data set starts."""
        elements: Elements = {}
        offset = start
        while offset + 4 <= self.size and _TAG.unpack(self.data.read(offset, 4))[0] == 0x0002:
            tag, vr, length, value_at = self._explicit_header(offset)
            if length == UNDEFINED_LENGTH:
                raise _NotReadHereError
            offset = self._end(value_at, length)
            name = vr.decode()
            value = self._value(tag, name, value_at, length, defer=False)
            elements[tag] = RawDataElement(tag, name, length, value, value_at, False, True)
        file_meta = FileMetaDataset(elements)
        file_meta.set_original_encoding(False, True, default_encoding)
        try:  # the values dcmread converts as it reads the meta
            for keyword in ("FileMetaInformationGroupLength", "TransferSyntaxUID"):
                file_meta.get(keyword)
            if elements:
                file_meta[next(iter(elements))]
        except Exception as error:  # dcmread raises, or reads the meta as implicit VR
            raise _NotReadHereError from error
        return file_meta, offset

    def top_level(self, start: int, implicit: bool) -> Elements:
        self._check_encoding(start, implicit)
        if start + 4 <= self.size and _TAG.unpack(self.data.read(start, 4))[0] == 0x0000:
            raise _NotReadHereError  # command elements: dcmread reads them apart
        elements: Elements = {}
        offset = start
        sequence_read = False
        while offset < self.size:
            tag, vr, length, value_at = self._header(offset, implicit)
            if tag >> 16 == 0xFFFE:
                raise _NotReadHereError  # an item or delimiter outside a sequence
            if tag == _CHARACTER_SET and (
                sequence_read or tag in elements or length == UNDEFINED_LENGTH or vr == b"SQ"
            ):
                # dcmread decodes a sequence's text as it reads it, with the character
                # set read so far; converted later, it would take the last one.
                raise _NotReadHereError
            if length == UNDEFINED_LENGTH:
                element, offset = self._undefined_length(tag, vr, value_at, implicit)
                sequence_read = sequence_read or element.VR == "SQ"
            else:
                offset = self._end(value_at, length)
                name = None if vr is None else vr.decode()
                value = self._value(tag, name, value_at, length)
                element = RawDataElement(tag, name, length, value, value_at, implicit, True)
            elements[tag] = element
        return elements

    def _value(
        self, tag: BaseTag, vr: str | None, value_at: int, length: int, defer: bool = True
    ) -> bytes | None:
        """A value of defined length as data_element_generator gives it: None when
        deferred, the VR's raw empty value when empty."""
        if length == 0:
            return cast(bytes | None, empty_value_for_VR(vr, raw=True))
        if defer and length > self.defer_bytes and tag != _CHARACTER_SET:
            return None
        return self.data.read(value_at, length)

    def _undefined_length(
        self, tag: BaseTag, vr: bytes | None, value_at: int, implicit: bool
    ) -> tuple[RawDataElement, int]:
        """A top-level sequence, kept as its items' bytes for pydicom to parse when
        used, or encapsulated pixel data, deferred as dcmread defers it."""
        if _is_pixel_data(tag, vr):
            end = self._fragments_end(value_at)
            # The fragments in their items, without the delimiter, deferred as dcmread
            # defers them (it counts the delimiter's tag); implicit: the dictionary's VR.
            fragments = end - 8 - value_at
            value = (
                None if self.defer_bytes <= fragments + 4 else self.data.read(value_at, fragments)
            )
            name = vr.decode() if vr is not None else dictionary_VR(tag)
            element = RawDataElement(tag, name, UNDEFINED_LENGTH, value, value_at, implicit, True)
            return element, end
        _require_sequence(tag, vr)
        end = self._sequence_end(value_at, implicit, depth=1)
        if end - value_at > _MAX_SEQUENCE_BYTES:
            raise _NotReadHereError
        items = self.data.read(value_at, end - 8 - value_at)
        return RawDataElement(tag, "SQ", UNDEFINED_LENGTH, items, value_at, implicit, True), end

    def _fragments_end(self, offset: int) -> int:
        """Where encapsulated pixel data ends, past its delimiter: items of defined length."""
        while True:
            tag, length = self._item_header(offset)
            offset += 8
            if tag == _SEQUENCE_END:
                return offset
            if tag != _ITEM or length == UNDEFINED_LENGTH:
                raise _NotReadHereError
            offset = self._end(offset, length)

    def _sequence_end(self, offset: int, implicit: bool, depth: int) -> int:
        """Where a sequence of undefined length ends, past its delimiter, found as
        read_sequence finds it: each item's elements are walked, even in an item
        of defined length, which must end where its last element does."""
        if depth > _MAX_DEPTH:
            raise _NotReadHereError
        while True:
            tag, length = self._item_header(offset)
            offset += 8
            if tag == _SEQUENCE_END:
                return offset
            if tag != _ITEM:
                raise _NotReadHereError
            if length == UNDEFINED_LENGTH:
                offset = self._item_end(offset, None, implicit, depth)
            else:
                end = self._end(offset, length)
                if self._item_end(offset, end, implicit, depth) != end:
                    raise _NotReadHereError  # dcmread would read on past the item's end
                offset = end

    def _item_end(self, offset: int, end: int | None, implicit: bool, depth: int) -> int:
        """Walk an item's elements from `offset`: to its delimiter, past which this
        returns (`end` None), or until they reach `end` (an item of defined length)."""
        if offset != end and self._item_header(offset)[0] != _ITEM_END:
            self._check_encoding(offset, implicit)  # an empty item has no first element
        while end is None or offset < end:
            if self._item_header(offset)[0] == _ITEM_END:
                if end is not None:
                    raise _NotReadHereError  # would end an item of defined length early
                return offset + 8
            tag, vr, length, value_at = self._header(offset, implicit)
            if length != UNDEFINED_LENGTH:
                offset = self._end(value_at, length)
            elif _is_pixel_data(tag, vr):
                offset = self._fragments_end(value_at)  # an icon's, say
            else:
                _require_sequence(tag, vr)
                offset = self._sequence_end(value_at, implicit, depth + 1)
        return offset

    def _check_encoding(self, start: int, implicit: bool) -> None:
        """read_dataset's check of a data set's first element: where its VR looks
        otherwise than `implicit` says, pydicom would warn and switch (or, in a
        sequence, read implicit VR in explicit VR: PS3.5 6.2.2)."""
        if start + 6 <= self.size:
            vr = self.data.read(start + 4, 2)
            if (not (0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B)) != implicit:
                raise _NotReadHereError

    def _header(self, offset: int, implicit: bool) -> tuple[BaseTag, bytes | None, int, int]:
        """An element's tag, VR (None: implicit), value length, and where its value starts."""
        if not implicit:
            return self._explicit_header(offset)
        if offset + 8 > self.size:
            raise _NotReadHereError
        group, element, length = _IMPLICIT.unpack(self.data.read(offset, _IMPLICIT.size))
        return BaseTag(group << 16 | element), None, length, offset + 8

    def _explicit_header(self, offset: int) -> tuple[BaseTag, bytes, int, int]:
        if offset + 8 > self.size:
            raise _NotReadHereError
        group, element, vr, length = _EXPLICIT.unpack(self.data.read(offset, _EXPLICIT.size))
        if vr not in _KNOWN_VRS:
            raise _NotReadHereError
        if vr in _LONG_VRS:
            if offset + 12 > self.size:
                raise _NotReadHereError
            (length,) = _LENGTH_32.unpack(self.data.read(offset + 8, 4))
            return BaseTag(group << 16 | element), vr, length, offset + 12
        return BaseTag(group << 16 | element), vr, length, offset + 8

    def _item_header(self, offset: int) -> tuple[int, int]:
        if offset + 8 > self.size:
            raise _NotReadHereError
        group, element, length = _IMPLICIT.unpack(self.data.read(offset, _IMPLICIT.size))
        return group << 16 | element, length

    def _end(self, value_at: int, length: int) -> int:
        """The end of a value of defined length, which must lie in the file."""
        end = value_at + length
        if end > self.size:
            raise _NotReadHereError  # truncated: dcmread and check_complete say where
        return end


def _is_pixel_data(tag: int, vr: bytes | None) -> bool:
    """Encapsulated pixel data, as dcmread tells it from a sequence (implicit: by tag)."""
    return tag == _PIXEL_DATA and vr in (None, b"OB", b"OW")


def _require_sequence(tag: int, vr: bytes | None) -> None:
    """An element of undefined length read here must be a sequence: explicitly SQ, or
    (implicit VR) SQ in the data dictionary; otherwise pydicom would guess."""
    if vr is None:
        try:
            is_sequence = dictionary_VR(tag) == VR.SQ
        except KeyError:
            is_sequence = False
    else:
        is_sequence = vr == b"SQ"
    if not is_sequence:
        raise _NotReadHereError

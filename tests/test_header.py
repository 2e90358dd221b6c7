"""`read_header` gives what `dcmread(path, defer_size=...)` gives, read or left to pydicom."""

from __future__ import annotations

import random
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLossless,
)

from pacs_node import header
from pacs_node.header import UNDEFINED_LENGTH, read_header
from tests.bad_input import ct_slice, deflated, encoded, raw_file
from tests.peers import chest_ct

DEFER = 4096


def assert_same(path: Path) -> None:
    """read_header(path) is dcmread(path)'s data set: same elements in the same order,
    same values, the same ones deferred at the same places, same meta and encoding;
    or both raise the same kind of error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings on damaged data
        try:
            theirs = pydicom.dcmread(path, defer_size=DEFER)
        except Exception as error:
            with pytest.raises(type(error)):
                read_header(path, DEFER)
            return
        ours = read_header(path, DEFER)
        assert ours.preamble == theirs.preamble
        assert ours.file_meta == theirs.file_meta
        assert ours.original_encoding == theirs.original_encoding
        assert ours.original_character_set == theirs.original_character_set
        assert_same_elements(ours, theirs)


def assert_same_elements(ours: Dataset, theirs: Dataset) -> None:
    """The same elements, deferred alike, converting to the same values (items too)
    or failing to convert alike."""
    tags = list(theirs.keys())
    assert list(ours.keys()) == tags
    for tag in tags:
        expected = theirs.get_item(tag, keep_deferred=True)
        if isinstance(expected, RawDataElement) and expected.value is None:
            got = ours.get_item(tag, keep_deferred=True)
            assert isinstance(got, RawDataElement)
            assert (got.value, got.value_tell, got.length) == (
                None,
                expected.value_tell,
                expected.length,
            )
            continue
        expected_value, got_value = converted(theirs, tag), converted(ours, tag)
        if isinstance(expected_value, Sequence):
            assert isinstance(got_value, Sequence) and len(got_value) == len(expected_value)
            for got_item, expected_item in zip(got_value, expected_value, strict=True):
                assert_same_elements(got_item, expected_item)
        else:
            assert got_value == expected_value, tag


def converted(dataset: Dataset, tag: int) -> object:
    """The element's VR and value, or the kind of error converting it raised."""
    try:
        element = dataset[tag]
    except Exception as error:  # damaged data: pydicom may raise anything
        return type(error)
    return element.value if element.VR == "SQ" else (element.VR, element.value)


@pytest.fixture
def read_here_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """read_header may not hand the file to dcmread (the tests' own dcmread still works)."""

    def refused(*args: object, **kwargs: object) -> Dataset:
        raise AssertionError("left to dcmread")

    monkeypatch.setattr(header, "dcmread", refused)
    yield


@pytest.fixture
def left_to_pydicom(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """The files read_header handed to dcmread."""
    handed: list[Path] = []

    def counted(path: Path, **kwargs: object) -> Dataset:
        handed.append(path)
        return pydicom.dcmread(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(header, "dcmread", counted)
    yield handed


def saved(dataset: Dataset, path: Path, **options: object) -> Path:
    dataset.save_as(path, enforce_file_format=True, **options)  # type: ignore[arg-type]
    return path


def test_real_slices_are_read_here(read_here_only: None) -> None:
    # Explicit VR, sequences of undefined length with items of undefined length.
    for path in sorted(chest_ct().glob("*.dcm")):
        assert_same(path)


def test_implicit_vr_is_read_here(tmp_path: Path, read_here_only: None) -> None:
    dataset = ct_slice()
    dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert_same(saved(dataset, tmp_path / "implicit.dcm"))


def test_encapsulated_pixel_data_is_read_here(tmp_path: Path, read_here_only: None) -> None:
    dataset = ct_slice()
    dataset.file_meta.TransferSyntaxUID = JPEGLossless
    for fragments, name in (([b"\xff\xd8" + b"x" * 9000], "large"), ([b"ab", b"cd"], "small")):
        dataset.PixelData = encapsulate(fragments)
        dataset["PixelData"].is_undefined_length = True
        dataset["PixelData"].VR = "OB"
        assert_same(saved(dataset, tmp_path / f"{name}.dcm"))  # deferred, then read


def test_elements_of_every_kind_are_read_here(tmp_path: Path, read_here_only: None) -> None:
    dataset = ct_slice()
    dataset.ImageComments = "x" * (DEFER + 1)  # deferred, before the pixel data
    dataset.AccessionNumber = ""  # empty values
    dataset.add_new(0x00091010, "LO", "PRIVATE")
    dataset.add_new(0x00091011, "OB", b"\x00" * 10)
    dataset.add_new(0x00091012, "UN", b"\x01\x02")
    item = Dataset()
    item.CodeValue = "121007"
    item.CodeMeaning = "Device"
    dataset.ProcedureCodeSequence = Sequence([item, Dataset()])
    dataset["ProcedureCodeSequence"].is_undefined_length = False  # a defined length
    dataset.ReferencedStudySequence = Sequence([])  # an empty sequence
    dataset.DataSetTrailingPadding = b"\0" * 8  # after the pixel data
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        dataset.file_meta.TransferSyntaxUID = syntax
        assert_same(saved(dataset, tmp_path / f"{syntax}.dcm"))


@pytest.mark.parametrize("syntax", [ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
def test_other_encodings_are_left_to_pydicom(
    tmp_path: Path, syntax: UID, left_to_pydicom: list[Path]
) -> None:
    dataset = ct_slice()
    body = encoded(dataset)
    if syntax == DeflatedExplicitVRLittleEndian:
        path = raw_file(tmp_path / "deflated.dcm", dataset.SOPClassUID, "1.2.3", deflated(body))
    else:
        dataset.file_meta.TransferSyntaxUID = syntax
        path = tmp_path / "big.dcm"
        pydicom.dcmwrite(path, dataset, implicit_vr=False, little_endian=False, force_encoding=True)
    assert_same(path)
    assert left_to_pydicom == [path]


def test_a_private_sequence_in_implicit_vr_is_left_to_pydicom(
    tmp_path: Path, left_to_pydicom: list[Path]
) -> None:
    # pydicom guesses its VR by looking ahead; that guess is not made twice.
    dataset = ct_slice()
    dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    dataset.add(DataElement(0x00091010, "SQ", Sequence([Dataset()])))
    dataset[0x00091010].is_undefined_length = True
    path = saved(dataset, tmp_path / "private.dcm")
    assert_same(path)
    assert left_to_pydicom == [path]


def test_every_truncation_reads_as_dcmread_reads_it(tmp_path: Path) -> None:
    whole = sorted(chest_ct().glob("*.dcm"))[0].read_bytes()
    path = tmp_path / "cut.dcm"
    ends = [*range(0, 4000, 7), len(whole) - 1000, len(whole) - 1]
    for end in ends:
        path.write_bytes(whole[:end])
        assert_same(path)


def test_damaged_headers_read_as_dcmread_reads_them(tmp_path: Path) -> None:
    whole = sorted(chest_ct().glob("*.dcm"))[0].read_bytes()  # its header: bytes 0-3020
    generator = random.Random(5)
    path = tmp_path / "damaged.dcm"
    for _ in range(400):
        data = bytearray(whole)
        for _ in range(generator.randint(1, 3)):
            data[generator.randrange(132, 3020)] = generator.randrange(256)
        path.write_bytes(bytes(data))
        assert_same(path)


# Raw encodings, for what no writer makes on purpose.
_LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
ITEM_END = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
SEQUENCE_END = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


def element(tag: int, vr: str, value: bytes = b"", length: int | None = None) -> bytes:
    """One explicit VR little endian element; `length` overrides the value's own."""
    size = len(value) if length is None else length
    if vr in _LONG:
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, size) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), size) + value


def item(content: bytes, length: int | None = None) -> bytes:
    size = len(content) if length is None else length
    return struct.pack("<HHL", 0xFFFE, 0xE000, size) + content


def sequence(tag: int, *items: bytes) -> bytes:
    return element(tag, "SQ", length=UNDEFINED_LENGTH) + b"".join(items) + SEQUENCE_END


def first_and_rest() -> tuple[bytes, bytes]:
    """A real slice's data set (explicit VR): its first element, (0008,0005), and the rest."""
    body = encoded(ct_slice())
    first = 8 + struct.unpack_from("<H", body, 6)[0]  # a short element
    return body[:first], body[first:]


def instance_with(tmp_path: Path, name: str, before: bytes = b"", after: bytes = b"") -> Path:
    """A real slice's data set with raw elements put before and after its first element."""
    first, rest = first_and_rest()
    return raw_file(tmp_path / name, CT_IMAGE, "1.2.3", before + first + after + rest)


CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MODALITY = 0x00080060


def test_an_item_that_its_elements_overrun_or_end_early_is_left_to_pydicom(
    tmp_path: Path, left_to_pydicom: list[Path]
) -> None:
    # dcmread walks an item's elements, not its length: a delimiter inside ends it
    # early, an element may run past it; both then read the rest of the data set
    # otherwise than the lengths say (here: Modality MR, or CT).
    hidden = element(MODALITY, "CS", b"CT")
    early = ITEM_END + SEQUENCE_END + element(MODALITY, "CS", b"MR")
    early += element(0x00080070, "LO", length=8 + len(hidden))[:8]
    overrun = item(element(0x00081150, "UI", b"1.2", length=12), length=8) + b"\0" * 4
    for name, items in (("early", item(early)), ("overrun", overrun)):
        path = instance_with(tmp_path, name, after=sequence(0x00081140, items) + hidden)
        assert_same(path)
        assert left_to_pydicom[-1] == path


def test_deep_nesting_is_left_to_pydicom(tmp_path: Path, left_to_pydicom: list[Path]) -> None:
    nested = element(0x00080100, "SH", b"X ")
    for _ in range(40):
        nested = sequence(0x00081140, item(nested + ITEM_END, length=UNDEFINED_LENGTH))
    path = instance_with(tmp_path, "nested.dcm", after=nested)
    assert_same(path)
    assert left_to_pydicom == [path]


def test_a_character_set_after_a_sequence_is_left_to_pydicom(
    tmp_path: Path, left_to_pydicom: list[Path]
) -> None:
    # dcmread decodes an item's text with the character set read so far.
    name = "Müller".encode() + b" "
    items = item(element(0x00100010, "PN", name))
    _, rest = first_and_rest()
    moved = sequence(0x00080006, items) + element(0x00080005, "CS", b"ISO_IR 192")
    path = raw_file(tmp_path / "late.dcm", CT_IMAGE, "1.2.3", moved + rest)
    assert_same(path)
    assert left_to_pydicom == [path]


def test_command_elements_and_bad_group_lengths_are_left_to_pydicom(
    tmp_path: Path, left_to_pydicom: list[Path]
) -> None:
    command = element(0x00000900, "US", b"\0\0")
    bad_length = element(0x00020000, "UL", b"\1\2\3")  # read as meta: dcmread raises
    for name, before in (("command", command), ("length", bad_length)):
        path = instance_with(tmp_path, name, before=before)
        assert_same(path)
        assert left_to_pydicom[-1] == path


def test_long_meta_values_are_read_whole_as_dcmread_reads_them(
    tmp_path: Path, read_here_only: None
) -> None:
    path = instance_with(tmp_path, "meta", before=element(0x00020102, "OB", b"\1" * (DEFER + 2)))
    assert_same(path)

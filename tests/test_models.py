"""models/: the series rule, the VOI window, artifacts and the predictor."""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import pydicom
import pytest
import safetensors.torch
import torch
import torch.nn.functional as functional
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from models import (
    decoder_guard,
    jpeg_lossless,
    onnx_cache,
    onnx_export,
    onnx_network,
    preprocessing,
    resample,
)
from models import manifest as manifest_module
from models.aggregation import aggregate
from models.artifact import Aggregation, ArtifactError, load_artifact
from models.manifest import Manifest, content_hash
from models.network import build_mobilenet_v2
from models.pixel_layout import JPEG_LOSSLESS, NATIVE
from models.predictor import SlicePredictor, softmax
from models.preprocessing import (
    PixelLayout,
    Preprocessing,
    hounsfield_units,
    input_from_dataset,
    input_from_layout,
    pixel_layout,
    unit_from_dataset,
    window,
)
from models.torch_network import torch_network
from tests.benchmarks.receivers import resident_mb
from tests.dicom_data import made_jpeg_lossless, tiny_artifact
from tests.peers import chest_ct, tool
from tests.polling import wait_for
from tests.processes import export_child, running

CLASSES = ("benign", "malignant", "normal")


def test_series_rule_keeps_the_least_normal_slices_as_evidence() -> None:
    slices = np.array([[0.0, 0.0, 1.0]] * 18 + [[0.1, 0.8, 0.1], [0.2, 0.7, 0.1]], dtype=np.float64)
    result = aggregate(slices, CLASSES, Aggregation(negative_class="normal", fraction=0.1))
    # ceil(0.1 * 20) = 2 evidence slices: the two abnormal ones, not drowned by 18 normal ones.
    assert set(result.evidence) == {18, 19}
    assert result.label == "malignant"
    assert result.probabilities == pytest.approx((0.15, 0.75, 0.1))


def test_series_rule_without_negative_class_averages_everything() -> None:
    slices = np.array([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5]])
    result = aggregate(slices, CLASSES, Aggregation(negative_class=None))
    assert result.label == "benign"
    assert result.evidence == (0, 1)
    assert result.probabilities == pytest.approx((0.4, 0.3, 0.3))


def test_series_rule_refuses_an_empty_series() -> None:
    with pytest.raises(ValueError, match="at least one slice"):
        aggregate(np.zeros((0, 3)), CLASSES, Aggregation(negative_class="normal"))


def test_window_follows_the_dicom_linear_voi_function() -> None:
    # PS3.3 C.11.2.1.2.1 with c=40, w=400: x <= c-0.5-(w-1)/2 -> 0, x > c-0.5+(w-1)/2 -> 1.
    values = np.array([-160.0, -159.0, 39.5, 239.0, 240.0], dtype=np.float32)
    assert window(values, 40, 400) == pytest.approx([0.0, 1 / 399, 0.5, 1.0, 1.0], abs=1e-6)


def test_real_slice_is_converted_to_hounsfield_units() -> None:
    dataset = pydicom.dcmread(sorted(chest_ct().glob("*.dcm"))[0])
    hounsfield = hounsfield_units(dataset)
    assert hounsfield.dtype == np.float32
    assert hounsfield.min() >= -1024 - 1e-3
    # Air outside the body is close to -1000 HU.
    assert np.median(hounsfield[:20, :20]) < -900
    tensor = input_from_dataset(dataset, Preprocessing(window_center=-600, window_width=1200))
    assert tensor.shape == (3, 224, 224)


def _slice(
    signed: bool,
    bits_stored: int,
    rescale: tuple[float, float] | None,
    syntax: UID = ExplicitVRLittleEndian,
    bits_allocated: int = 16,
) -> Dataset:
    """A 32x32 slice whose stored words are random in all bits, unused high bits included."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.Rows = dataset.Columns = 32
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = bits_allocated
    dataset.BitsStored = bits_stored
    dataset.HighBit = bits_stored - 1
    dataset.PixelRepresentation = int(signed)
    if rescale is not None:
        dataset.RescaleSlope, dataset.RescaleIntercept = rescale
    words = np.random.default_rng(bits_stored).integers(0, 2**bits_allocated, (32, 32))
    dataset.PixelData = words.astype(f"<u{bits_allocated // 8}").tobytes()
    return dataset


TABLE_CASES = [
    (False, 12, (1.0, -1024.0)),
    (True, 12, (1.0, -1024.0)),
    (True, 16, (0.5, 3.25)),
    (False, 16, None),
    (True, 10, (2.5, -1000.0)),
    (False, 9, (1000.0, -1000.0)),
]


def _reference(dataset: Dataset) -> np.ndarray:
    return window(hounsfield_units(dataset), -600.0, 1200.0)


@pytest.mark.parametrize(("signed", "bits_stored", "rescale"), TABLE_CASES)
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless])
def test_window_table_equals_the_reference_path_bit_for_bit(
    signed: bool,
    bits_stored: int,
    rescale: tuple[float, float] | None,
    syntax: UID,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dataset = _slice(signed, bits_stored, rescale)
    if syntax == RLELossless:  # compressed: the table indexes pydicom's decoded values
        dataset.compress(RLELossless, dataset.pixel_array)
    dataset.file_meta.TransferSyntaxUID = syntax
    expected = _reference(dataset)

    def no_reference(dataset: Dataset) -> np.ndarray:
        raise AssertionError("the reference path was taken")

    monkeypatch.setattr(preprocessing, "hounsfield_units", no_reference)
    unit = unit_from_dataset(dataset, -600.0, 1200.0)
    assert unit.dtype == expected.dtype == np.float32
    assert np.array_equal(unit, expected)


SMALL = Preprocessing(window_center=-600, window_width=1200, input_size=32)


def _saved(dataset: Dataset, path: Path) -> Path:
    dataset.SOPClassUID, dataset.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(("signed", "bits_stored", "rescale"), TABLE_CASES)
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_slice_read_through_its_layout_gives_the_same_input_bit_for_bit(
    signed: bool,
    bits_stored: int,
    rescale: tuple[float, float] | None,
    syntax: UID,
    tmp_path: Path,
) -> None:
    path = _saved(_slice(signed, bits_stored, rescale, syntax=syntax), tmp_path / "slice.dcm")
    # As the receiver reads a stored instance: the pixel data left on disk.
    layout = pixel_layout(pydicom.dcmread(path, defer_size=1024))
    assert layout is not None
    assert PixelLayout.from_text(layout.to_text()) == layout
    expected = input_from_dataset(pydicom.dcmread(path), SMALL)
    assert np.array_equal(input_from_layout(path, layout, SMALL), expected)


@pytest.mark.parametrize(("signed", "bits_stored", "rescale"), TABLE_CASES)
@pytest.mark.parametrize("fragments", [1, 3])
def test_a_jpeg_lossless_slice_read_through_its_layout_gives_the_same_input_bit_for_bit(
    signed: bool,
    bits_stored: int,
    rescale: tuple[float, float] | None,
    fragments: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dataset = made_jpeg_lossless(_slice(signed, bits_stored, rescale), fragments)
    path = _saved(dataset, tmp_path / "slice.dcm")
    layout = pixel_layout(pydicom.dcmread(path, defer_size=1024))
    assert layout is not None
    assert layout.encoding == JPEG_LOSSLESS
    assert PixelLayout.from_text(layout.to_text()) == layout
    expected = input_from_dataset(pydicom.dcmread(path), SMALL)

    def not_parsed(*args: object, **kwargs: object) -> Dataset:
        raise AssertionError("the file was parsed")

    monkeypatch.setattr(pydicom, "dcmread", not_parsed)
    assert np.array_equal(input_from_layout(path, layout, SMALL), expected)


def test_a_jpeg_stream_libjpeg_turbo_refuses_is_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    imagecodecs = pytest.importorskip("imagecodecs")
    path = _saved(made_jpeg_lossless(_slice(True, 12, (1.0, -1024.0))), tmp_path / "slice.dcm")
    layout = pixel_layout(pydicom.dcmread(path, defer_size=1024))
    assert layout is not None
    expected = input_from_dataset(pydicom.dcmread(path), SMALL)

    def refused(src: bytes) -> np.ndarray:
        raise imagecodecs.Jpeg8Error("refused")

    # pylibjpeg then decodes it, as for a file without a layout.
    monkeypatch.setattr(imagecodecs, "jpeg8_decode", refused)
    assert np.array_equal(input_from_layout(path, layout, SMALL), expected)


def _parsed_files(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Records each file pydicom parses from now on (and parses it)."""
    parsed: list[object] = []
    parse = pydicom.dcmread

    def recorded(path: Any, *args: Any, **kwargs: Any) -> Dataset:
        parsed.append(path)
        return parse(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", recorded)
    return parsed


def _with_items(dataset: Dataset, change: Callable[[bytearray], None]) -> Dataset:
    """`dataset` with its encapsulated pixel data's bytes changed by `change`."""
    items = bytearray(dataset.PixelData)
    change(items)
    dataset.PixelData = bytes(items)
    dataset["PixelData"].is_undefined_length = True
    return dataset


def _outcome(read: Callable[[], np.ndarray]) -> tuple[float, ...] | str:
    """The input `read` gives, or the name of what it raised."""
    try:
        return tuple(read().flatten().tolist())
    except Exception as error:
        return type(error).__name__


def _second_fragment_offset(items: bytearray) -> int:
    """The second fragment's offset from the first fragment, as an offset table gives it."""
    first_fragment = 8 + int.from_bytes(items[4:8], "little")
    return 8 + int.from_bytes(items[first_fragment + 4 : first_fragment + 8], "little")


def _offset_table_to_second_fragment(items: bytearray) -> None:
    """An offset table [offset of the second fragment], in place of the empty one."""
    offset = _second_fragment_offset(items)
    items[4:8] = (4).to_bytes(4, "little")
    items[8:8] = offset.to_bytes(4, "little")


def _last_fragment_one_byte_shorter(items: bytearray) -> None:
    """An odd last fragment and a stray byte before the delimiter, as a writer that
    pads the whole value rather than each fragment leaves them."""
    last = 8 + int.from_bytes(items[4:8], "little")
    while items[last : last + 4] == b"\xfe\xff\x00\xe0":
        length = int.from_bytes(items[last + 4 : last + 8], "little")
        if items[last + 8 + length : last + 12 + length] != b"\xfe\xff\x00\xe0":
            break
        last += 8 + length
    length = int.from_bytes(items[last + 4 : last + 8], "little")
    items[last + 4 : last + 8] = (length - 1).to_bytes(4, "little")


@pytest.mark.parametrize(
    "change", [_offset_table_to_second_fragment, _last_fragment_one_byte_shorter]
)
def test_jpeg_items_only_pydicom_reads_its_own_way_are_parsed(
    change: Callable[[bytearray], None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = made_jpeg_lossless(_slice(True, 12, (1.0, -1024.0)), fragments=2)
    path = _saved(_with_items(dataset, change), tmp_path / "slice.dcm")
    layout = pixel_layout(pydicom.dcmread(path, defer_size=1024))
    assert layout is not None
    assert layout.encoding == JPEG_LOSSLESS
    # The parse's input, or what it raises: the layout path must give the same.
    expected = _outcome(lambda: input_from_dataset(pydicom.dcmread(path), SMALL))
    parsed = _parsed_files(monkeypatch)
    assert _outcome(lambda: input_from_layout(path, layout, SMALL)) == expected
    assert parsed == [path]


def test_jpeg_data_with_an_extended_offset_table_or_float_pixels_gets_no_layout(
    tmp_path: Path,
) -> None:
    with_table = made_jpeg_lossless(_slice(False, 12, (1.0, -1024.0)))
    with_table.ExtendedOffsetTable = (0).to_bytes(8, "little")
    with_table.ExtendedOffsetTableLengths = (100).to_bytes(8, "little")
    with_floats = _slice(False, 12, (1.0, -1024.0))
    with_floats.FloatPixelData = bytes(4 * 32 * 32)
    for name, dataset in {"extended table": with_table, "float pixels": with_floats}.items():
        path = _saved(dataset, tmp_path / f"{name}.dcm")
        assert pixel_layout(pydicom.dcmread(path, defer_size=1024)) is None, name


def test_a_layout_of_an_unknown_encoding_is_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _saved(_slice(False, 12, (1.0, -1024.0)), tmp_path / "slice.dcm")
    layout = pixel_layout(pydicom.dcmread(path, defer_size=1024))
    assert layout is not None
    expected = input_from_dataset(pydicom.dcmread(path), SMALL)
    later = PixelLayout.from_text(layout.to_text().replace('"native"', '"from-a-later-version"'))
    parsed = _parsed_files(monkeypatch)
    assert np.array_equal(input_from_layout(path, later, SMALL), expected)
    assert parsed == [path]


def test_a_layout_written_before_jpeg_layouts_reads_as_words_in_place() -> None:
    text = '{"offset":3008,"rows":512,"columns":512,"signed":false,"bits_stored":12,'
    text += '"rescale":[1.0,-1024.0]}'
    layout = PixelLayout.from_text(text)
    assert layout.encoding == NATIVE
    assert layout == PixelLayout(3008, 512, 512, False, 12, (1.0, -1024.0))


def test_the_real_chest_slices_read_through_their_layout_give_the_same_input() -> None:
    preprocessing = Preprocessing(window_center=70, window_width=30, input_size=160)
    for path in sorted(chest_ct().glob("*.dcm")):
        layout = pixel_layout(pydicom.dcmread(path, defer_size=1024))
        assert layout is not None, path.name
        expected = input_from_dataset(pydicom.dcmread(path), preprocessing)
        assert np.array_equal(input_from_layout(path, layout, preprocessing), expected), path.name


def test_data_without_a_layout_is_parsed_and_a_short_file_is_refused(tmp_path: Path) -> None:
    compressed = _slice(False, 12, (1.0, -1024.0))
    compressed.compress(RLELossless, compressed.pixel_array)
    big_endian = _slice(True, 12, (1.0, -1024.0), syntax=ExplicitVRBigEndian)
    with_modality_lut = _slice(False, 12, None)
    with_modality_lut.ModalityLUTSequence = [Dataset()]
    two_frames = _slice(False, 12, (1.0, -1024.0))
    two_frames.Rows, two_frames.NumberOfFrames = 16, 2
    for name, dataset in {
        "compressed": compressed,
        "big endian": big_endian,
        "modality LUT": with_modality_lut,
        "two frames": two_frames,
        "8-bit": _slice(False, 8, (1.0, -1024.0), bits_allocated=8),
    }.items():
        path = _saved(dataset, tmp_path / f"{name}.dcm")
        assert pixel_layout(pydicom.dcmread(path, defer_size=1024)) is None, name
    path = _saved(_slice(False, 12, (1.0, -1024.0)), tmp_path / "short.dcm")
    layout = pixel_layout(pydicom.dcmread(path, defer_size=1024))
    assert layout is not None
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="ends before its 1024 stored words"):
        input_from_layout(path, layout, SMALL)


def test_data_a_table_cannot_map_takes_the_reference_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    eight_bit = _slice(False, 8, (1.0, -1024.0), bits_allocated=8)
    with_modality_lut = _slice(False, 12, None)
    with_modality_lut.ModalityLUTSequence = [Dataset()]
    with_modality_lut.ModalityLUTSequence[0].LUTDescriptor = [4096, 0, 16]
    with_modality_lut.ModalityLUTSequence[0].LUTData = list(range(4096))
    big_endian = _slice(True, 12, (1.0, -1024.0), syntax=ExplicitVRBigEndian)
    calls = []

    def counted(dataset: Dataset) -> np.ndarray:
        calls.append(dataset)
        return hounsfield_units(dataset)

    monkeypatch.setattr(preprocessing, "hounsfield_units", counted)
    for dataset in (eight_bit, with_modality_lut):
        assert np.array_equal(unit_from_dataset(dataset, -600.0, 1200.0), _reference(dataset))
    assert calls == [eight_bit, with_modality_lut]
    # Not read in place, but through pydicom, which swaps the bytes; still the table.
    assert np.array_equal(unit_from_dataset(big_endian, -600.0, 1200.0), _reference(big_endian))
    assert len(calls) == 2
    two_frames = _slice(False, 12, (1.0, -1024.0))
    two_frames.Rows, two_frames.NumberOfFrames = 16, 2
    with pytest.raises(ValueError, match="expected one 2-D frame"):
        unit_from_dataset(two_frames, -600.0, 1200.0)


RESIZES = [
    ((512, 512), 160),
    ((512, 512), 224),
    ((333, 512), 160),
    ((100, 120), 160),
    ((7, 1000), 5),
]


def _torch_resize(image: np.ndarray, size: int, dtype: torch.dtype) -> np.ndarray:
    """torch's antialiased bilinear resize, the one the pipeline used before `resample`."""
    tensor = torch.from_numpy(image).to(dtype)[None, None]
    resized = functional.interpolate(
        tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return resized[0, 0].numpy()


@pytest.mark.parametrize(("in_size", "out_size"), [(512, 160), (512, 224), (100, 160), (1000, 7)])
def test_the_resize_weights_are_torchs(in_size: int, out_size: int) -> None:
    starts, lengths, weights = resample.taps(in_size, out_size)
    ours = np.zeros((out_size, in_size))
    for index, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        ours[index, start : start + length] = weights[index, :length]
    # Row j of the identity is an impulse at input pixel j: resized across, it gives
    # the weight of pixel j in every output pixel.
    impulses = torch.eye(in_size, dtype=torch.float64)[None, None]
    torchs = functional.interpolate(
        impulses, size=(in_size, out_size), mode="bilinear", align_corners=False, antialias=True
    )[0, 0].numpy()
    assert np.abs(ours - torchs.T).max() < 1e-7


@pytest.mark.parametrize(("shape", "size"), RESIZES)
def test_the_resize_is_within_float32_rounding_of_the_exact_one(
    shape: tuple[int, int], size: int
) -> None:
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    resized = resample.normalised(image, size, (0.0,), (1.0,))[0]
    # torch in float64 is exact to ~1e-15 here; torch in float32 strays from it by
    # up to ~1e-5 (512 -> 224), 50 times further than these loops.
    assert np.abs(resized - _torch_resize(image, size, torch.float64)).max() < 5e-7
    assert np.abs(resized - _torch_resize(image, size, torch.float32)).max() < 2e-5


def test_an_image_of_the_input_size_is_only_normalised_bit_for_bit() -> None:
    image = np.random.default_rng(1).random((32, 32), dtype=np.float32)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    channels = resample.normalised(image, 32, mean, std)
    for channel, (m, s) in enumerate(zip(mean, std, strict=True)):
        assert np.array_equal(channels[channel], (image - np.float32(m)) / np.float32(s))


def test_the_lookup_is_numpys_take_and_checks_its_inputs() -> None:
    words = np.random.default_rng(2).integers(0, 2**16, (64, 48), dtype=np.uint16)
    table = np.random.default_rng(3).random(2**16, dtype=np.float32)
    assert np.array_equal(resample.lookup(words, table), np.take(table, words))
    # Not contiguous: the words are copied first, not read past their rows.
    assert np.array_equal(resample.lookup(words[:, ::2], table), np.take(table, words[:, ::2]))
    with pytest.raises(ValueError, match="float32 table of 65536"):
        resample.lookup(words, table[:4096])
    # Wider words would index past the table: refused, not wrapped.
    with pytest.raises(ValueError, match="16-bit unsigned words"):
        resample.lookup(words.astype(np.int32), table)


def test_the_cached_taps_cannot_be_changed() -> None:
    # Every caller shares them, and the loops check no bounds.
    for array in resample.taps(512, 160):
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 10**6


def _import_and_decode(install: Path, environment: dict[str, str]) -> str:
    """Import `install`/resample.py in a new interpreter, decode with it; its stderr."""
    check = (
        "import numpy as np, resample; "
        "table = np.arange(2**16, dtype=np.float32); "
        "words = np.array([[0, 7], [9, 65535]], dtype=np.uint16); "
        "assert (resample.lookup(words, table) == words).all(); "
        "assert resample.normalised(table[:4].reshape(2, 2), 1, (0.0,), (1.0,)).shape == (1, 1, 1)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", check],
        cwd=install,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stderr


def _installed_copy(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    install = tmp_path / "install"
    install.mkdir()
    shutil.copy(Path(resample.__file__), install / "resample.py")
    environment = {key: value for key, value in os.environ.items() if not key.startswith("NUMBA_")}
    environment["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    return install, environment


def test_the_loops_compile_where_no_cache_can_be_written(tmp_path: Path) -> None:
    """A read-only install run by a user without a writable home still decodes."""
    install, environment = _installed_copy(tmp_path)
    (install / "__pycache__").write_text("not a folder")  # numba cannot cache beside it
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")  # nor in the user's cache directory
    environment.update(HOME=str(blocked / "home"), XDG_CACHE_HOME=str(blocked / "cache"))
    assert "numba cache not usable" in _import_and_decode(install, environment)
    assert sorted(path.name for path in install.iterdir()) == ["__pycache__", "resample.py"]


def test_a_damaged_cache_only_costs_the_compilation(tmp_path: Path) -> None:
    install, environment = _installed_copy(tmp_path)
    assert "numba cache" not in _import_and_decode(install, environment)
    indexes = list((install / "__pycache__").glob("resample.*.nbi"))
    assert len(indexes) == 2  # one per loop: the first import filled the cache
    for index in indexes:
        index.write_bytes(b"damaged")
    assert "numba cache not usable" in _import_and_decode(install, environment)


@pytest.mark.parametrize("signed", [False, True])
def test_jpeg_lossless_is_decoded_by_libjpeg_turbo_as_by_pylibjpeg(
    signed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    imagecodecs = pytest.importorskip("imagecodecs")
    # A 12-bit stream as DICOM stores signed values: the low 12 bits of each word.
    dataset = made_jpeg_lossless(_slice(signed, 12, (1.0, -1024.0)))
    stream = get_frame(dataset.PixelData, 0, number_of_frames=1)
    by_pylibjpeg = pixel_array(dataset, decoding_plugin="pylibjpeg")
    decoded = []
    decode = imagecodecs.jpeg8_decode

    def counted(src: bytes) -> np.ndarray:
        decoded.append(src)
        frame: np.ndarray = decode(src)
        return frame

    monkeypatch.setattr(imagecodecs, "jpeg8_decode", counted)

    assert np.array_equal(jpeg_lossless.pixel_array(dataset), by_pylibjpeg)
    assert decoded == [stream]


def _frame_header_changed(
    dataset: Dataset, marker: int = 0xC3, found: int = 0xC3, **changes: int
) -> Dataset:
    """`dataset` (JPEG Lossless, or JPEG-LS with `found` 0xF7) with fields of its stream's
    frame header changed, and its marker made `marker`."""
    stream = bytearray(get_frame(dataset.PixelData, 0, number_of_frames=1))
    start = stream.index(bytes([0xFF, found])) + 4  # after the marker and the length
    stream[start - 3] = marker
    fields = {"precision": (0, 1), "height": (1, 3), "width": (3, 5), "components": (5, 6)}
    for name, value in changes.items():
        first, end = fields[name]
        stream[start + first : start + end] = value.to_bytes(end - first, "big")
    dataset.PixelData = encapsulate([bytes(stream)], fragments_per_frame=2)
    dataset["PixelData"].is_undefined_length = True
    return dataset


def _refused_before_any_decoder(
    dataset: Dataset, match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decoding(self: Dataset) -> np.ndarray:
        raise AssertionError("a decoder was reached")

    monkeypatch.setattr(Dataset, "pixel_array", property(no_decoding))
    with pytest.raises(ValueError, match=match):
        input_from_dataset(dataset, SMALL)


@pytest.mark.parametrize(
    "changes",
    [
        {"precision": 17},
        {"height": 0},
        {"width": 31},
        {"components": 3},
        {"precision": 1},
        # JPEG-LS's SOF55 in a JPEG Lossless stream: pylibjpeg decoded it, and on height 0
        # grew past 2.5 GB in 20 s (a review's fuzzing).
        {"marker": 0xF7, "height": 0},
    ],
)
def test_a_jpeg_frame_header_that_contradicts_its_data_set_reaches_no_decoder(
    changes: dict[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoders took the process down on such streams: GDCM segfaulted on precision
    17, pylibjpeg allocated until the kernel killed it on height 0."""
    stored = made_jpeg_lossless(_slice(False, 12, (1.0, -1024.0)))
    dataset = _frame_header_changed(stored, **changes)
    path = _saved(dataset, tmp_path / "slice.dcm")
    layout = pixel_layout(pydicom.dcmread(path, defer_size=1024))
    assert layout is not None

    _refused_before_any_decoder(pydicom.dcmread(path), "a JPEG frame header says", monkeypatch)
    # Through the layout: libjpeg-turbo refuses it or decodes another size; then parsed.
    with pytest.raises(ValueError, match="a JPEG frame header says"):
        input_from_layout(path, layout, SMALL)


def _first_chest_slice() -> Path:
    return sorted(chest_ct().glob("*.dcm"))[0]


def _jpeg_ls(folder: Path) -> Dataset:
    """The first chest slice made JPEG-LS lossless by DCMTK's dcmcjpls."""
    encoded = folder / "jpeg-ls.dcm"
    subprocess.run([tool("dcmcjpls"), str(_first_chest_slice()), str(encoded)], check=True)
    return pydicom.dcmread(encoded)


def _jpeg_2000() -> Dataset:
    """The first chest slice made JPEG 2000 lossless by OpenJPEG (pylibjpeg-openjpeg)."""
    dataset = pydicom.dcmread(_first_chest_slice())
    dataset.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    return dataset


# After SOC and the SIZ marker: where each field of the SIZ segment lies, and its size.
_SIZ_FIELDS = {"Xsiz": (4, 4), "XTsiz": (20, 4), "Csiz": (36, 2), "Ssiz": (38, 1), "XRsiz": (39, 1)}


def _siz_changed(dataset: Dataset, **changes: int) -> Dataset:
    stream = bytearray(get_frame(dataset.PixelData, 0, number_of_frames=1))
    assert stream[:4] == b"\xff\x4f\xff\x51"
    for name, value in changes.items():
        offset, size = _SIZ_FIELDS[name]
        stream[4 + offset : 4 + offset + size] = value.to_bytes(size, "big")
    dataset.PixelData = encapsulate([bytes(stream)])
    dataset["PixelData"].is_undefined_length = True
    return dataset


def test_jpeg_ls_and_jpeg_2000_slices_decode_as_the_uncompressed_one(tmp_path: Path) -> None:
    source = pydicom.dcmread(_first_chest_slice())
    expected = input_from_dataset(source, SMALL)
    for compressed in (_jpeg_ls(tmp_path), _jpeg_2000()):
        assert np.array_equal(input_from_dataset(compressed, SMALL), expected)


def test_gdcm_decodes_no_jpeg_jpeg_ls_or_jpeg_2000() -> None:
    """It aborted or segfaulted the process on damaged streams of all three (fuzzing).
    Put back as pydicom registers it, it is taken off again, installed or not."""
    syntaxes = decoder_guard.JPEG_SYNTAXES | {JPEG2000Lossless, JPEG2000}
    for syntax in syntaxes:
        get_decoder(syntax).add_plugin("gdcm", ("pydicom.pixels.decoders.gdcm", "_decode_frame"))

    decoder_guard.take_gdcm_off()

    for syntax in syntaxes:
        with pytest.raises(ValueError, match="no such plugin"):
            get_decoder(syntax).remove_plugin("gdcm")


@pytest.mark.parametrize(
    "changes",
    [
        {"width": 0},  # GDCM segfaulted
        {"precision": 17},  # GDCM aborted
        {"height": 65535, "width": 65535},  # GDCM aborted; pylibjpeg ran past 20 s
        {"components": 3},
    ],
)
def test_a_jpeg_ls_frame_header_that_contradicts_its_data_set_reaches_no_decoder(
    changes: dict[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = _frame_header_changed(_jpeg_ls(tmp_path), marker=0xF7, found=0xF7, **changes)
    _refused_before_any_decoder(dataset, "a JPEG frame header says", monkeypatch)


@pytest.mark.parametrize(
    ("siz", "data_set"),
    [
        ({"Ssiz": 37}, {}),  # precision 38: GDCM aborted
        ({}, {"Rows": 1024}),  # GDCM aborted
        ({}, {"SamplesPerPixel": 3}),  # GDCM aborted
        ({"Xsiz": 0}, {}),
    ],
)
def test_a_jpeg_2000_size_that_contradicts_its_data_set_reaches_no_decoder(
    siz: dict[str, int], data_set: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = _siz_changed(_jpeg_2000(), **siz)
    for keyword, value in data_set.items():
        setattr(dataset, keyword, value)
    _refused_before_any_decoder(dataset, "a JPEG 2000 SIZ marker says", monkeypatch)


@pytest.mark.parametrize("siz", [{"XTsiz": 0}, {"XRsiz": 0}, {"Csiz": 2}])
def test_a_malformed_jpeg_2000_size_segment_reaches_no_decoder(
    siz: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = _siz_changed(_jpeg_2000(), **siz)
    _refused_before_any_decoder(dataset, "a JPEG 2000 SIZ marker", monkeypatch)


def test_a_compressed_slice_of_65535_by_65535_pixels_reaches_no_decoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its data set and frame header agree, so only the size stops it: the decoders
    would fill 8 GiB from a few kilobytes of stream (fuzzing)."""
    dataset = _frame_header_changed(_jpeg_ls(tmp_path), 0xF7, 0xF7, height=65535, width=65535)
    dataset.Rows = dataset.Columns = 65535
    _refused_before_any_decoder(dataset, "more than the 16777216", monkeypatch)


def _cut_short(dataset: Dataset) -> Dataset:
    """`dataset` with its one frame cut in half, in fragments that are still whole."""
    stream = get_frame(dataset.PixelData, 0, number_of_frames=1)
    dataset.PixelData = encapsulate([stream[: len(stream) // 2]])
    dataset["PixelData"].is_undefined_length = True
    return dataset


@pytest.mark.parametrize("compression", ["jpeg lossless", "jpeg-ls", "jpeg 2000"])
def test_a_compressed_frame_cut_short_reaches_no_decoder(
    compression: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut in half, such streams were decoded without an error into a whole image, its
    missing half made up (libjpeg-turbo, pylibjpeg)."""
    source = pydicom.dcmread(_first_chest_slice())
    compressed = {
        "jpeg lossless": lambda: made_jpeg_lossless(source),
        "jpeg-ls": lambda: _jpeg_ls(tmp_path),
        "jpeg 2000": _jpeg_2000,
    }[compression]()
    _refused_before_any_decoder(_cut_short(compressed), "cut short", monkeypatch)


def test_a_jpeg_lossless_frame_cut_short_is_refused_through_its_layout(tmp_path: Path) -> None:
    source = pydicom.dcmread(_first_chest_slice())
    path = _saved(_cut_short(made_jpeg_lossless(source)), tmp_path / "cut.dcm")
    layout = pixel_layout(pydicom.dcmread(path, defer_size=1024))
    assert layout is not None and layout.encoding == JPEG_LOSSLESS
    with pytest.raises(ValueError, match="cut short"):
        input_from_layout(path, layout, SMALL)


def _stray_byte_before_scan(dataset: Dataset, refused_by_libjpeg_turbo: bool) -> Dataset:
    """`dataset` (JPEG) with a 00 byte before its scan header; libjpeg-turbo can be made
    to refuse it with a successive-approximation bit (Ah = 1), which GDCM reads."""
    stream = bytearray(get_frame(dataset.PixelData, 0, number_of_frames=1))
    scan = stream.index(b"\xff\xda")
    if refused_by_libjpeg_turbo:
        stream[scan + 9] |= 0x10  # Ah, after Ls, Ns, one component's two bytes, Ss, Se
    stream[scan:scan] = b"\x00"
    dataset.PixelData = encapsulate([bytes(stream)])
    dataset["PixelData"].is_undefined_length = True
    return dataset


@pytest.mark.parametrize("lossless", [False, True], ids=["baseline", "lossless"])
def test_a_stray_byte_between_jpeg_segments_does_not_abort_the_process(
    tmp_path: Path, lossless: bool
) -> None:
    """GDCM aborted the process on these (an uncaught C++ exception); it decodes no JPEG
    now. A baseline slice is then read by Pillow; the lossless one, which libjpeg-turbo
    refuses, by pylibjpeg, or refused with an ordinary exception."""
    source = sorted(chest_ct().glob("*.dcm"))[0]
    if lossless:
        dataset = made_jpeg_lossless(pydicom.dcmread(source))
    else:
        encoded = tmp_path / "baseline.dcm"
        subprocess.run([tool("dcmcjpeg"), "+eb", str(source), str(encoded)], check=True)
        dataset = pydicom.dcmread(encoded)
    path = tmp_path / "stray.dcm"
    _stray_byte_before_scan(dataset, refused_by_libjpeg_turbo=lossless).save_as(path)
    script = (
        "import sys, pydicom\n"
        "from models.manifest import Preprocessing\n"
        "from models.preprocessing import input_from_dataset\n"
        "try:\n"
        "    input_from_dataset(pydicom.dcmread(sys.argv[1]), Preprocessing(40.0, 400.0))\n"
        "    print('decoded')\n"
        "except Exception as error:\n"
        "    print('refused', type(error).__name__)\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.startswith("decoded" if not lossless else ("decoded", "refused"))


def test_artifact_round_trip_and_prediction(tmp_path: Path) -> None:
    folder = tiny_artifact(tmp_path / "model")
    artifact = load_artifact(folder)
    assert artifact.manifest.classes == CLASSES
    predictor = SlicePredictor(folder, "cpu", onnx_cache=tmp_path / "cache")
    probabilities = predictor.predict(np.zeros((2, 3, 64, 64), dtype=np.float32))
    assert probabilities.shape == (2, 3)
    assert probabilities.sum(axis=1) == pytest.approx([1.0, 1.0])


def _eager_probabilities(folder: Path, inputs: np.ndarray) -> np.ndarray:
    """The artifact's own network, in eager PyTorch, on `inputs`."""
    with torch.inference_mode():
        logits = load_artifact(folder).build_network()(torch.from_numpy(inputs))
    probabilities: np.ndarray = torch.softmax(logits, dim=1).double().numpy()
    return probabilities


def test_cpu_forward_pass_gives_the_classes_of_eager_pytorch(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slices = sorted(chest_ct().glob("*.dcm"))[:7]
    preprocessing = load_artifact(tiny_model).manifest.preprocessing
    inputs = np.stack([input_from_dataset(pydicom.dcmread(path), preprocessing) for path in slices])
    eager = _eager_probabilities(tiny_model, inputs)

    predictor = SlicePredictor(tiny_model, "cpu", onnx_cache=tmp_path)
    # Any batch size, not only the one the model was exported with.
    probabilities = np.concatenate([predictor.predict(inputs[:1]), predictor.predict(inputs[1:])])
    assert probabilities == pytest.approx(eager, abs=1e-5)
    assert (probabilities.argmax(axis=1) == eager.argmax(axis=1)).all()

    def no_export(folder: Path, output: Path, cancelled: Callable[[], bool]) -> None:
        raise AssertionError("exported again despite the cache")

    monkeypatch.setattr(onnx_cache, "_run_export", no_export)
    restarted = SlicePredictor(tiny_model, "cpu", onnx_cache=tmp_path)
    assert restarted.predict(inputs) == pytest.approx(probabilities, abs=1e-6)
    with pytest.raises(ValueError, match=r"expected a \(n, 3, 64, 64\) batch"):
        restarted.predict(np.zeros((1, 3, 32, 32), dtype=np.float32))


def test_the_cuda_forward_pass_gives_the_artifacts_logits(tiny_model: Path) -> None:
    """The node's forward pass on CUDA (`torch_network`), run here on the CPU: numpy
    in, the eager network's float32 logits out, at any batch size."""
    inputs = np.random.default_rng(3).standard_normal((3, 3, 64, 64), dtype=np.float32)
    artifact = load_artifact(tiny_model)
    forward = torch_network(artifact, "cpu")
    logits = np.concatenate([forward(inputs[:1]), forward(inputs[1:])])
    with torch.inference_mode():
        expected = artifact.build_network()(torch.from_numpy(inputs)).numpy()
    assert logits.dtype == np.float32
    assert logits == pytest.approx(expected, abs=1e-5)


# A fresh process that loads the artifact argv[1] on device argv[3] with the export
# cache argv[2], predicts one blank slice, and prints the device, the shape of the
# prediction and which of torch, torchvision and onnx it imported.
_PREDICTING = (
    "import sys\n"
    "import numpy as np\n"
    "from pathlib import Path\n"
    "from models.predictor import SlicePredictor\n"
    "predictor = SlicePredictor(Path(sys.argv[1]), sys.argv[3], onnx_cache=Path(sys.argv[2]))\n"
    "print(predictor.device, predictor.predict(np.zeros((1, 3, 64, 64), np.float32)).shape)\n"
    "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'onnx'}))\n"
)


def _predicting(model: Path, cache: Path, device: str = "cpu") -> list[str]:
    """The command of a `_PREDICTING` process."""
    return [sys.executable, "-c", _PREDICTING, str(model), str(cache), device]


def test_a_cpu_predictor_runs_without_importing_torch(tiny_model: Path, tmp_path: Path) -> None:
    """torch (~670 MB) stays out of a process that classifies on a CPU, even one that
    has to export the model first: the export runs in a child process."""
    for run in ("exports", "reads the cache"):
        ran = subprocess.run(
            _predicting(tiny_model, tmp_path / "cache", "auto"),
            capture_output=True,
            text=True,
            timeout=300,
            cwd=Path(__file__).parent.parent,
        )
        assert ran.returncode == 0, ran.stderr[-2000:]
        assert ran.stdout.splitlines() == ["cpu (1, 3)", "[]"], run
    assert len(list((tmp_path / "cache").glob("*.onnx"))) == 1


def test_onnx_runtime_collects_no_telemetry(tiny_model: Path, tmp_path: Path) -> None:
    """ONNX Runtime's official builds collect usage telemetry for Microsoft by default,
    on Linux too since 1.29: a device id and queued events under the user's cache,
    uploaded once the host reaches Microsoft. A process that exports and runs the
    model, as the node does, must leave none."""
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    cache.mkdir()
    environment = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(cache)}
    environment.pop("ORT_DISABLE_TELEMETRY", None)  # the node's code must set it
    ran = subprocess.run(
        _predicting(tiny_model, tmp_path / "onnx"),
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 1  # it did export and run
    assert [*home.rglob("Microsoft"), *cache.rglob("Microsoft")] == []


def test_the_export_child_runs_this_nodes_code_from_any_working_directory(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A `models` folder where the node is started (say, one of model artifacts) must
    not stand in for the node's own package in the export's child process."""
    decoy = tmp_path / "here" / "models"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the decoy models package')\n")
    script = tmp_path / "predict.py"  # run as a file: its own imports skip the decoy
    script.write_text(_PREDICTING)
    ran = subprocess.run(
        [sys.executable, str(script), str(tiny_model), str(tmp_path / "cache"), "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=decoy.parent,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.splitlines()[0] == "cpu (1, 3)"


@pytest.mark.skipif(sys.platform != "linux", reason="the export ends with its parent on Linux")
@pytest.mark.parametrize("moment", ["as it starts", "once it holds torch"])
def test_an_export_ends_when_the_process_that_asked_for_it_is_killed(
    tiny_model: Path, tmp_path: Path, moment: str
) -> None:
    """An infer process killed while it loads (a stop during the first start, the
    OOM killer) must not leave its export child behind, holding torch's ~1 GB for
    seconds to write a model nobody waits for."""
    cache = tmp_path / "cache"
    asking = subprocess.Popen(_predicting(tiny_model, cache), cwd=Path(__file__).parent.parent)
    try:
        child = wait_for(lambda: export_child(asking.pid), 60, "the export child")
        if moment == "once it holds torch":  # it imports torch once tied to its parent
            wait_for(lambda: resident_mb(child) > 300, 60, "the export child to import torch")
    finally:
        asking.kill()
        asking.wait()
    wait_for(lambda: not running(child), 30, "the export child to end")
    assert list(cache.iterdir()) == []  # nothing written, not even a partial file


def _at_once(network: Callable[[np.ndarray], np.ndarray], batches: list[np.ndarray]) -> list[Any]:
    """Each batch's logits, or its error, each from a thread of its own. Daemon
    threads: a call that never returns fails the test instead of hanging it."""
    results: queue.Queue[Any] = queue.Queue()

    def run(batch: np.ndarray) -> None:
        try:
            results.put(network(batch))
        except Exception as error:  # returned to the test, which checks its type
            results.put(error)

    for batch in batches:
        threading.Thread(target=run, args=(batch,), daemon=True).start()
    return [results.get(timeout=30) for _ in batches]


def test_a_forward_pass_that_fails_gives_its_lane_back(tiny_model: Path, tmp_path: Path) -> None:
    network = SlicePredictor(tiny_model, "cpu", tmp_path, lanes=2).network
    two_channels = np.zeros((1, 2, 64, 64), dtype=np.float32)  # ONNX Runtime refuses the shape
    for _ in range(3):  # more failures than lanes: a lost session would block the third
        (error,) = _at_once(network, [two_channels])
        assert isinstance(error, InvalidArgument)
    both = _at_once(network, [np.zeros((2, 3, 64, 64), dtype=np.float32)] * 2)
    assert [logits.shape for logits in both] == [(2, 3)] * 2


def _damaged(model: bytes) -> bytes:
    """`model` with its first class's bias moved by 1: as if its weights were damaged,
    its metadata (content hash, probe logits) untouched."""
    proto = onnx.load_from_string(model)
    (bias,) = [
        tensor for tensor in proto.graph.initializer if tuple(tensor.dims) == (len(CLASSES),)
    ]
    bias.CopyFrom(
        onnx.numpy_helper.from_array(
            onnx.numpy_helper.to_array(bias) + np.array([1, 0, 0], np.float32), bias.name
        )
    )
    return bytes(proto.SerializeToString())


@pytest.mark.parametrize("damage", ["another model's export", "damaged weights", "cut short"])
def test_a_cached_export_that_disagrees_with_the_artifact_is_exported_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    folder = tiny_artifact(tmp_path / "model", seed=1)
    cache = tmp_path / "cache"
    SlicePredictor(folder, "cpu", onnx_cache=cache)
    (cached,) = cache.glob("*.onnx")
    if damage == "another model's export":
        other = load_artifact(tiny_artifact(tmp_path / "other", seed=2))
        cached.write_bytes(onnx_export.exported_model(other))
    elif damage == "damaged weights":
        cached.write_bytes(_damaged(cached.read_bytes()))
    else:
        cached.write_bytes(cached.read_bytes()[:100_000])
    inputs = np.random.default_rng(5).standard_normal((3, 3, 64, 64), dtype=np.float32)
    eager = _eager_probabilities(folder, inputs)
    if damage != "cut short":
        planted = softmax(onnx_network.OnnxNetwork(cached.read_bytes(), 1)(inputs))
        assert np.abs(planted - eager).max() > 1e-3  # the planted model does differ

    with caplog.at_level(logging.WARNING, logger="models.onnx_network"):
        predictor = SlicePredictor(folder, "cpu", onnx_cache=cache)
    assert "disagrees with the artifact" in caplog.text
    assert predictor.predict(inputs) == pytest.approx(eager, abs=1e-5)


def test_an_export_removes_the_exports_no_start_has_used_for_30_days(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A node updated for years must not keep every export it ever made: exports
    unused for 30 days go when another is made, with partial files of exports killed
    while writing; an export read at a start counts as used, whatever its age."""
    cache = tmp_path / "cache"
    SlicePredictor(tiny_model, "cpu", onnx_cache=cache)
    (in_use,) = cache.glob("*.onnx")
    day, now = 86400, time.time()
    ages = {
        in_use.name: 40 * day,
        "unused.onnx": 31 * day,
        "recent.onnx": 29 * day,
        ".gone.onnx.x1.partial": 11 * 60,
        ".writing.onnx.x2.partial": 60,
        "not-an-export.txt": 400 * day,
    }
    for name, age in ages.items():
        (cache / name).touch()
        os.utime(cache / name, (now - age, now - age))
    SlicePredictor(tiny_model, "cpu", onnx_cache=cache)  # a start that reads it
    assert in_use.stat().st_mtime > now - 60

    with caplog.at_level(logging.INFO, logger="models.onnx_cache"):
        SlicePredictor(tiny_artifact(tmp_path / "next", seed=4), "cpu", onnx_cache=cache)
    kept = {path.name for path in cache.iterdir()} - {in_use.name}
    assert len(kept) == 4  # the new export and three files
    assert {"recent.onnx", ".writing.onnx.x2.partial", "not-an-export.txt"} < kept
    assert "removed unused files from the ONNX export cache" in caplog.text


def test_unwritable_export_cache_only_costs_the_export(tiny_model: Path, tmp_path: Path) -> None:
    occupied = tmp_path / "not-a-folder"
    occupied.write_text("")
    predictor = SlicePredictor(tiny_model, "cpu", onnx_cache=occupied)
    assert predictor.predict(np.zeros((2, 3, 64, 64), dtype=np.float32)).shape == (2, 3)


def test_an_export_that_fails_says_why(tmp_path: Path) -> None:
    """The child's reason reaches the caller: here weights that do not fit the network,
    which only loading them in torch (in the child) can tell."""
    folder = tiny_artifact(tmp_path / "model")
    weights = folder / "weights.safetensors"
    state = safetensors.torch.load_file(str(weights))
    state["classifier.1.bias"] = torch.zeros(7)
    safetensors.torch.save_file(state, str(weights))
    document = json.loads((folder / "manifest.json").read_text())
    document["content_hash"] = content_hash(document, weights.read_bytes())
    (folder / "manifest.json").write_text(json.dumps(document))
    with pytest.raises(onnx_cache.ExportError, match="do not fit the network"):
        SlicePredictor(folder, "cpu", onnx_cache=tmp_path / "cache")


def test_an_artifact_loads_the_weights_whose_hash_it_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights replaced on disk once their hash has been checked are not the ones the
    network gets: it runs the bytes the manifest vouches for."""
    folder = tiny_artifact(tmp_path / "model", seed=1)
    weights = folder / "weights.safetensors"
    vouched = safetensors.torch.load(weights.read_bytes())  # not mapped: the file changes
    other = tiny_artifact(tmp_path / "other", seed=2) / "weights.safetensors"
    read_verified = manifest_module.read_verified

    def replaced_after_the_check(checked: Path) -> tuple[Manifest, bytes]:
        verified = read_verified(checked)
        shutil.copyfile(other, weights)
        return verified

    monkeypatch.setattr("models.artifact.read_verified", replaced_after_the_check)
    loaded = load_artifact(folder).state_dict
    on_disk = safetensors.torch.load(weights.read_bytes())
    assert not all(torch.equal(on_disk[name], vouched[name]) for name in vouched)  # replaced
    assert loaded.keys() == vouched.keys()
    assert all(torch.equal(loaded[name], vouched[name]) for name in vouched)


def test_tampered_artifacts_are_refused_with_the_reason(tmp_path: Path) -> None:
    folder = tiny_artifact(tmp_path / "model")
    manifest_path = folder / "manifest.json"
    document = json.loads(manifest_path.read_text())

    document["classes"] = ["a", "b", "c"]
    manifest_path.write_text(json.dumps(document))
    with pytest.raises(ArtifactError, match="fails its hash check"):
        load_artifact(folder)

    del document["preprocessing"]
    manifest_path.write_text(json.dumps(document))
    with pytest.raises(ArtifactError, match=r"lacks required key.*preprocessing"):
        load_artifact(folder)

    manifest_path.unlink()
    with pytest.raises(ArtifactError, match=r"has no manifest\.json"):
        load_artifact(folder)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nowhere")


def test_head_is_a_new_linear_layer() -> None:
    network = build_mobilenet_v2(3)
    head = network.classifier[-1]  # type: ignore[index]
    assert isinstance(head, torch.nn.Linear)
    assert (head.in_features, head.out_features) == (1280, 3)

"""The lookup, resize and normalisation of one slice, as compiled loops (numba).

Every slice the node classifies goes through here, on the infer stage's decode
threads, and so does every training image. Of the ~0.48 ms it took to decode a
real 512x512 slice, numpy's `take` of the window table took 0.17 ms and torch's
`interpolate(mode="bilinear", antialias=True)` with the normalisation 0.29 ms;
here the lookup takes ~0.08 ms and the resize with the normalisation ~0.2 ms,
the whole decoding ~0.27 ms (60 real slices, best of 5), and the loops run
without the GIL, so the decode threads take less of the cores that the forward
pass runs on.

The resize is torch's antialiased bilinear one, separable: each output pixel is
a normalised triangle filter as wide as the scale, over the input pixels whose
centres it covers (PyTorch's `_compute_weights_aa`, `align_corners=False`). The
weights equal torch's to 1e-7. The sums, in float32, are within 4e-7 of the
exact resize (torch in float64) on every shape tried, ~1.5e-7 at a slice's
sizes, where torch's own float32 resize strays by up to 1e-5 (512 -> 224;
tests/test_models.py checks both).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import NamedTuple, TypeVar, cast

import numba
import numpy as np
from numba import types
from numba.core.typing.templates import Signature

__all__ = ["Taps", "lookup", "normalised", "taps"]

log = logging.getLogger(__name__)

TABLE_SIZE = 2**16  # one float32 entry per 16-bit stored word


class Taps(NamedTuple):
    """Which input pixels, with which weights, make each output pixel along one axis."""

    starts: np.ndarray  # (out,) int64: the first input pixel of each output pixel
    lengths: np.ndarray  # (out,) int64: how many input pixels from there
    weights: np.ndarray  # (out, widest) float32: their weights, summing to 1; zero past length


@lru_cache(maxsize=32)
def taps(in_size: int, out_size: int) -> Taps:
    """The antialiased bilinear taps from `in_size` pixels to `out_size` (torch's)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"cannot resize {in_size} pixels to {out_size}")
    if in_size == out_size:  # a copy: one tap of weight 1, bit for bit
        ones = np.ones((out_size, 1), dtype=np.float32)
        return _shared(np.arange(out_size, dtype=np.int64), np.ones(out_size, np.int64), ones)
    scale = in_size / out_size
    # Shrinking widens the filter to the scale, so every input pixel counts;
    # enlarging keeps it one pixel wide (plain bilinear).
    support = max(scale, 1.0)
    stretch = 1.0 / support
    widest = math.ceil(support) * 2 + 1
    starts = np.zeros(out_size, dtype=np.int64)
    lengths = np.zeros(out_size, dtype=np.int64)
    weights = np.zeros((out_size, widest), dtype=np.float32)
    for index in range(out_size):
        center = scale * (index + 0.5)
        start = max(int(center - support + 0.5), 0)
        stop = min(int(center + support + 0.5), in_size)
        distance = (np.arange(start, stop) - center + 0.5) * stretch
        row = np.clip(1.0 - np.abs(distance), 0.0, None)
        starts[index], lengths[index] = start, stop - start
        weights[index, : stop - start] = row / row.sum()
    return _shared(starts, lengths, weights)


def _shared(starts: np.ndarray, lengths: np.ndarray, weights: np.ndarray) -> Taps:
    """Read-only: every caller gets the same cached arrays, and the loops check no
    bounds, so a changed length would read past the image."""
    for array in (starts, lengths, weights):
        array.flags.writeable = False
    return Taps(starts, lengths, weights)


# The loops' one signature each, compiled when this module is imported: the decode
# threads never wait for a compilation. Inputs may be read-only (pixel data in place
# in a dataset).
def _array(dtype: types.Type, dimensions: int, readonly: bool = True) -> types.Array:
    return types.Array(dtype, dimensions, "C", readonly=readonly)


_WORDS, _IMAGE = _array(types.uint16, 2), _array(types.float32, 2)
_VALUES, _INDICES = _array(types.float32, 1), _array(types.int64, 1)
_OUT_2D, _OUT_3D = _array(types.float32, 2, False), _array(types.float32, 3, False)
_TAPS = (_INDICES, _INDICES, _IMAGE)  # starts, lengths, weights

_Loop = TypeVar("_Loop", bound=Callable[..., None])


def _compiled(signature: Signature) -> Callable[[_Loop], _Loop]:
    """Compile with `signature`, without the GIL; kept in numba's cache (~0.2 s to
    load instead of ~1 s to compile) beside this file or else in the user's cache
    directory. A cache that cannot be used (none writable, as for a read-only
    install run by a user without a home; a damaged file; a full disk) only costs
    the compilation, at every start: the loop is compiled again without it, and a
    real compilation error is raised from there."""

    def compile_loop(loop: _Loop) -> _Loop:
        try:
            compiled = numba.njit(signature, nogil=True, error_model="numpy", cache=True)(loop)
        except Exception as error:  # numba's cache raises whatever its files give
            log.warning(
                "numba cache not usable, compiling without it",
                extra={"reason": f"{type(error).__name__}: {error}"},
            )
            compiled = numba.njit(signature, nogil=True, error_model="numpy")(loop)
        return cast(_Loop, compiled)

    return compile_loop


@_compiled(types.void(_WORDS, _VALUES, _OUT_2D))
def _lookup(words: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    rows, columns = words.shape
    for row in range(rows):
        for column in range(columns):
            out[row, column] = table[words[row, column]]


@_compiled(types.void(_IMAGE, *_TAPS, *_TAPS, _VALUES, _VALUES, _OUT_3D))
def _resize_normalise(
    image: np.ndarray,
    row_starts: np.ndarray,
    row_lengths: np.ndarray,
    row_weights: np.ndarray,
    column_starts: np.ndarray,
    column_lengths: np.ndarray,
    column_weights: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    out: np.ndarray,
) -> None:
    out_rows, out_columns = out.shape[1], out.shape[2]
    # Rows first: each output row is a weighted sum of whole input rows, a loop
    # along contiguous memory that the compiler vectorises.
    rows = np.zeros((out_rows, image.shape[1]), dtype=np.float32)
    for row in range(out_rows):
        for tap in range(row_lengths[row]):
            weight = row_weights[row, tap]
            source = image[row_starts[row] + tap]
            for column in range(image.shape[1]):
                rows[row, column] += weight * source[column]
    for row in range(out_rows):
        for column in range(out_columns):
            start = column_starts[column]
            total = np.float32(0.0)
            for tap in range(column_lengths[column]):
                total += column_weights[column, tap] * rows[row, start + tap]
            for channel in range(out.shape[0]):
                out[channel, row, column] = (total - mean[channel]) / std[channel]


def lookup(words: np.ndarray, table: np.ndarray) -> np.ndarray:
    """`table[words]` for 16-bit words and a table of every 16-bit word (float32)."""
    if table.shape != (TABLE_SIZE,) or table.dtype != np.float32:
        raise ValueError(f"expected a native float32 table of {TABLE_SIZE} entries")
    if words.ndim != 2 or words.dtype.kind != "u" or words.dtype.itemsize != 2:
        raise ValueError(f"expected 2-D 16-bit unsigned words, got {words.dtype} {words.shape}")
    words = np.ascontiguousarray(words, dtype=np.uint16)
    table = np.ascontiguousarray(table)
    out = np.empty(words.shape, dtype=np.float32)
    _lookup(words, table, out)
    return out


def normalised(
    image: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """A greyscale image resized to (size, size), as len(mean) normalised channels:
    channel c is `(resized - mean[c]) / std[c]`, in float32 (shape (channels, size, size))."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    if len(mean) != len(std):
        raise ValueError(f"{len(mean)} means for {len(std)} standard deviations")
    image = np.ascontiguousarray(image, dtype=np.float32)
    rows, columns = taps(image.shape[0], size), taps(image.shape[1], size)
    out = np.empty((len(mean), size, size), dtype=np.float32)
    _resize_normalise(
        image,
        *rows,
        *columns,
        np.asarray(mean, dtype=np.float32),
        np.asarray(std, dtype=np.float32),
        out,
    )
    return out

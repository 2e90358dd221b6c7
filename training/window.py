"""Measure the HU window that makes real CT look like the 8-bit training exports.

The training images were windowed by the dataset's authors; the node receives
Hounsfield units. For each candidate window (centre, width) the DICOM slices
are windowed exactly as the node does (`models.preprocessing.window`), rounded
to 8 bits, and their pooled grey-level histogram is compared with the pooled
histogram of the training images by the 1-Wasserstein distance (in grey
levels: the mean number of grey levels a pixel must move). The window with
the smallest distance is the measured one. `pacs-train measure-window` runs
this and prints the ranking next to the windows radiologists use.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread

from models.preprocessing import hounsfield_units, window
from training.datasets import IMAGE_SUFFIXES, read_8bit

# The result of `pacs-train measure-window` on iq-othnccd/train against
# chest-ct-30 (see training/README.md): the default for new artifacts.
MEASURED_CENTER = 70.0
MEASURED_WIDTH = 30.0
# Windows a reader would use on chest CT, reported for comparison.
REFERENCE_WINDOWS = (
    (-600.0, 1200.0),
    (-600.0, 1500.0),
    (40.0, 350.0),
    (50.0, 350.0),
    (600.0, 1200.0),
)


@dataclass(frozen=True)
class WindowScore:
    center: float
    width: float
    distance: float  # 1-Wasserstein distance between histograms, in grey levels
    bright_fraction: float  # share of pixels at grey >= 64


def grey_histogram(values: np.ndarray) -> np.ndarray:
    """Normalised 256-bin histogram of 8-bit grey levels."""
    counts = np.bincount(values.ravel().astype(np.int64), minlength=256)[:256]
    histogram: np.ndarray = counts / max(1, counts.sum())
    return histogram


def image_histogram(paths: Iterable[Path]) -> np.ndarray:
    """The pooled histogram of 8-bit exports (padded to square as training reads them)."""
    total = np.zeros(256)
    for path in paths:
        total += np.bincount(read_8bit(path).ravel(), minlength=256)
    if not total.sum():
        raise ValueError("no training images to measure")
    histogram: np.ndarray = total / total.sum()
    return histogram


def dicom_hounsfield(folder: Path) -> np.ndarray:
    """Every pixel of every CT instance under `folder`, in HU, through the node's reader."""
    slices = [hounsfield_units(dcmread(path)).ravel() for path in sorted(folder.rglob("*.dcm"))]
    if not slices:
        raise ValueError(f"{folder} holds no .dcm files")
    return np.concatenate(slices)


def wasserstein(first: np.ndarray, second: np.ndarray) -> float:
    """1-Wasserstein distance between two histograms on the same unit-spaced bins."""
    return float(np.abs(np.cumsum(first) - np.cumsum(second)).sum())


def hounsfield_histogram(hounsfield: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct HU values and their frequencies: windowing these is the same as
    windowing every pixel, and thousands of times faster over a grid."""
    values, counts = np.unique(hounsfield, return_counts=True)
    return values, counts / counts.sum()


def score(
    hounsfield: tuple[np.ndarray, np.ndarray], target: np.ndarray, center: float, width: float
) -> WindowScore:
    values, weights = hounsfield
    grey = np.round(255.0 * window(values, center, width)).astype(np.int64)
    histogram = np.bincount(grey, weights=weights, minlength=256)[:256]
    return WindowScore(center, width, wasserstein(histogram, target), float(histogram[64:].sum()))


def measure(
    hounsfield: tuple[np.ndarray, np.ndarray],
    target: np.ndarray,
    centers: Iterable[float],
    widths: Iterable[float],
) -> list[WindowScore]:
    """Every (centre, width) on the grid, best first."""
    grid = [(float(c), float(w)) for c in centers for w in widths]
    scores = [score(hounsfield, target, c, w) for c, w in grid]
    return sorted(scores, key=lambda item: item.distance)


def training_image_paths(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)


def report(images: Path, dicom: Path) -> tuple[list[WindowScore], str]:
    """Run the measurement on a 10 HU grid and describe it."""
    target = image_histogram(training_image_paths(images))
    pixels = dicom_hounsfield(dicom)
    hounsfield = hounsfield_histogram(pixels)
    ranking = measure(
        hounsfield, target, np.arange(-700.0, 601.0, 10.0), np.arange(10.0, 2001.0, 10.0)
    )
    lines = [
        f"training images {images}: {target[64:].sum():.4f} of pixels at grey >= 64, "
        f"{target[12:118].sum():.4f} between 12 and 117",
        f"CT slices {dicom}: {pixels.size} pixels",
        "",
        "  centre   width   W1 (grey levels)   share >= 64",
    ]
    reference = [score(hounsfield, target, c, w) for c, w in REFERENCE_WINDOWS]
    for item in [*ranking[:5], *reference]:
        lines.append(
            f"  {item.center:6.0f}  {item.width:6.0f}   {item.distance:16.2f}"
            f"   {item.bright_fraction:11.4f}"
        )
    best = ranking[0]
    lines.append(f"\nmeasured window: centre {best.center:.0f} HU, width {best.width:.0f} HU")
    return ranking, "\n".join(lines)

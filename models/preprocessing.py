"""The one preprocessing pipeline, shared by training and inference.

A CT slice goes: stored values -> modality LUT (rescale slope/intercept) to
Hounsfield units -> VOI window to [0, 1] -> resize to the model's input size ->
three identical channels -> ImageNet normalisation. Training images that are
already windowed 8-bit exports enter at the "[0, 1]" step (value / 255), so
both kinds of input meet the same resize and normalisation code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as functional
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """The parameters of the pipeline, as recorded in a model's manifest."""

    window_center: float
    window_width: float
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.window_width < 1:
            raise ValueError(f"window_width must be >= 1, got {self.window_width}")
        if self.input_size < 32:
            raise ValueError(f"input_size must be >= 32, got {self.input_size}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "window_center": self.window_center,
            "window_width": self.window_width,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        return cls(
            window_center=float(values["window_center"]),
            window_width=float(values["window_width"]),
            input_size=int(values["input_size"]),
            mean=_triple(values["mean"], "mean"),
            std=_triple(values["std"], "std"),
        )


def _triple(values: Any, name: str) -> tuple[float, float, float]:
    if len(values) != 3:
        raise ValueError(f"preprocessing.{name} must have 3 values, got {values!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


def hounsfield_units(dataset: Dataset) -> np.ndarray:
    """The decoded pixel data of a single-frame CT instance, in HU (float32)."""
    stored = dataset.pixel_array
    if stored.ndim != 2:
        raise ValueError(f"expected one 2-D frame, got pixel data of shape {stored.shape}")
    return np.asarray(apply_modality_lut(stored, dataset), dtype=np.float32)


def window(hounsfield: np.ndarray, center: float, width: float) -> np.ndarray:
    """The DICOM linear VOI function (PS3.3 C.11.2.1.2.1), scaled to [0, 1].

    Using the standard's exact formula means an 8-bit export made by a
    conforming viewer with the same window equals `round(255 * window(...))`.
    """
    scaled = (hounsfield - (center - 0.5)) / (width - 1.0) + 0.5
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def unit_from_8bit(image: np.ndarray) -> np.ndarray:
    """An already windowed 8-bit greyscale image, scaled to [0, 1]."""
    if image.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit image, got dtype {image.dtype}")
    return image.astype(np.float32) / 255.0


def tensor_from_unit(unit: np.ndarray, preprocessing: Preprocessing) -> torch.Tensor:
    """A [0, 1] greyscale image as the model's normalised (3, S, S) input."""
    if unit.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {unit.shape}")
    size = preprocessing.input_size
    image = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))[None, None]
    if image.shape[-2:] != (size, size):
        image = functional.interpolate(
            image, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    image = image[0].expand(3, size, size)
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32).view(3, 1, 1)
    return ((image - mean) / std).contiguous()


def tensor_from_hounsfield(hounsfield: np.ndarray, preprocessing: Preprocessing) -> torch.Tensor:
    """A slice in HU as the model's normalised (3, S, S) input."""
    unit = window(hounsfield, preprocessing.window_center, preprocessing.window_width)
    return tensor_from_unit(unit, preprocessing)


def tensor_from_dataset(dataset: Dataset, preprocessing: Preprocessing) -> torch.Tensor:
    """A single-frame CT instance as the model's normalised (3, S, S) input."""
    return tensor_from_hounsfield(hounsfield_units(dataset), preprocessing)

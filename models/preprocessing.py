"""The one preprocessing pipeline, shared by training and inference.

A CT slice goes: stored values -> modality LUT (rescale slope/intercept) to
Hounsfield units -> VOI window to [0, 1] -> resize to the model's input size ->
three identical channels -> ImageNet normalisation. Training images that are
already windowed 8-bit exports enter at the "[0, 1]" step (value / 255), so
both kinds of input meet the same resize and normalisation code.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as functional
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut

from models.manifest import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

# Re-exported: the parameters live with the manifest, the pipeline here.
__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preprocessing",
    "hounsfield_units",
    "tensor_from_dataset",
    "tensor_from_hounsfield",
    "tensor_from_unit",
    "unit_from_8bit",
    "window",
]


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

"""Augmentation for CT slices, applied to batches of normalised model inputs.

Small rotations, scaling and shifts (patients lie a little differently;
fields of view differ), an optional left-right flip (lesions occur in both
lungs) a mild contrast change and a raised black level (exports used different
windows: a narrower one turns more soft tissue black).
No colour, blur or elastic changes: they have no counterpart in CT. The
geometry is applied with the background held at black (air), not at the
normalised zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as functional

from models.preprocessing import Preprocessing
from training.recipe import Recipe


def raise_black_level(
    unit: torch.Tensor, jitter: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Turn the darkest non-black grey levels black, as a narrower export window would.

    Each image's lowest non-black level (above 0.05) is raised by up to `jitter`
    (half the images are left alone); pixels below the new level become black.
    """
    count = unit.shape[0]
    if jitter <= 0:
        return unit
    visible = torch.where(unit > 0.05, unit, torch.ones_like(unit))
    floor = visible.amin(dim=(1, 2, 3), keepdim=True)
    raise_by = jitter * torch.rand(count, 1, 1, 1, generator=generator)
    raise_by = raise_by * (torch.rand(count, 1, 1, 1, generator=generator) < 0.5)
    return torch.where(unit < floor + raise_by, torch.zeros_like(unit), unit)


def augment_batch(
    inputs: torch.Tensor,
    recipe: Recipe,
    preprocessing: Preprocessing,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A randomly transformed copy of an (n, 3, S, S) batch of normalised inputs."""
    count = inputs.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, generator=generator)

    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    unit = inputs * std + mean
    angle = uniform(-1.0, 1.0) * math.radians(recipe.rotate_degrees)
    scale = 1.0 / uniform(1.0 - recipe.scale_range, 1.0 + recipe.scale_range)
    flip = torch.ones(count)
    if recipe.flip:
        flip = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0] = torch.cos(angle) * scale * flip
    theta[:, 0, 1] = -torch.sin(angle) * scale
    theta[:, 1, 0] = torch.sin(angle) * scale * flip
    theta[:, 1, 1] = torch.cos(angle) * scale
    theta[:, 0, 2] = uniform(-recipe.translate, recipe.translate)
    theta[:, 1, 2] = uniform(-recipe.translate, recipe.translate)
    grid = functional.affine_grid(theta, list(unit.shape), align_corners=False)
    # Zero padding in [0, 1] space is black, the value of air in every window.
    moved = functional.grid_sample(unit, grid, align_corners=False, padding_mode="zeros")
    moved = raise_black_level(moved, recipe.threshold_jitter, generator)
    # Contrast only, no additive brightness: black (air, lung) stays black, as
    # in every export.
    contrast = uniform(1.0 - recipe.intensity, 1.0 + recipe.intensity).view(count, 1, 1, 1)
    moved = (moved * contrast).clamp(0.0, 1.0)
    return ((moved - mean) / std).contiguous()

"""The rule that turns slice probabilities into one series result.

A lesion shows on a few slices of a series, so averaging every slice would
drown it in normal lung. The rule instead keeps, as evidence, the
`ceil(fraction * n)` slices (at least one) with the lowest probability of the
negative (normal) class; the series probabilities are the mean of the
evidence slices' probabilities and the series class is their most probable
class. With no negative class in the manifest every slice is evidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from models.manifest import Aggregation


@dataclass(frozen=True)
class SeriesResult:
    classes: tuple[str, ...]
    label: str
    probabilities: tuple[float, ...]
    # Row indices into the slice probabilities, most suspicious first.
    evidence: tuple[int, ...]


def aggregate(
    slice_probabilities: np.ndarray, classes: tuple[str, ...], rule: Aggregation
) -> SeriesResult:
    """Apply the documented rule to an (n, classes) probability matrix."""
    if slice_probabilities.ndim != 2 or slice_probabilities.shape[1] != len(classes):
        raise ValueError(
            f"expected (n, {len(classes)}) probabilities, got {slice_probabilities.shape}"
        )
    count = slice_probabilities.shape[0]
    if count == 0:
        raise ValueError("a series result needs at least one slice")
    if rule.negative_class is None:
        order = np.arange(count)
        keep = count
    else:
        negative = slice_probabilities[:, classes.index(rule.negative_class)]
        # Stable sort: ties keep slice order, so the result is reproducible.
        order = np.argsort(negative, kind="stable")
        keep = max(1, math.ceil(rule.fraction * count))
    evidence = order[:keep]
    mean = slice_probabilities[evidence].mean(axis=0)
    return SeriesResult(
        classes=classes,
        label=classes[int(np.argmax(mean))],
        probabilities=tuple(float(value) for value in mean),
        evidence=tuple(int(index) for index in evidence),
    )

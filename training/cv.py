"""`pacs-train cv`: k-fold cross-validation, image-level or grouped.

`image` splits slices at random (stratified by class), the protocol behind
published ~99% accuracies on IQ-OTH/NCCD: near-identical neighbouring slices
of one patient land in both training and test folds. `grouped` keeps every
group (patient, series, cluster of near-duplicates) in one fold. Each fold
trains for the recipe's full length with no selection on the held-out fold,
and is scored on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from models.predictor import resolve_device
from models.preprocessing import Preprocessing
from training.datasets import SliceSet
from training.fit import evaluate, on_device, seed_everything, train_network
from training.init import initialise
from training.metrics import summary_line
from training.recipe import Recipe

Protocol = Literal["image", "grouped"]
PROTOCOLS: tuple[Protocol, ...] = ("image", "grouped")
SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1")


@dataclass(frozen=True)
class CvResult:
    protocol: Protocol
    folds: list[dict[str, Any]]

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean and standard deviation over folds of each summary metric."""
        return {
            key: {
                "mean": float(np.mean([fold[key] for fold in self.folds])),
                "std": float(np.std([fold[key] for fold in self.folds])),
            }
            for key in SUMMARY_KEYS
        }


def fold_indices(
    data: SliceSet, protocol: Protocol, folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    labels = data.labels.numpy()
    placeholder = np.zeros(len(data))
    if protocol == "image":
        image = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        return list(image.split(placeholder, labels))
    if protocol == "grouped":
        grouped = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        return list(grouped.split(placeholder, labels, data.groups()))
    raise ValueError(f"protocol must be image or grouped, got {protocol!r}")


def cross_validate(
    data: SliceSet,
    protocol: Protocol,
    folds: int,
    recipe: Recipe,
    init: str,
    preprocessing: Preprocessing,
    device_name: str = "auto",
    deterministic: bool = False,
) -> CvResult:
    device = torch.device(resolve_device(device_name))
    results = []
    for number, (train_index, test_index) in enumerate(
        fold_indices(data, protocol, folds, recipe.seed), start=1
    ):
        started = time.monotonic()
        generator = seed_everything(recipe.seed + number, deterministic)
        network, initialisation = initialise(init, len(data.classes), recipe.dropout)
        network = on_device(network, device)
        train, test = data.subset(train_index.tolist()), data.subset(test_index.tolist())
        trained = train_network(
            network, initialisation, train, None, recipe, preprocessing, device, generator
        )
        metrics = evaluate(trained.network, test, device)
        metrics["fold"] = number
        metrics["seconds"] = time.monotonic() - started
        shared = len(set(train.groups()) & set(test.groups()))
        metrics["groups_in_both"] = shared
        print(
            f"{protocol} fold {number}/{folds}: {summary_line(metrics)}; "
            f"{shared} groups on both sides; {metrics['seconds']:.0f}s"
        )
        results.append(metrics)
    return CvResult(protocol, results)


def markdown_table(results: list[CvResult]) -> str:
    lines = [
        "| protocol | folds | accuracy | balanced accuracy | macro-F1 |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        cells = [
            f"{values['mean']:.3f} ± {values['std']:.3f}" for values in result.summary().values()
        ]
        lines.append(f"| {result.protocol} | {len(result.folds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""`pacs-train evaluate`: an artifact's metrics on a labelled folder, as the node runs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

import models
from models.artifact import Artifact, load_artifact
from models.predictor import SlicePredictor
from training.datasets import SliceSet
from training.layouts import Layout, load_all, scan
from training.metrics import classification_metrics
from training.plots import plot_confusion, plot_roc

BUNDLED_MODEL = Path(models.__file__).resolve().parent / "bundled" / "lung-ct-mobilenetv2"


def predict_with_artifact(
    artifact: Artifact, data: SliceSet, device: str = "auto", batch_size: int = 64
) -> np.ndarray:
    """Slice probabilities through the node's own predictor."""
    predictor = SlicePredictor(artifact, device)
    parts = [
        predictor.predict(data.inputs[start : start + batch_size])
        for start in range(0, len(data), batch_size)
    ]
    return np.concatenate(parts)


def evaluate_artifact(
    model: Path,
    data: Path,
    *,
    layout: Layout = "auto",
    split: str | None = None,
    device: str = "auto",
    json_path: Path | None = None,
    plots: Path | None = None,
) -> dict[str, Any]:
    """Load, read the data with the artifact's preprocessing and classes, score."""
    artifact = load_artifact(model)
    manifest = artifact.manifest
    print(f"model {manifest.model_id} ({manifest.content_hash[:19]}) from {model}")
    folder = scan(data, layout, classes=manifest.classes)
    slices = load_all(folder, manifest.preprocessing, split)
    probabilities = predict_with_artifact(artifact, slices, device)
    truth = slices.labels.numpy()
    metrics = classification_metrics(truth, probabilities, manifest.classes)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(metrics, indent=2) + "\n")
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
        plot_confusion(metrics, plots / "confusion_matrix.png")
        plot_roc(truth, probabilities, manifest.classes, plots / "roc.png")
    return metrics


def tensor_batches(inputs: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [inputs[start : start + size] for start in range(0, inputs.shape[0], size)]

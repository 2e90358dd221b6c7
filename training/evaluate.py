"""`pacs-train evaluate`: an artifact's metrics on a labelled folder, as the node runs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

import models
from models.aggregation import aggregate
from models.artifact import Artifact, load_artifact
from models.manifest import load_manifest
from models.predictor import SlicePredictor
from models.preprocessing import input_from_dataset
from training.datasets import DataError, SliceSet
from training.layouts import Layout, load_all, scan
from training.metrics import classification_metrics
from training.plots import plot_confusion, plot_roc

BUNDLED_MODEL = Path(models.__file__).resolve().parent / "bundled" / "lung-ct-mobilenetv2"


def predict_with_artifact(
    artifact: Artifact, data: SliceSet, device: str = "auto", batch_size: int = 64
) -> np.ndarray:
    """Slice probabilities through the node's own predictor."""
    predictor = SlicePredictor(artifact.folder, device)
    parts = [
        predictor.predict(data.inputs[start : start + batch_size].numpy())
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


def predict_series(model: Path, folder: Path, device: str = "auto") -> dict[str, Any]:
    """Per-slice probabilities and the series result for one DICOM series, as the node
    computes them: the node's preprocessing, predictor and aggregation rule."""
    manifest = load_manifest(model)
    paths = sorted(path for path in folder.rglob("*") if path.is_file())
    datasets = []
    for path in paths:
        try:
            datasets.append((path, dcmread(path)))
        except InvalidDicomError:
            continue
    if not datasets:
        raise DataError(f"{folder} holds no DICOM files")
    series = {str(dataset.SeriesInstanceUID) for _, dataset in datasets}
    if len(series) != 1:
        raise DataError(f"{folder} holds {len(series)} series; give one series folder")
    # Slice order along the patient axis, as the node orders a series.
    datasets.sort(key=lambda item: int(item[1].get("InstanceNumber", 0)))
    inputs = np.stack([input_from_dataset(ds, manifest.preprocessing) for _, ds in datasets])
    probabilities = SlicePredictor(model, device).predict(inputs)
    result = aggregate(probabilities, manifest.classes, manifest.aggregation)
    return {
        "model": manifest.model_id,
        "classes": list(manifest.classes),
        "slices": [
            {
                "file": path.name,
                "instance": int(ds.get("InstanceNumber", 0)),
                "probabilities": [round(float(p), 4) for p in row],
            }
            for (path, ds), row in zip(datasets, probabilities, strict=True)
        ],
        "series": {
            "label": result.label,
            "probabilities": [round(p, 4) for p in result.probabilities],
            "evidence": [datasets[index][0].name for index in result.evidence],
        },
    }

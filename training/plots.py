"""PNG figures: confusion matrix, one-vs-rest ROC curves, training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_curve


def plot_confusion(metrics: dict[str, Any], path: Path) -> Path:
    classes = metrics["classes"]
    matrix = np.asarray(metrics["confusion_matrix"])
    figure, axes = plt.subplots(figsize=(4.5, 4))
    axes.imshow(matrix, cmap="Blues")
    for (row, column), value in np.ndenumerate(matrix):
        colour = "white" if value > matrix.max() / 2 else "black"
        axes.text(column, row, str(value), ha="center", va="center", color=colour)
    axes.set_xticks(range(len(classes)), classes)
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("truth")
    axes.set_title(f"n={metrics['n']}  balanced accuracy {metrics['balanced_accuracy']:.3f}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_roc(
    truth: np.ndarray, probabilities: np.ndarray, classes: Sequence[str], path: Path
) -> Path:
    figure, axes = plt.subplots(figsize=(4.5, 4))
    for index, name in enumerate(classes):
        positives = truth == index
        if 0 < positives.sum() < len(truth):
            false_positive, true_positive, _ = roc_curve(positives, probabilities[:, index])
            axes.plot(false_positive, true_positive, label=name)
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title("ROC, one class vs rest")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_history(history: Sequence[dict[str, Any]], path: Path) -> Path:
    epochs = [row["epoch"] for row in history]
    figure, (losses, scores) = plt.subplots(1, 2, figsize=(9, 3.5))
    losses.plot(epochs, [row["train_loss"] for row in history], label="train")
    losses.plot(epochs, [row["val_loss"] for row in history], label="validation")
    losses.set_xlabel("epoch")
    losses.set_ylabel("cross-entropy")
    losses.legend()
    for key, label in (
        ("val_accuracy", "accuracy"),
        ("val_balanced_accuracy", "balanced accuracy"),
        ("val_macro_f1", "macro-F1"),
    ):
        scores.plot(epochs, [row[key] for row in history], label=label)
    scores.set_xlabel("epoch")
    scores.set_ylim(0, 1)
    scores.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path

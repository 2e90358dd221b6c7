"""Classification metrics with the exact keys `pacs-train evaluate` writes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score


def classification_metrics(
    truth: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """n, accuracy, balanced_accuracy, macro_f1, per_class, confusion_matrix, classes, roc_auc.

    Balanced accuracy and macro-F1 average over the classes present in
    `truth` (a class with no support has no recall to average). `roc_auc` is
    one-vs-rest per class and their mean as `macro`; a class whose AUC is
    undefined (no positives or no negatives) gets null.
    """
    count = len(classes)
    if probabilities.shape != (len(truth), count):
        raise ValueError(
            f"expected ({len(truth)}, {count}) probabilities, got {probabilities.shape}"
        )
    predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(truth, predicted, labels=list(range(count)))
    support = matrix.sum(axis=1)
    predicted_count = matrix.sum(axis=0)
    hits = np.diag(matrix)
    per_class: dict[str, dict[str, float | int]] = {}
    f1_present, recall_present = [], []
    for index, name in enumerate(classes):
        precision = hits[index] / predicted_count[index] if predicted_count[index] else 0.0
        recall = hits[index] / support[index] if support[index] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": int(support[index]),
        }
        if support[index]:
            f1_present.append(f1)
            recall_present.append(recall)
    roc: dict[str, float | None] = {}
    for index, name in enumerate(classes):
        positives = truth == index
        roc[name] = (
            float(roc_auc_score(positives, probabilities[:, index]))
            if 0 < positives.sum() < len(truth)
            else None
        )
    defined = [value for value in roc.values() if value is not None]
    roc["macro"] = float(np.mean(defined)) if defined else None
    return {
        "n": len(truth),
        "accuracy": float(hits.sum() / len(truth)) if len(truth) else 0.0,
        "balanced_accuracy": float(np.mean(recall_present)) if recall_present else 0.0,
        "macro_f1": float(np.mean(f1_present)) if f1_present else 0.0,
        "per_class": per_class,
        "confusion_matrix": matrix.astype(int).tolist(),
        "classes": list(classes),
        "roc_auc": roc,
    }


def summary_line(metrics: dict[str, Any]) -> str:
    return (
        f"n={metrics['n']} accuracy={metrics['accuracy']:.4f} "
        f"balanced_accuracy={metrics['balanced_accuracy']:.4f} macro_f1={metrics['macro_f1']:.4f}"
    )


def format_report(metrics: dict[str, Any]) -> str:
    """A readable table: per-class scores, the confusion matrix and ROC AUC."""
    classes = metrics["classes"]
    width = max(len(name) for name in (*classes, "class"))
    lines = [summary_line(metrics), ""]
    lines.append(f"{'class'.ljust(width)} precision    recall        f1   support    roc_auc")
    for name in classes:
        row = metrics["per_class"][name]
        auc = metrics["roc_auc"][name]
        lines.append(
            f"{name.ljust(width)} {row['precision']:9.4f} {row['recall']:9.4f} {row['f1']:9.4f}"
            f" {row['support']:9d} {'-' if auc is None else f'{auc:10.4f}'}"
        )
    lines += ["", "confusion matrix (rows = truth, columns = prediction)"]
    lines.append(" " * width + "".join(f"{name[:10]:>11}" for name in classes))
    for name, row in zip(classes, metrics["confusion_matrix"], strict=True):
        lines.append(name.ljust(width) + "".join(f"{value:>11d}" for value in row))
    return "\n".join(lines)

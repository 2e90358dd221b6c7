"""The model card written next to every exported artifact."""

from __future__ import annotations

from typing import Any

from models.preprocessing import Preprocessing
from training.export import EVIDENCE_FRACTION, NEGATIVE_CLASS


def _metrics_table(metrics: dict[str, Any]) -> str:
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name in metrics["classes"]:
        row = metrics["per_class"][name]
        lines.append(
            f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} "
            f"| {row['support']} |"
        )
    return "\n".join(lines)


def render_card(
    *,
    name: str,
    version: str,
    classes: tuple[str, ...],
    preprocessing: Preprocessing,
    details: dict[str, Any],
) -> str:
    """Markdown: intended use, data, initialisation, preprocessing, metrics, limits."""
    metrics = details["validation_metrics"]
    training = details["training_data"]
    init = details["initialisation"]
    counts = "\n".join(
        f"| {split} | "
        + " | ".join(str(training["counts"][split].get(c, 0)) for c in classes)
        + f" | {sum(training['counts'][split].values())} |"
        for split in training["counts"]
    )
    recipe_lines = "\n".join(f"| `{key}` | `{value}` |" for key, value in details["recipe"].items())
    return f"""# Model card: {name} {version}

**Research use only. Not a medical device.** The model has not been clinically
validated and must not be used to diagnose, treat or triage patients.

## What it does
Classifies single axial lung CT slices as {", ".join(classes)} with a
MobileNetV2 (torchvision architecture, new {len(classes)}-class head). The node
turns slice probabilities into a series result: the
`ceil({EVIDENCE_FRACTION} * n)` slices least likely to be `{NEGATIVE_CLASS}` are
the evidence and the series probabilities are their mean (`models/aggregation.py`).

## Training data
{training["description"]}

Cite: {training["citation"]}

| split | {" | ".join(classes)} | total |
|---|{"---|" * len(classes)}---|
{counts}

The split is grouped: near-identical slices (a stand-in for patients) never
sit in both training and validation. Validation was used only to pick the
epoch (early stopping on macro-F1); nothing else from outside the training
split shaped the model.

## Initialisation
{init["description"]}

## Preprocessing (shared with the node)
- DICOM input: modality LUT to HU, then the window centre
  {preprocessing.window_center:g} HU / width {preprocessing.window_width:g} HU
  (DICOM linear VOI function), scaled to [0, 1].
- 8-bit exports (the training images) enter at the [0, 1] step (value / 255).
- Resize to {preprocessing.input_size} x {preprocessing.input_size}, three equal
  channels, ImageNet mean/std normalisation.

How the window was chosen: {details["window"]["method"]}

## Validation metrics (grouped validation split, n = {metrics["n"]})
- accuracy {metrics["accuracy"]:.3f}
- balanced accuracy {metrics["balanced_accuracy"]:.3f}
- macro-F1 {metrics["macro_f1"]:.3f}
- ROC AUC (one vs rest, macro) {metrics["roc_auc"]["macro"]:.3f}

{_metrics_table(metrics)}

Confusion matrix (rows = truth, columns = prediction, order {", ".join(classes)}):
`{metrics["confusion_matrix"]}`

These numbers come from a small validation split (few patients per class; the
benign class has {metrics["per_class"].get("benign", {}).get("support", "n/a")} slices) and
carry wide uncertainty. A held-out grouped test partition is kept outside this
repository.

## Recipe
| key | value |
|---|---|
{recipe_lines}

Fit time: {details["fit"]["minutes"]:.1f} minutes on {details["fit"]["device"]}
(best epoch {details["fit"]["best_epoch"]} of {details["fit"]["epochs_run"]}).

## Limits
- Trained on 8-bit JPEG exports from one hospital's scanner (Siemens SOMATOM),
  windowed by the dataset's authors; real DICOM input is windowed to imitate
  them, which is an approximation (see the window note above).
- Slice-level labels come from the case label: a "malignant" case's slices
  do not all show the tumour.
- Three classes only; any other finding is outside its scope.
- Published accuracies near 99% on this dataset come from image-level splits
  that leak near-duplicate slices; expect the grouped numbers above, not those.
"""

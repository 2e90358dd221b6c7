"""Write a trained network as a model artifact (`models.artifact`) with a model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from models.artifact import Aggregation, Manifest, save_artifact
from models.preprocessing import Preprocessing

ARTIFACT_NAME = "lung-ct-mobilenetv2"
CARD_NAME = "MODEL_CARD.md"
# What the series rule calls "no finding": the class whose probability is
# lowest on the slices kept as evidence.
NEGATIVE_CLASS = "normal"
EVIDENCE_FRACTION = 0.1
IQ_OTHNCCD_CITATION = (
    'Alyasriy, H., Al-Huseiny, M. "The IQ-OTH/NCCD lung cancer dataset", '
    "Mendeley Data, 2020/2021, doi:10.17632/bhmdr45bh2"
)
# SNOMED CT codes for the three classes (also the report module's defaults).
CLASS_CODES = {
    "normal": {"scheme": "SCT", "value": "17621005", "meaning": "Normal"},
    "benign": {"scheme": "SCT", "value": "3898006", "meaning": "Neoplasm, benign"},
    "malignant": {"scheme": "SCT", "value": "363358000", "meaning": "Malignant tumor of lung"},
}


def aggregation_for(classes: tuple[str, ...]) -> Aggregation:
    negative = NEGATIVE_CLASS if NEGATIVE_CLASS in classes else None
    return Aggregation(negative_class=negative, fraction=EVIDENCE_FRACTION)


def export_artifact(
    folder: Path,
    network: nn.Module,
    *,
    classes: tuple[str, ...],
    preprocessing: Preprocessing,
    version: str,
    details: dict[str, Any],
    card: str,
    name: str = ARTIFACT_NAME,
) -> Manifest:
    """Weights + manifest through `models.artifact.save_artifact`, then the model card."""
    document = dict(details)
    codes = {label: CLASS_CODES[label] for label in classes if label in CLASS_CODES}
    if len(codes) == len(classes):
        document.setdefault("class_codes", codes)
    manifest = save_artifact(
        folder,
        network,
        name=name,
        version=version,
        classes=list(classes),
        preprocessing=preprocessing,
        aggregation=aggregation_for(classes),
        details=document,
    )
    (folder / CARD_NAME).write_text(card)
    return manifest

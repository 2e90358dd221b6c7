"""Model artifacts: a folder with `weights.safetensors` and `manifest.json`.

The manifest says everything the node needs to use the weights (classes,
preprocessing, how slice results become a series result) and everything a
reader needs to trust them (version, training data, recipe, metrics). Its
`content_hash` covers the weights and every other manifest key, so that a
changed file or a hand-edited manifest is refused at load time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import nn

from models.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    Aggregation,
    ArtifactError,
    Manifest,
    Preprocessing,
    content_hash,
    manifest_from_document,
    read_verified,
)
from models.network import build_mobilenet_v2

# Re-exported: callers that save or load artifacts find the manifest types here too.
__all__ = [
    "Aggregation",
    "Artifact",
    "ArtifactError",
    "Manifest",
    "load_artifact",
    "save_artifact",
]


@dataclass(frozen=True)
class Artifact:
    manifest: Manifest
    state_dict: dict[str, torch.Tensor]
    folder: Path

    def build_network(self) -> nn.Module:
        """A network in eval mode with the artifact's weights loaded."""
        network = build_mobilenet_v2(len(self.manifest.classes))
        network.load_state_dict(self.state_dict)
        return network.eval()


def save_artifact(
    folder: Path,
    network: nn.Module,
    *,
    name: str,
    version: str,
    classes: list[str],
    preprocessing: Preprocessing,
    aggregation: Aggregation,
    details: dict[str, Any] | None = None,
) -> Manifest:
    """Write weights and manifest into `folder` (created) and return the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    weights_path = folder / WEIGHTS_NAME
    state = {key: value.detach().cpu().contiguous() for key, value in network.state_dict().items()}
    save_file(state, str(weights_path))
    document: dict[str, Any] = dict(details or {})
    document.update(
        {
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": version,
            "architecture": "mobilenet_v2",
            "classes": list(classes),
            "preprocessing": preprocessing.to_dict(),
            "aggregation": aggregation.to_dict(),
            "weights_file": WEIGHTS_NAME,
        }
    )
    document["content_hash"] = content_hash(document, weights_path.read_bytes())
    (folder / MANIFEST_NAME).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return manifest_from_document(document)


def load_artifact(folder: Path) -> Artifact:
    """Load and verify an artifact; `ArtifactError` names what is wrong."""
    manifest, weights = read_verified(folder)
    weights_path = folder / manifest.weights_file
    try:
        state_dict = load(weights)
    except SafetensorError as error:
        raise ArtifactError(f"model weights {weights_path} cannot be read: {error}") from error
    artifact = Artifact(manifest=manifest, state_dict=state_dict, folder=folder)
    try:
        artifact.build_network()
    except RuntimeError as error:
        raise ArtifactError(
            f"model weights {weights_path} do not fit the network: {error}"
        ) from error
    return artifact

"""Model artifacts: a folder with `weights.safetensors` and `manifest.json`.

The manifest says everything the node needs to use the weights (classes,
preprocessing, how slice results become a series result) and everything a
reader needs to trust them (version, training data, recipe, metrics). Its
`content_hash` covers the weights and every other manifest key, so that a
changed file or a hand-edited manifest is refused at load time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models.network import build_mobilenet_v2
from models.preprocessing import Preprocessing

MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.safetensors"
FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "format_version",
    "name",
    "version",
    "architecture",
    "classes",
    "preprocessing",
    "aggregation",
    "weights_file",
    "content_hash",
)
SUPPORTED_ARCHITECTURES = ("mobilenet_v2",)


class ArtifactError(ValueError):
    """A model artifact is missing, malformed or does not match its hash."""


@dataclass(frozen=True)
class Aggregation:
    """How slice probabilities become one series result (see README).

    The `fraction` of slices that look least like `negative_class` are the
    evidence; the series probabilities are the mean of their slice
    probabilities and the series class is the most probable class of that
    mean. Without a negative class, every slice is evidence.
    """

    negative_class: str | None
    fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"aggregation.fraction must be in (0, 1], got {self.fraction}")

    def to_dict(self) -> dict[str, Any]:
        return {"negative_class": self.negative_class, "fraction": self.fraction}


@dataclass(frozen=True)
class Manifest:
    """The validated content of `manifest.json`."""

    name: str
    version: str
    architecture: str
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    aggregation: Aggregation
    content_hash: str
    # Everything else in the manifest: training data, recipe, metrics, codes.
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        """Name and version, as written into reports and logs."""
        return f"{self.name} {self.version}"


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
    return _manifest_from_document(document)


def content_hash(document: dict[str, Any], weights: bytes) -> str:
    """sha256 over the weights and the canonical JSON of the other manifest keys."""
    digest = hashlib.sha256(weights)
    rest = {key: value for key, value in document.items() if key != "content_hash"}
    digest.update(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())
    return "sha256:" + digest.hexdigest()


def load_artifact(folder: Path) -> Artifact:
    """Load and verify an artifact; `ArtifactError` names what is wrong."""
    manifest_path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ArtifactError(f"model artifact folder {folder} does not exist")
    if not manifest_path.is_file():
        raise ArtifactError(f"model artifact {folder} has no {MANIFEST_NAME}")
    try:
        document = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{manifest_path} is not valid JSON: {error}") from error
    if not isinstance(document, dict):
        raise ArtifactError(f"{manifest_path} must hold a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in document]
    if missing:
        raise ArtifactError(f"{manifest_path} lacks required key(s): {', '.join(missing)}")
    if document["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path} has format_version {document['format_version']!r}; "
            f"this node reads {FORMAT_VERSION}"
        )
    weights_path = folder / str(document["weights_file"])
    if weights_path.parent != folder or not weights_path.is_file():
        raise ArtifactError(f"model weights {weights_path} are missing")
    weights = weights_path.read_bytes()
    expected = content_hash(document, weights)
    if document["content_hash"] != expected:
        raise ArtifactError(
            f"model artifact {folder} fails its hash check: manifest says "
            f"{document['content_hash']}, content is {expected}"
        )
    manifest = _manifest_from_document(document)
    try:
        state_dict = load_file(str(weights_path))
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


def _manifest_from_document(document: dict[str, Any]) -> Manifest:
    try:
        classes = tuple(str(name) for name in document["classes"])
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be at least 2 distinct names, got {list(classes)}")
        if document["architecture"] not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {document['architecture']!r} is not supported")
        aggregation_values = document["aggregation"]
        aggregation = Aggregation(
            negative_class=aggregation_values.get("negative_class"),
            fraction=float(aggregation_values.get("fraction", 0.1)),
        )
        if aggregation.negative_class is not None and aggregation.negative_class not in classes:
            raise ValueError(
                f"aggregation.negative_class {aggregation.negative_class!r} is not a class"
            )
        preprocessing = Preprocessing.from_dict(document["preprocessing"])
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"invalid manifest: {error}") from error
    details = {key: value for key, value in document.items() if key not in REQUIRED_KEYS}
    return Manifest(
        name=str(document["name"]),
        version=str(document["version"]),
        architecture=str(document["architecture"]),
        classes=classes,
        preprocessing=preprocessing,
        aggregation=aggregation,
        content_hash=str(document["content_hash"]),
        details=details,
    )

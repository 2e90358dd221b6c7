"""The manifest of a model artifact: what the weights are and how to use them.

Plain data and validation, no torch: the node's receive and send processes,
and the report builder, read manifests without loading the network.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """The parameters of the pipeline, as recorded in a model's manifest."""

    window_center: float
    window_width: float
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.window_width < 1:
            raise ValueError(f"window_width must be >= 1, got {self.window_width}")
        if self.input_size < 32:
            raise ValueError(f"input_size must be >= 32, got {self.input_size}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "window_center": self.window_center,
            "window_width": self.window_width,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        return cls(
            window_center=float(values["window_center"]),
            window_width=float(values["window_width"]),
            input_size=int(values["input_size"]),
            mean=_triple(values["mean"], "mean"),
            std=_triple(values["std"], "std"),
        )


def _triple(values: Any, name: str) -> tuple[float, float, float]:
    if len(values) != 3:
        raise ValueError(f"preprocessing.{name} must have 3 values, got {values!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


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
    # The weights' file name, in the artifact's folder.
    weights_file: str
    # Everything else in the manifest: training data, recipe, metrics, codes.
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        """Name and version, as written into reports and logs."""
        return f"{self.name} {self.version}"


def content_hash(document: dict[str, Any], weights: bytes) -> str:
    """sha256 over the weights and the canonical JSON of the other manifest keys."""
    digest = hashlib.sha256(weights)
    rest = {key: value for key, value in document.items() if key != "content_hash"}
    digest.update(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())
    return "sha256:" + digest.hexdigest()


def manifest_from_document(document: dict[str, Any]) -> Manifest:
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
        weights_file=str(document["weights_file"]),
        details=details,
    )


def load_manifest(folder: Path) -> Manifest:
    """The manifest of the artifact in `folder`, checked against the weights' hash.

    Everything `models.artifact.load_artifact` checks but whether the weights fit
    the network, which needs torch; `ArtifactError` names what is wrong.
    """
    return read_verified(folder)[0]


def read_verified(folder: Path) -> tuple[Manifest, bytes]:
    """`load_manifest`, with the weights' bytes it hashed: loading those, not the file
    again, the network runs the weights the manifest vouches for even if the file is
    replaced meanwhile."""
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
    return manifest_from_document(document), weights

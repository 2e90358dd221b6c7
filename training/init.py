"""Where the network's starting weights come from: `--init imagenet|random|PATH`.

`imagenet` goes through torchvision's own mechanism (`MobileNet_V2_Weights.
IMAGENET1K_V2`, cached under `$TORCH_HOME/hub/checkpoints`), so a connected
machine downloads the file once and an offline machine uses a copy placed
there by hand. `PATH` is a local state dict (safetensors or a `torch.save`
file read with `weights_only=True`, never an arbitrary pickle). Either way the
1000-class ImageNet head is dropped and a new head for our classes is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.hub import get_dir

from models.network import build_mobilenet_v2

IMAGENET_WEIGHTS = "IMAGENET1K_V2"


class InitError(RuntimeError):
    """The requested initial weights cannot be obtained or do not fit."""


@dataclass(frozen=True)
class Initialisation:
    """What the network started from, as recorded in the manifest."""

    kind: str  # "imagenet", "random" or "file"
    source: str
    pretrained: bool

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "source": self.source, "pretrained": self.pretrained}


def imagenet_state_dict() -> tuple[dict[str, torch.Tensor], str]:
    """torchvision's IMAGENET1K_V2 weights, downloading into its cache when online."""
    from torchvision.models import MobileNet_V2_Weights

    weights = MobileNet_V2_Weights.IMAGENET1K_V2
    file_name = Path(weights.url).name
    expected = Path(get_dir()) / "checkpoints" / file_name
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        raise InitError(
            f"cannot obtain torchvision's MobileNet_V2_Weights.{IMAGENET_WEIGHTS} ({error}). "
            f"Offline, download {weights.url} on a connected machine and copy it to "
            f"{expected} (the torchvision cache; set TORCH_HOME to move it), or pass "
            f"--init PATH with a local state dict, or --init random."
        ) from error
    return state, f"torchvision MobileNet_V2_Weights.{IMAGENET_WEIGHTS} ({file_name})"


def file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a weights-only torch file."""
    if not path.is_file():
        raise InitError(f"--init {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the loaders raise many types for a bad file
        raise InitError(f"--init {path}: cannot load a state dict: {error}") from error
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(
        isinstance(value, torch.Tensor) for value in loaded.values()
    ):
        raise InitError(f"--init {path}: the file does not hold a state dict of tensors")
    return dict(loaded)


def load_backbone(network: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every weight except the classifier; the head stays freshly initialised."""
    body = {key: value for key, value in state.items() if not key.startswith("classifier.")}
    missing, unexpected = network.load_state_dict(body, strict=False)
    missing_body = [key for key in missing if not key.startswith("classifier.")]
    if missing_body or unexpected:
        raise InitError(
            f"{source} does not fit MobileNetV2: missing {missing_body[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def initialise(spec: str, num_classes: int, dropout: float) -> tuple[nn.Module, Initialisation]:
    """A MobileNetV2 with a new head for `num_classes`, started as `spec` says."""
    network = build_mobilenet_v2(num_classes, dropout)
    if spec == "random":
        return network, Initialisation("random", "torchvision default initialisation", False)
    if spec == "imagenet":
        state, source = imagenet_state_dict()
        load_backbone(network, state, source)
        return network, Initialisation("imagenet", source, True)
    path = Path(spec)
    load_backbone(network, file_state_dict(path), str(path))
    return network, Initialisation("file", path.name, True)

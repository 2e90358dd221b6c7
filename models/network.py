"""The MobileNetV2 classifier: torchvision's network with a new head."""

from __future__ import annotations

from torch import nn
from torchvision.models import mobilenet_v2

# The width of MobileNetV2's last feature layer (the input of its classifier).
FEATURE_WIDTH = 1280


def build_mobilenet_v2(num_classes: int, dropout: float = 0.2) -> nn.Module:
    """MobileNetV2 whose last fully connected layer is a new `Linear(1280, n)`.

    The network returns logits; softmax is applied at inference time
    (`models.predictor`), never inside the training loss.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    network: nn.Module = mobilenet_v2(weights=None)
    replace_head(network, num_classes, dropout)
    return network


def replace_head(network: nn.Module, num_classes: int, dropout: float = 0.2) -> None:
    """Replace the classifier of a torchvision MobileNetV2 with a fresh one."""
    network.classifier = nn.Sequential(
        nn.Dropout(p=dropout),
        nn.Linear(FEATURE_WIDTH, num_classes),
    )

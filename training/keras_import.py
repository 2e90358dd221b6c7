"""Convert a Keras MobileNetV2 (HDF5 `.h5`) into a torchvision MobileNetV2 state dict.

Keras' `MobileNetV2` and torchvision's share the architecture layer for layer
(width 1.0), so a Keras checkpoint is a usable `--init PATH` once converted:
kernels are transposed to PyTorch's layout, batch-norm variances absorb the
different epsilon (Keras 1e-3, PyTorch 1e-5), and the first convolution absorbs
the different input scaling (Keras feeds `2u - 1`, the shared preprocessing
feeds ImageNet-normalised values). Keras pads stride-2 convolutions
asymmetrically, so activations differ by a half-pixel shift: fine for an
initialisation, not an exact port. Needs `h5py` (only for this conversion).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from models.network import build_mobilenet_v2
from models.preprocessing import IMAGENET_MEAN, IMAGENET_STD

KERAS_EPSILON = 1e-3
TORCH_EPSILON = 1e-5
# torchvision `features[k]` for k = 2..17 is Keras `block_{k-1}`.
LAST_BLOCK = 16


def read_keras_weights(path: Path) -> dict[tuple[str, str], np.ndarray]:
    """Every weight in the file as {(layer, weight): array}, for Keras 2 and 3 layouts."""
    h5py: Any = importlib.import_module("h5py")
    weights: dict[tuple[str, str], np.ndarray] = {}
    with h5py.File(path, "r") as handle:
        root = handle.get("model_weights", handle)

        def visit(name: str, item: Any) -> None:
            if isinstance(item, h5py.Dataset):
                parts = name.split("/")
                weights[(parts[-2], parts[-1].split(":")[0])] = np.asarray(item)

        root.visititems(visit)
    return weights


def _layer_map() -> list[tuple[str, str, str]]:
    """(torch prefix, Keras layer, kind) for every conv and batch-norm layer."""
    layers = [("features.0.0", "Conv1", "conv"), ("features.0.1", "bn_Conv1", "bn")]
    layers += [
        ("features.1.conv.0.0", "expanded_conv_depthwise", "depthwise"),
        ("features.1.conv.0.1", "expanded_conv_depthwise_BN", "bn"),
        ("features.1.conv.1", "expanded_conv_project", "conv"),
        ("features.1.conv.2", "expanded_conv_project_BN", "bn"),
    ]
    for block in range(1, LAST_BLOCK + 1):
        prefix, name = f"features.{block + 1}.conv", f"block_{block}"
        layers += [
            (f"{prefix}.0.0", f"{name}_expand", "conv"),
            (f"{prefix}.0.1", f"{name}_expand_BN", "bn"),
            (f"{prefix}.1.0", f"{name}_depthwise", "depthwise"),
            (f"{prefix}.1.1", f"{name}_depthwise_BN", "bn"),
            (f"{prefix}.2", f"{name}_project", "conv"),
            (f"{prefix}.3", f"{name}_project_BN", "bn"),
        ]
    layers += [("features.18.0", "Conv_1", "conv"), ("features.18.1", "Conv_1_bn", "bn")]
    return layers


def convert(weights: dict[tuple[str, str], np.ndarray]) -> dict[str, torch.Tensor]:
    """The torchvision state dict (backbone only; the head is always replaced)."""
    state: dict[str, torch.Tensor] = {}
    for prefix, layer, kind in _layer_map():

        def get(name: str, layer: str = layer) -> np.ndarray:
            for candidate in (name, "depthwise_kernel" if name == "kernel" else name):
                if (layer, candidate) in weights:
                    return weights[(layer, candidate)].astype(np.float32)
            raise KeyError(f"Keras weights lack {layer}/{name}: not a width-1.0 MobileNetV2")

        if kind == "conv":  # (kh, kw, in, out) -> (out, in, kh, kw)
            state[f"{prefix}.weight"] = torch.from_numpy(get("kernel").transpose(3, 2, 0, 1).copy())
        elif kind == "depthwise":  # (kh, kw, channels, 1) -> (channels, 1, kh, kw)
            state[f"{prefix}.weight"] = torch.from_numpy(get("kernel").transpose(2, 3, 0, 1).copy())
        else:
            state[f"{prefix}.weight"] = torch.from_numpy(get("gamma"))
            state[f"{prefix}.bias"] = torch.from_numpy(get("beta"))
            state[f"{prefix}.running_mean"] = torch.from_numpy(get("moving_mean"))
            variance = get("moving_variance") + KERAS_EPSILON - TORCH_EPSILON
            state[f"{prefix}.running_var"] = torch.from_numpy(variance)
            state[f"{prefix}.num_batches_tracked"] = torch.tensor(0)
    _absorb_input_scaling(state)
    return state


def _absorb_input_scaling(state: dict[str, torch.Tensor]) -> None:
    """Make conv1 on ImageNet-normalised input equal Keras' conv1 on `2u - 1`.

    `2u - 1 = 2 s x + (2 m - 1)` for x = (u - m) / s: the kernel is scaled by
    `2 s` per input channel and the constant term moves into the BN mean.
    """
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    kernel = state["features.0.0.weight"]
    offset = (kernel * (2 * mean - 1)).sum(dim=(1, 2, 3))
    state["features.0.0.weight"] = kernel * 2 * std
    state["features.0.1.running_mean"] = state["features.0.1.running_mean"] - offset


def convert_file(source: Path, target: Path) -> int:
    """Convert `source` (.h5) into `target` (.safetensors); returns the tensor count."""
    state = convert(read_keras_weights(source))
    network = build_mobilenet_v2(num_classes=2)
    missing, unexpected = network.load_state_dict(state, strict=False)
    if unexpected or any(not key.startswith("classifier.") for key in missing):
        raise ValueError(
            f"conversion incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(target))
    return len(state)

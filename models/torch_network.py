"""The network in eager fp32 PyTorch: the node's forward pass on CUDA (see `models.predictor`).

It takes the device as an argument so that the tests can run this same code on a
CPU, where the node itself uses ONNX Runtime (`models.onnx_network`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.artifact import load_artifact
from models.predictor import Network


def torch_network(folder: Path, device: str) -> Network:
    """Logits (float32, on the host) of the artifact in `folder`'s network on `device`."""
    target = torch.device(device)
    network = load_artifact(folder).build_network().to(target)

    @torch.inference_mode()
    def forward(batch: np.ndarray) -> np.ndarray:
        logits = network(torch.from_numpy(batch).to(target, non_blocking=True))
        host: np.ndarray = logits.float().cpu().numpy()
        return host

    return forward

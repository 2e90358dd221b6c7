"""The network in eager fp32 PyTorch: the node's forward pass on CUDA (see `models.predictor`).

It takes the device as an argument so that the tests can run this same code on a
CPU, where the node itself uses ONNX Runtime (`models.onnx_network`).
"""

from __future__ import annotations

import numpy as np
import torch

from models.artifact import Artifact
from models.predictor import Network


def torch_network(artifact: Artifact, device: str) -> Network:
    """Logits (float32, on the host) of `artifact`'s network on `device`."""
    target = torch.device(device)
    network = artifact.build_network().to(target)

    @torch.inference_mode()
    def forward(batch: np.ndarray) -> np.ndarray:
        logits = network(torch.from_numpy(batch).to(target, non_blocking=True))
        host: np.ndarray = logits.float().cpu().numpy()
        return host

    return forward

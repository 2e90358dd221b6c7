"""The network on a CUDA device, in eager fp32 PyTorch (see `models.predictor`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.artifact import load_artifact
from models.predictor import Network


def cuda_network(folder: Path) -> Network:
    """Logits (float32, on the host) of the artifact in `folder`'s network on CUDA."""
    device = torch.device("cuda")
    network = load_artifact(folder).build_network().to(device)

    @torch.inference_mode()
    def forward(batch: np.ndarray) -> np.ndarray:
        logits = network(torch.from_numpy(batch).to(device, non_blocking=True))
        host: np.ndarray = logits.float().cpu().numpy()
        return host

    return forward

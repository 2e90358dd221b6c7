"""Run a loaded artifact on batches of preprocessed slices."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from models.artifact import Artifact
from models.onnx_network import default_cache, onnx_network


def resolve_device(requested: str) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("inference.device is 'cuda' but no CUDA device is available")
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")
    return torch.device(requested)


class SlicePredictor:
    """Slice probabilities from a model artifact, on CPU or CUDA.

    On CUDA the network runs channels-last under fp16 autocast; the softmax is
    computed in fp32 on the logits, so both devices give the same classes.
    On a CPU it runs on ONNX Runtime, the fastest CPU path measured
    (`models.onnx_network`), with as many threads as torch is given.
    `onnx_cache` keeps the exported model between starts (default: `default_cache()`).
    """

    def __init__(
        self, artifact: Artifact, device: str = "auto", onnx_cache: Path | None = None
    ) -> None:
        self.manifest = artifact.manifest
        self.device = resolve_device(device)
        self.network: Callable[[torch.Tensor], torch.Tensor]
        if self.device.type == "cuda":
            network = artifact.build_network().to(self.device)
            self.network = network.to(memory_format=torch.channels_last)
        else:
            self.network = onnx_network(
                artifact, onnx_cache or default_cache(), threads=torch.get_num_threads()
            )

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor) -> np.ndarray:
        """(n, 3, S, S) normalised inputs -> (n, classes) probabilities (float64)."""
        size = self.manifest.preprocessing.input_size
        if batch.shape[1:] != (3, size, size):
            raise ValueError(
                f"expected a (n, 3, {size}, {size}) batch, got shape {tuple(batch.shape)}"
            )
        inputs = batch.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            inputs = inputs.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.float16):
                logits = self.network(inputs)
        else:
            logits = self.network(inputs)
        probabilities = torch.softmax(logits.float(), dim=1)
        return probabilities.cpu().numpy().astype(np.float64)

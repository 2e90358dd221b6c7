"""Run a loaded artifact on batches of preprocessed slices."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
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
        raise RuntimeError("device 'cuda' was asked for, but no CUDA device is available")
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")
    return torch.device(requested)


class SlicePredictor:
    """Slice probabilities from a model artifact, on CPU or CUDA.

    On CUDA the network runs in fp32, as on the CPU. Measured on an H200 at the
    node's batch of 16 (`tests.benchmarks.inference --device cuda`, two runs): fp32
    4533 and 4154 slices/s, fp16 autocast channels-last 3855 and 3613 (the batch is
    too small for half precision to pay for its casts), and fp32 stays closer to the
    CPU's probabilities (max difference 3.3e-3 against 8.8e-3 for fp16).
    On a CPU it runs on ONNX Runtime, the fastest CPU path measured
    (`models.onnx_network`), in `lanes` sessions that share the threads torch is
    given: `in_flight` keeps that many batches running at once. On CUDA there is
    one lane. `onnx_cache` keeps the exported model between starts (default:
    `default_cache()`).
    """

    def __init__(
        self,
        artifact: Artifact,
        device: str = "auto",
        onnx_cache: Path | None = None,
        lanes: int = 1,
    ) -> None:
        self.manifest = artifact.manifest
        self.device = resolve_device(device)
        self.network: Callable[[torch.Tensor], torch.Tensor]
        if self.device.type == "cuda":
            self.lanes = 1
            self.network = artifact.build_network().to(self.device)
        else:
            self.lanes = lanes
            threads = max(1, torch.get_num_threads() // lanes)
            self.network = onnx_network(artifact, onnx_cache or default_cache(), threads, lanes)

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor) -> np.ndarray:
        """(n, 3, S, S) normalised inputs -> (n, classes) probabilities (float64)."""
        size = self.manifest.preprocessing.input_size
        if batch.shape[1:] != (3, size, size):
            raise ValueError(
                f"expected a (n, 3, {size}, {size}) batch, got shape {tuple(batch.shape)}"
            )
        logits = self.network(batch.to(self.device, non_blocking=True))
        probabilities = torch.softmax(logits, dim=1)
        return probabilities.cpu().numpy().astype(np.float64)

    @contextmanager
    def in_flight(self) -> Iterator[InFlight]:
        """Batches put in run on the lanes, up to `lanes` at once (`InFlight`)."""
        if self.lanes == 1:
            yield InFlight(self.predict, None, 1)
            return
        with ThreadPoolExecutor(self.lanes, thread_name_prefix="forward") as pool:
            yield InFlight(self.predict, pool, self.lanes)


class InFlight:
    """Up to `lanes` batches in the network at once; probabilities in the order put.

    With one lane each batch runs on the caller's thread, as a plain `predict`.
    """

    def __init__(
        self,
        predict: Callable[[torch.Tensor], np.ndarray],
        pool: ThreadPoolExecutor | None,
        lanes: int,
    ) -> None:
        self._predict = predict
        self._pool = pool
        self._lanes = lanes
        self._running: deque[Future[np.ndarray]] = deque()

    def put(self, batch: torch.Tensor) -> list[np.ndarray]:
        """Start `batch`; the probabilities of the batches that finished to make room
        for the next one, oldest first (with one lane: this batch's)."""
        if self._pool is None:
            return [self._predict(batch)]
        self._running.append(self._pool.submit(self._predict, batch))
        finished = []
        while len(self._running) >= self._lanes:
            finished.append(self._running.popleft().result())
        return finished

    def drain(self) -> list[np.ndarray]:
        """The probabilities of the batches still running, oldest first."""
        finished = [future.result() for future in self._running]
        self._running.clear()
        return finished

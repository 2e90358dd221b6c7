"""Run a model artifact on batches of preprocessed slices.

On a CPU nothing here imports torch (`models.onnx_network`); torch is imported
only where a CUDA device runs the network, or could (`cuda_available`).
"""

from __future__ import annotations

import ctypes
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from models.manifest import load_manifest
from models.onnx_cache import default_cache

Network = Callable[[np.ndarray], np.ndarray]


def cuda_driver_loads() -> bool:
    """Whether the CUDA driver's library loads: without it torch cannot use a GPU."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def cuda_available() -> bool:
    """Whether torch can use a CUDA device.

    Asked of torch only where the CUDA driver's library loads: a CPU-only host is
    spared importing torch.
    """
    if not cuda_driver_loads():
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(requested: str) -> str:
    """ "cpu" or "cuda": `auto` picks CUDA when present; `cuda` without a GPU is an error."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if requested == "cuda":
        raise RuntimeError("device 'cuda' was asked for, but no CUDA device is available")
    return "cpu"


class SlicePredictor:
    """Slice probabilities from the model artifact in `folder`, on CPU or CUDA.

    On CUDA the network runs in fp32, as on the CPU. Measured on an H200 at the
    node's batch of 16 (`tests.benchmarks.inference --device cuda`, two runs): fp32
    4533 and 4154 slices/s, fp16 autocast channels-last 3855 and 3613 (the batch is
    too small for half precision to pay for its casts), and fp32 stays closer to the
    CPU's probabilities (max difference 3.3e-3 against 8.8e-3 for fp16).
    On a CPU it runs on ONNX Runtime, the fastest CPU path measured
    (`models.onnx_network`), in `lanes` sessions that share `threads` threads (by
    default one per core this process may run on): `in_flight` keeps that many
    batches running at once. On CUDA there is one lane. `onnx_cache` keeps the
    exported model between starts (default: `default_cache()`); an export still
    running once `cancelled()` is true is ended (`ExportCancelledError`).
    """

    def __init__(
        self,
        folder: Path,
        device: str = "auto",
        onnx_cache: Path | None = None,
        lanes: int = 1,
        threads: int | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> None:
        self.device = resolve_device(device)
        self.network: Network
        if self.device == "cuda":
            from models.artifact import load_artifact
            from models.torch_network import torch_network

            artifact = load_artifact(folder)
            self.manifest, self.lanes = artifact.manifest, 1
            self.network = torch_network(artifact, "cuda")
        else:
            from models.onnx_network import onnx_network  # ONNX Runtime: a CPU only

            self.manifest = load_manifest(folder)
            self.lanes = lanes
            share = max(1, (threads or len(os.sched_getaffinity(0))) // lanes)
            cache = onnx_cache or default_cache()
            self.network = onnx_network(folder, self.manifest, cache, share, lanes, cancelled)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) normalised float32 inputs -> (n, classes) probabilities (float64)."""
        size = self.manifest.preprocessing.input_size
        if batch.shape[1:] != (3, size, size):
            raise ValueError(
                f"expected a (n, 3, {size}, {size}) batch, got shape {tuple(batch.shape)}"
            )
        return softmax(self.network(batch)).astype(np.float64)

    @contextmanager
    def in_flight(self) -> Iterator[InFlight]:
        """Batches put in run on the lanes, up to `lanes` at once (`InFlight`)."""
        if self.lanes == 1:
            yield InFlight(self.predict, None, 1)
            return
        with ThreadPoolExecutor(self.lanes, thread_name_prefix="forward") as pool:
            yield InFlight(self.predict, pool, self.lanes)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (n, classes) logits, in their own precision."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
    return probabilities


class InFlight:
    """Up to `lanes` batches in the network at once; probabilities in the order put.

    With one lane each batch runs on the caller's thread, as a plain `predict`.
    """

    def __init__(
        self,
        predict: Network,
        pool: ThreadPoolExecutor | None,
        lanes: int,
    ) -> None:
        self._predict = predict
        self._pool = pool
        self._lanes = lanes
        self._running: deque[Future[np.ndarray]] = deque()

    def put(self, batch: np.ndarray) -> list[np.ndarray]:
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

"""The network as an ONNX Runtime session: the node's forward pass on a CPU.

Measured on the 2-core benchmark machine (bundled model, 160 px, batch 16,
`python -m tests.benchmarks.inference --compile`): ONNX Runtime ran about
3.8x eager fp32 PyTorch, 3x channels-last, 1.3x a frozen TorchScript trace and
1.4x `torch.compile` (which also compiles for ~23 s on a cold cache), with the
same classes and probabilities within 1e-5 of eager.

This module does not import torch: a process that only classifies on a CPU
is spared torch's ~670 MB (`import torch, torchvision`: 671 MB RSS, 367 MB of
it private, on the 2-core machine). The model is exported by a child process
and cached (`models.onnx_cache`). The export records the artifact's own logits
on a fixed probe input in the model's metadata; at every start the session must
reproduce them, so a cached model that disagrees (damaged, replaced) is exported
again.
"""

from __future__ import annotations

import json
import logging
import queue
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
from onnxruntime.capi.onnxruntime_pybind11_state import (
    Fail,
    InvalidArgument,
    InvalidGraph,
    InvalidProtobuf,
)

from models.manifest import Manifest
from models.onnx_cache import ExportError, cached_model_path, export_to_cache, mark_used

log = logging.getLogger(__name__)

# Largest logit difference allowed between the session and the artifact's network.
AGREEMENT_TOLERANCE = 1e-3
# Keys of the exported model's metadata (ONNX metadata_props).
CONTENT_HASH_KEY = "pacs_node.content_hash"
PROBE_LOGITS_KEY = "pacs_node.probe_logits"
# What ONNX Runtime raises for a model file it cannot load or run as the node's.
UNREADABLE_MODEL = (Fail, InvalidArgument, InvalidGraph, InvalidProtobuf)


def probe_input(size: int) -> np.ndarray:
    """The fixed (2, 3, size, size) input whose logits the export records."""
    return np.random.default_rng(0).standard_normal((2, 3, size, size), dtype=np.float32)


def onnx_network(
    folder: Path,
    manifest: Manifest,
    cache: Path,
    threads: int,
    lanes: int = 1,
    cancelled: Callable[[], bool] = lambda: False,
) -> OnnxNetwork:
    """The network of the artifact in `folder` on ONNX Runtime: `lanes` sessions of
    `threads` threads each (`OnnxNetwork`), from `cache` when it was exported before.

    An unwritable cache only costs the export at every start. `ExportError` when
    the export fails or disagrees with the artifact; `ExportCancelledError`, the
    export ended, once `cancelled()` is true while it runs.
    """
    cached = cached_model_path(manifest, cache)
    try:
        model = cached.read_bytes()
    except OSError:  # never exported, removed as unused, or not readable: export it
        pass
    else:
        try:
            network = OnnxNetwork(model, threads, lanes)
            if network.reproduces_probe(manifest):
                mark_used(cached)
                return network
        except UNREADABLE_MODEL:  # damaged beyond loading: the same remedy
            pass
        log.warning(
            "cached ONNX model disagrees with the artifact; exporting it again",
            extra={"action": "load"},
        )
    network = OnnxNetwork(export_to_cache(folder, cached, cancelled), threads, lanes)
    if not network.reproduces_probe(manifest):
        raise ExportError("the ONNX export disagrees with the artifact's network")
    return network


class OnnxNetwork:
    """Logits from an exported model, on ONNX Runtime's CPU provider.

    It holds `lanes` sessions of `threads` threads each, so that many batches can
    run at once, each on its own session; a call finding none free waits for one.
    Several small sessions can beat one wide one: on 2 cores, two sessions of one
    thread, each running a batch, did 1.11-1.31x the slices/s of one session of two
    threads (tests/benchmarks/README.md, "Forward lanes").
    """

    def __init__(self, model: bytes, threads: int, lanes: int = 1) -> None:
        if threads < 1 or lanes < 1:
            raise ValueError(f"need at least one thread and one lane, got {threads}, {lanes}")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle workers sleep instead of spinning: the decode threads need the same cores
        # (the stage ran faster so in one, noisy, comparison).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = tuple(
            onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            for _ in range(lanes)
        )
        self.metadata: dict[str, str] = self.sessions[0].get_modelmeta().custom_metadata_map
        self._free: queue.SimpleQueue[onnxruntime.InferenceSession] = queue.SimpleQueue()
        for session in self.sessions:
            self._free.put(session)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) float32 inputs -> (n, classes) float32 logits."""
        session = self._free.get()
        try:
            (logits,) = session.run(["logits"], {"input": batch})
        finally:
            self._free.put(session)
        return np.asarray(logits)

    def reproduces_probe(self, manifest: Manifest) -> bool:
        """Whether this is the export of `manifest`'s artifact, giving the logits
        that its network gave on the probe input when it was exported."""
        if self.metadata.get(CONTENT_HASH_KEY) != manifest.content_hash:
            return False
        try:
            expected = np.array(json.loads(self.metadata[PROBE_LOGITS_KEY]), dtype=np.float32)
        except (KeyError, ValueError):
            return False
        logits = self(probe_input(manifest.preprocessing.input_size))
        return logits.shape == expected.shape and bool(
            np.abs(logits - expected).max() <= AGREEMENT_TOLERANCE
        )

"""The network as an ONNX Runtime session: the node's forward pass on a CPU.

Measured on the 2-core benchmark machine (bundled model, 160 px, batch 16,
`python -m tests.benchmarks.inference --compile`): ONNX Runtime ran about
3.8x eager fp32 PyTorch, 3x channels-last, 1.3x a frozen TorchScript trace and
1.4x `torch.compile` (which also compiles for ~23 s on a cold cache), with the
same classes and probabilities within 1e-5 of eager.

Exporting takes ~6 s (torch.export tracing and translation, not ONNX Runtime),
so the exported model is cached, keyed by the artifact's content hash and the
exporter's versions: a restarted node starts in well under a second. The cache
sits outside the artifact's hash check, so at every start the session is
checked against the artifact's own network on a fixed input; a cached model
that disagrees (damaged, replaced) is exported again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import tempfile
from pathlib import Path

import onnxruntime
import onnxscript
import torch

from models.artifact import Artifact

log = logging.getLogger(__name__)


def default_cache() -> Path:
    """`$XDG_CACHE_HOME/pacs-node/onnx`, by default `~/.cache/pacs-node/onnx`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pacs-node" / "onnx"


# Largest logit difference allowed between the session and the artifact's network.
AGREEMENT_TOLERANCE = 1e-3


def onnx_network(artifact: Artifact, cache: Path, threads: int, lanes: int = 1) -> OnnxNetwork:
    """The artifact's network on ONNX Runtime, from `cache` when it was exported before;
    `lanes` sessions of `threads` threads each (`OnnxNetwork`)."""
    reference = artifact.build_network().eval()
    size = artifact.manifest.preprocessing.input_size
    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference(probe)
    network = OnnxNetwork(exported_model(artifact, cache), threads, lanes)
    if _agrees(network, probe, expected):
        return network
    log.warning(
        "cached ONNX model disagrees with the artifact; exporting it again",
        extra={"action": "load"},
    )
    network = OnnxNetwork(exported_model(artifact, cache, reuse=False), threads, lanes)
    if not _agrees(network, probe, expected):
        raise RuntimeError("the ONNX export disagrees with the artifact's network")
    return network


def _agrees(network: OnnxNetwork, probe: torch.Tensor, expected: torch.Tensor) -> bool:
    return bool((network(probe) - expected).abs().max() <= AGREEMENT_TOLERANCE)


def exported_model(artifact: Artifact, cache: Path, reuse: bool = True) -> bytes:
    """The artifact's network as a serialised ONNX model (dynamic batch size).

    Read from `cache` when exported before (unless `reuse` is false); an
    unwritable cache only costs the export at every start.
    """
    manifest = artifact.manifest
    key = f"{manifest.content_hash} torch {torch.__version__} onnxscript {onnxscript.__version__}"
    cached = cache / f"{hashlib.sha256(key.encode()).hexdigest()}.onnx"
    if reuse and cached.is_file():
        return cached.read_bytes()
    model = _export(artifact)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # Renamed into place: a concurrent reader never sees half a model.
        with tempfile.NamedTemporaryFile(dir=cache, delete=False) as partial:
            partial.write(model)
        Path(partial.name).replace(cached)
    except OSError as error:
        log.warning("ONNX export cache not writable", extra={"reason": str(error)})
    return model


def _export(artifact: Artifact) -> bytes:
    size = artifact.manifest.preprocessing.input_size
    example = torch.zeros(2, 3, size, size)
    program = torch.onnx.export(
        artifact.build_network(),
        (example,),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
        dynamo=True,
        verbose=False,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    return bytes(program.model_proto.SerializeToString())


class OnnxNetwork:
    """Logits from an exported model, on ONNX Runtime's CPU provider.

    It holds `lanes` sessions of `threads` threads each, so that many batches can
    run at once, each on its own session; a call finding none free waits for one.
    Several small sessions can beat one wide one: on 2 cores, two sessions of one
    thread, each running a batch, did 1.11-1.31x the slices/s of one session of two
    threads (README, "Forward lanes").
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
        self._free: queue.SimpleQueue[onnxruntime.InferenceSession] = queue.SimpleQueue()
        for session in self.sessions:
            self._free.put(session)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        session = self._free.get()
        try:
            (logits,) = session.run(["logits"], {"input": batch.numpy()})
        finally:
            self._free.put(session)
        return torch.from_numpy(logits)

"""The network as an ONNX Runtime session: the node's forward pass on a CPU.

Measured on the 2-core benchmark machine (bundled model, 160 px, batch 16,
`python -m tests.benchmarks.inference --compile`): ONNX Runtime ran about
3.8x eager fp32 PyTorch, 3x channels-last, 1.3x a frozen TorchScript trace and
1.4x `torch.compile` (which also compiles for ~23 s on a cold cache), with the
same classes and probabilities within 1e-5 of eager.

This module does not import torch: a process that only classifies on a CPU
is spared torch's ~670 MB (`import torch, torchvision`: 671 MB RSS, 367 MB of
it private, on the 2-core machine). Exporting needs torch and takes ~6 s, so
it runs in a child process (`models.onnx_export`), and the exported model is
cached, keyed by the artifact's content hash and the exporter's versions.
The export records the artifact's own logits on a fixed probe input in the
model's metadata; at every start the session must reproduce them, so a cached
model that disagrees (damaged, replaced) is exported again. Each start that
reads an export marks it used; each export removes the ones that no start has
used for `UNUSED_EXPORT_DAYS`, so that a node updated for years does not keep
every model and package version it ever ran (~9 MB each for the bundled model).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
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

log = logging.getLogger(__name__)

# Largest logit difference allowed between the session and the artifact's network.
AGREEMENT_TOLERANCE = 1e-3
# Keys of the exported model's metadata (ONNX metadata_props).
CONTENT_HASH_KEY = "pacs_node.content_hash"
PROBE_LOGITS_KEY = "pacs_node.probe_logits"
# What ONNX Runtime raises for a model file it cannot load or run as the node's.
UNREADABLE_MODEL = (Fail, InvalidArgument, InvalidGraph, InvalidProtobuf)
# An export takes ~6 s plus torch's import; this bounds a child that hangs.
EXPORT_TIMEOUT_SECONDS = 600
# How often a running export asks whether it is still wanted.
CANCEL_POLL_SECONDS = 0.1
# An export no start has read for this long is removed from the cache by the next
# export: it costs its ~9 MB until then, and at worst an export again afterwards.
UNUSED_EXPORT_DAYS = 30


class ExportError(RuntimeError):
    """The artifact could not be exported to ONNX, or its export disagrees with it."""


class ExportCancelledError(Exception):
    """The export was ended unfinished: the process that needed it is stopping."""


def default_cache() -> Path:
    """`$XDG_CACHE_HOME/pacs-node/onnx`, by default `~/.cache/pacs-node/onnx`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pacs-node" / "onnx"


def probe_input(size: int) -> np.ndarray:
    """The fixed (2, 3, size, size) input whose logits the export records."""
    return np.random.default_rng(0).standard_normal((2, 3, size, size), dtype=np.float32)


def cached_model_path(manifest: Manifest, cache: Path) -> Path:
    """Where `cache` keeps the export of the artifact `manifest` describes.

    The exporter's versions are read from the installed packages' metadata, not
    by importing them.
    """
    key = (
        f"{manifest.content_hash} torch {version('torch')} onnxscript {version('onnxscript')}"
        " with probe logits"
    )
    return cache / f"{hashlib.sha256(key.encode()).hexdigest()}.onnx"


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
                _mark_used(cached)
                return network
        except UNREADABLE_MODEL:  # damaged beyond loading: the same remedy
            pass
        log.warning(
            "cached ONNX model disagrees with the artifact; exporting it again",
            extra={"action": "load"},
        )
    network = OnnxNetwork(_export_in_child(folder, cached, cancelled), threads, lanes)
    if not network.reproduces_probe(manifest):
        raise ExportError("the ONNX export disagrees with the artifact's network")
    return network


def _export_in_child(folder: Path, cached: Path, cancelled: Callable[[], bool]) -> bytes:
    """The artifact's export, made by `models.onnx_export` in a child process and
    left at `cached` (or only in a temporary folder, where the cache is unwritable)."""
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        writable = os.access(cached.parent, os.W_OK)
    except OSError:
        writable = False
    if writable:
        _run_export(folder, cached, cancelled)
        _remove_unused_exports(cached.parent, time.time())
        return cached.read_bytes()
    log.warning("ONNX export cache not writable", extra={"reason": str(cached.parent)})
    with tempfile.TemporaryDirectory(prefix="pacs-node-onnx-") as scratch:
        output = Path(scratch) / cached.name
        _run_export(folder, output, cancelled)
        return output.read_bytes()


def _mark_used(cached: Path) -> None:
    """Set the export's modification time to now: the time it was last used."""
    with contextlib.suppress(OSError):  # a read-only cache keeps everything anyway
        os.utime(cached)


def _remove_unused_exports(cache: Path, now: float) -> None:
    """Remove from `cache` the exports not used for `UNUSED_EXPORT_DAYS`, and the
    partial files of exports killed while writing (older than any export may run).
    Other files are left alone."""
    removed: list[Path] = []
    for path in cache.iterdir():
        if path.name.endswith(".partial") and path.name.startswith("."):
            oldest = now - EXPORT_TIMEOUT_SECONDS
        elif path.suffix == ".onnx":
            oldest = now - UNUSED_EXPORT_DAYS * 86400
        else:
            continue
        try:
            if path.stat().st_mtime < oldest:
                path.unlink()
                removed.append(path)
        except OSError:  # removed by another process first, or not ours to remove
            pass
    if removed:
        log.info(
            "removed unused files from the ONNX export cache",
            extra={"action": "load", "reason": ", ".join(path.name for path in removed)},
        )


def _run_export(folder: Path, output: Path, cancelled: Callable[[], bool]) -> None:
    command = [
        sys.executable,
        "-m",
        "models.onnx_export",
        str(folder.resolve()),
        str(output.resolve()),
        # An export nobody waits for ends with this process (`onnx_export.end_with_parent`).
        f"--parent={os.getpid()}",
    ]
    log.info("exporting the model to ONNX", extra={"action": "load"})
    deadline = time.monotonic() + EXPORT_TIMEOUT_SECONDS
    # Run from the folder that holds this `models` package: `-m` looks first in the
    # working directory, where another `models` (a folder of artifacts) may be.
    with subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    ) as exporting:
        try:
            errors = _errors_once_ended(exporting, deadline, cancelled)
        except BaseException:
            exporting.kill()  # nobody waits for its model any more
            raise
    if exporting.returncode != 0:
        lines = errors.strip().splitlines() or [f"exit code {exporting.returncode}"]
        raise ExportError(f"exporting the model failed: {lines[-1]}")


def _errors_once_ended(
    exporting: subprocess.Popen[str], deadline: float, cancelled: Callable[[], bool]
) -> str:
    """What the export wrote on stderr, once it has ended by itself."""
    while True:
        try:
            return exporting.communicate(timeout=CANCEL_POLL_SECONDS)[1]
        except subprocess.TimeoutExpired:
            if cancelled():
                raise ExportCancelledError("the model's export was ended unfinished") from None
            if time.monotonic() > deadline:
                raise ExportError(
                    f"exporting the model took over {EXPORT_TIMEOUT_SECONDS} s"
                ) from None


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

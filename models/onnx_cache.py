"""The exported ONNX models on disk: where each one lies, its export by a child
process, and the cache's upkeep.

The export needs torch (~6 s, and ~1.2 GB in the child), so it runs in a child
process (`models.onnx_export`), and its model is cached, keyed by the artifact's
content hash and the exporter's versions. Each start that reads an export marks
it used; each export removes the ones no start has used for `UNUSED_EXPORT_DAYS`,
so that a node updated for years does not keep every model and package version it
ever ran (~9 MB each for the bundled model).
This module imports neither torch nor ONNX Runtime nor numpy: `serve` exports
before it starts the processes that classify (`export_unless_cached`), so that
the export's memory does not add to theirs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from models.manifest import Manifest, load_manifest

log = logging.getLogger(__name__)

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


def export_unless_cached(
    folder: Path, cache: Path, cancelled: Callable[[], bool] = lambda: False
) -> None:
    """Export the artifact in `folder` into `cache`, unless an export of it lies
    there already (checked when it is loaded: `models.onnx_network`) or the cache
    cannot be written (the process that loads the model then exports it itself).
    `ArtifactError`, `ExportError`, `ExportCancelledError` as `export_to_cache`."""
    cached = cached_model_path(load_manifest(folder), cache)
    if not cached.is_file() and _writable_folder(cached.parent):
        _export_into_cache(folder, cached, cancelled)


def _writable_folder(folder: Path) -> bool:
    """Whether files can be written in `folder`, made if missing."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def export_to_cache(folder: Path, cached: Path, cancelled: Callable[[], bool]) -> bytes:
    """The artifact's export, made by `models.onnx_export` in a child process and
    left at `cached` (or only in a temporary folder, where the cache is unwritable).

    `ExportError` when the export fails; `ExportCancelledError`, the export ended,
    once `cancelled()` is true while it runs.
    """
    if _writable_folder(cached.parent):
        _export_into_cache(folder, cached, cancelled)
        return cached.read_bytes()
    log.warning("ONNX export cache not writable", extra={"reason": str(cached.parent)})
    with tempfile.TemporaryDirectory(prefix="pacs-node-onnx-") as scratch:
        output = Path(scratch) / cached.name
        _run_export(folder, output, cancelled)
        return output.read_bytes()


def _export_into_cache(folder: Path, cached: Path, cancelled: Callable[[], bool]) -> None:
    """The export, written at `cached` in a writable cache, which it then tidies."""
    _run_export(folder, cached, cancelled)
    _remove_unused_exports(cached.parent, time.time())


def mark_used(cached: Path) -> None:
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

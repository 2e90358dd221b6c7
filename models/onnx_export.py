"""Export a model artifact's network to ONNX, for `models.onnx_network`.

    python -m models.onnx_export ARTIFACT_FOLDER OUTPUT [--parent PID]

`models.onnx_network` runs this as a child process, so that the processes
that classify on a CPU never import torch. With `--parent`, the export ends
when that process does (killed while it started, say), instead of holding
torch's ~1 GB for seconds to write a model nobody waits for. The export is
checked against the artifact's own network on the probe input; the model
written to OUTPUT (replaced whole, never left half-written) carries the
artifact's content hash and those logits in its metadata, for every later
start to check the model by.
On failure the last line on stderr says why, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from models.manifest import ArtifactError
from models.onnx_cache import ExportError
from models.onnx_network import CONTENT_HASH_KEY, PROBE_LOGITS_KEY, OnnxNetwork, probe_input

if TYPE_CHECKING:
    from models.artifact import Artifact

# prctl(2) option: the signal this process gets when the thread that started it ends.
_PR_SET_PDEATHSIG = 1


def exported_model(artifact: Artifact) -> bytes:
    """The artifact's network as a serialised ONNX model (dynamic batch size), with
    its content hash and probe logits as metadata; `ExportError` if ONNX Runtime
    does not reproduce those logits."""
    import torch  # here, not above: `main` first ties this process to its parent

    network = artifact.build_network()
    size = artifact.manifest.preprocessing.input_size
    with torch.inference_mode():
        expected = network(torch.from_numpy(probe_input(size))).numpy()
    program = torch.onnx.export(
        network,
        (torch.zeros(2, 3, size, size),),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
        dynamo=True,
        verbose=False,
    )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    for key, value in (
        (CONTENT_HASH_KEY, artifact.manifest.content_hash),
        (PROBE_LOGITS_KEY, json.dumps(expected.tolist())),
    ):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    model = bytes(proto.SerializeToString())
    if not OnnxNetwork(model, threads=1).reproduces_probe(artifact.manifest):
        raise ExportError("the ONNX export disagrees with the artifact's network")
    return model


def write_whole(path: Path, content: bytes) -> None:
    """Write `content` to `path` through a renamed temporary file: a concurrent
    reader (another infer process starting) never sees half of it."""
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".partial", delete=False
    ) as created:
        partial = Path(created.name)
    try:
        partial.write_bytes(content)
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def end_with_parent(parent: int) -> bool:
    """Have the kernel end this process (SIGTERM) when `parent` ends; False if it
    already has (this process then belongs to another). Linux only: elsewhere the
    export outlives a parent that ends first, and writes its model all the same."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # Set after the parent ended, the signal never comes: ask who the parent is now.
    return os.getppid() == parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--parent", type=int, help="end when the process with this id ends")
    arguments = parser.parse_args(argv)
    if arguments.parent is not None and not end_with_parent(arguments.parent):
        print("the process that asked for the export has ended", file=sys.stderr)
        return 1
    # torch's import takes seconds: after the parent is tied.
    from models.artifact import load_artifact

    try:
        write_whole(arguments.output, exported_model(load_artifact(arguments.artifact)))
    except (ArtifactError, ExportError, OSError) as error:
        print(" ".join(str(error).split()), file=sys.stderr)  # one line: the reason
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export a model artifact's network to ONNX, for `models.onnx_network`.

    python -m models.onnx_export ARTIFACT_FOLDER OUTPUT

`models.onnx_network` runs this as a child process, so that the processes
that classify on a CPU never import torch. The export is checked against the
artifact's own network on the probe input; the model written to OUTPUT
(replaced whole, never left half-written) carries the artifact's content hash
and those logits in its metadata, for every later start to check the model by.
On failure the last line on stderr says why, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from models.artifact import Artifact, ArtifactError, load_artifact
from models.onnx_network import (
    CONTENT_HASH_KEY,
    PROBE_LOGITS_KEY,
    ExportError,
    OnnxNetwork,
    probe_input,
)


def exported_model(artifact: Artifact) -> bytes:
    """The artifact's network as a serialised ONNX model (dynamic batch size), with
    its content hash and probe logits as metadata; `ExportError` if ONNX Runtime
    does not reproduce those logits."""
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
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as partial:
        partial.write(content)
    Path(partial.name).replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("output", type=Path)
    arguments = parser.parse_args(argv)
    try:
        write_whole(arguments.output, exported_model(load_artifact(arguments.artifact)))
    except (ArtifactError, ExportError, OSError) as error:
        print(" ".join(str(error).split()), file=sys.stderr)  # one line: the reason
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

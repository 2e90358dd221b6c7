"""Inference benchmark: the whole infer stage against the model's forward pass alone.

    .venv/bin/python -m tests.benchmarks.inference [--slices 300] [--batch-size 16]
        [--model ARTIFACT] [--device cpu|cuda] [--rounds 3] [--compile]

The stage: read each file, decode (uncompressed, or JPEG Lossless made with
DCMTK's dcmcjpeg), preprocess, forward, aggregate, build the SR and write it
durably. The model-only reference: the node's own forward pass (SlicePredictor)
on the same slices already turned into tensors, same batch size, same device,
same process. On a CPU the table also shows the other ways to run the network
(eager fp32, channels-last, frozen TorchScript, and with --compile
torch.compile, which compiles for ~25 s): their throughput, set-up time and
largest probability difference from eager fp32 on the same slices, so the
node's choice can be checked. Rounds alternate between the cases; the table
shows medians and the last lines the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import torch

from models.artifact import Artifact, load_artifact
from models.predictor import SlicePredictor
from models.preprocessing import tensor_from_dataset
from pacs_node.config import BUNDLED_MODEL
from pacs_node.inference import SeriesClassifier, freeze_long_lived_objects
from pacs_node.report import ReportingNode, build_report
from pacs_node.storage import Storage
from pacs_node.worker import encode_report
from tests.benchmarks.series import long_series
from tests.dicom_data import tiny_artifact
from tests.peers import tool

Predict = Callable[[torch.Tensor], np.ndarray]
# The model-only reference: the forward pass the node itself runs.
NODE = "node (SlicePredictor)"


def model_only(predict: Predict, device: torch.device, batches: list[torch.Tensor]) -> float:
    """Seconds for the forward passes alone (with the softmax, as the node runs them)."""
    predict(batches[0])  # warm-up: first-call allocations
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in batches:
        predict(batch)  # returns numpy: the device is synchronised
    return time.perf_counter() - started


Forward = Callable[[torch.Tensor], torch.Tensor]


def torch_variants(artifact: Artifact, compile: bool) -> dict[str, Callable[[], Forward]]:
    """Builders of the other ways to run the network on a CPU."""

    def channels_last() -> Forward:
        network = artifact.build_network().to(memory_format=torch.channels_last)
        return lambda batch: network(batch.contiguous(memory_format=torch.channels_last))

    def torchscript() -> Forward:
        size = artifact.manifest.preprocessing.input_size
        with torch.no_grad():
            traced = torch.jit.trace(  # type: ignore[no-untyped-call]
                artifact.build_network(), torch.zeros(2, 3, size, size)
            )
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced))

    builders: dict[str, Callable[[], Forward]] = {
        "eager fp32": artifact.build_network,
        "channels-last": channels_last,
        "torchscript frozen": torchscript,
    }
    if compile:
        builders["torch.compile"] = lambda: torch.compile(artifact.build_network())
    return builders


def as_predict(forward: Forward) -> Predict:
    """A forward pass as the node runs it: no autograd, softmax, numpy."""

    @torch.inference_mode()
    def predict(batch: torch.Tensor) -> np.ndarray:
        return torch.softmax(forward(batch), dim=1).numpy().astype(np.float64)

    return predict


def whole_stage(classifier: SeriesClassifier, paths: list[Path], storage: Storage) -> float:
    """Seconds for classify + report + durable write, as the worker does them."""
    started = time.perf_counter()
    classification = classifier.classify(paths)
    report = build_report(
        sources=classification.headers,
        result=classification.result,
        manifest=classifier.predictor.manifest,
        revision=1,
        node=ReportingNode(ae_title="BENCH"),
    )
    storage.write(
        storage.report_path(report.StudyInstanceUID, report.SOPInstanceUID), [encode_report(report)]
    )
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pacs-node-inference-") as scratch:
        root = Path(scratch)
        model = arguments.model or (BUNDLED_MODEL if BUNDLED_MODEL.is_dir() else None)
        if model is None:
            model = tiny_artifact(root / "model", input_size=224)
        artifact = load_artifact(model)
        started = time.perf_counter()
        # A fresh export cache: the set-up time includes the export a first start pays.
        predictor = SlicePredictor(artifact, arguments.device, onnx_cache=root / "onnx")
        set_up = {NODE: time.perf_counter() - started}
        freeze_long_lived_objects()  # as load_classifier does
        classifier = SeriesClassifier(predictor, arguments.batch_size)
        plain = long_series(root / "plain", arguments.slices)
        lossless = root / "jpeg-lossless"
        lossless.mkdir()
        for path in plain:
            subprocess.run(
                [tool("dcmcjpeg"), "+e1", str(path), str(lossless / path.name)], check=True
            )
        inputs = {"uncompressed": plain, "jpeg lossless": sorted(lossless.iterdir())}
        preprocessing = predictor.manifest.preprocessing
        tensors = [tensor_from_dataset(pydicom.dcmread(path), preprocessing) for path in plain]
        size = arguments.batch_size
        batches = [torch.stack(tensors[i : i + size]) for i in range(0, len(tensors), size)]
        predicts: dict[str, Predict] = {}
        if predictor.device.type == "cpu":
            for name, build in torch_variants(artifact, arguments.compile).items():
                started = time.perf_counter()
                predicts[name] = as_predict(build())
                predicts[name](batches[0])  # torch.compile compiles on its first call
                set_up[name] = time.perf_counter() - started
        predicts[NODE] = predictor.predict
        reference = np.concatenate([next(iter(predicts.values()))(batch) for batch in batches])
        storage = Storage(root / "var")
        # Warm-up: the first series pays one-time imports and caches (decoders, highdicom's
        # IOD tables), which would otherwise weigh on the median of a few rounds.
        for paths in inputs.values():
            whole_stage(classifier, paths[: arguments.batch_size], storage)
        seconds: dict[str, list[float]] = defaultdict(list)
        for _ in range(arguments.rounds):
            for name, predict in predicts.items():
                seconds[name].append(model_only(predict, predictor.device, batches))
            for name, paths in inputs.items():
                seconds[f"stage, {name}"].append(whole_stage(classifier, paths, storage))
        print(
            f"{arguments.slices} slices, batch {arguments.batch_size}, {predictor.device}, "
            f"model {predictor.manifest.model_id}, input {preprocessing.input_size}px, "
            f"torch threads {torch.get_num_threads()}, {arguments.rounds} rounds (medians); "
            f"max |dp| and classes against {next(iter(predicts))}"
        )
        rates = {
            name: arguments.slices / statistics.median(values) for name, values in seconds.items()
        }
        print(f"{'':<26} {'slices/s':>8} {'set-up s':>8} {'max |dp|':>9} classes")
        for name, rate in rates.items():
            line = f"{name:<26} {rate:8.1f}"
            if name in predicts:
                probabilities = np.concatenate([predicts[name](batch) for batch in batches])
                same = (probabilities.argmax(1) == reference.argmax(1)).all()
                difference = np.abs(probabilities - reference).max()
                line += f" {set_up[name]:8.1f} {difference:9.1e} {'same' if same else 'DIFFER'}"
            print(line)
        node = rates[NODE]
        for name in list(predicts)[:-1]:
            print(f"ratio model-only node/{name}: {node / rates[name]:.2f}")
        for name in inputs:
            print(f"ratio stage/model-only ({name}): {rates[f'stage, {name}'] / node:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

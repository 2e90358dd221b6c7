"""Inference benchmark: the whole infer stage against the model's forward pass alone.

    .venv/bin/python -m tests.benchmarks.inference [--slices 300] [--batch-size 16]
        [--model ARTIFACT] [--device cpu|cuda] [--rounds 3]

The stage: read each file, decode (uncompressed, or JPEG Lossless made with
DCMTK's dcmcjpeg), preprocess, forward, aggregate, build the SR and write it
durably. The model-only reference: the same network on the same slices already
turned into tensors, same batch size, same device, same process. Rounds
alternate between the cases; the table shows medians and the last lines the
ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pydicom
import torch

from models.artifact import load_artifact
from models.predictor import SlicePredictor
from models.preprocessing import tensor_from_dataset
from pacs_node.config import BUNDLED_MODEL
from pacs_node.inference import SeriesClassifier
from pacs_node.report import ReportingNode, build_report
from pacs_node.storage import Storage
from pacs_node.worker import encode_report
from tests.benchmarks.series import long_series
from tests.dicom_data import tiny_artifact
from tests.peers import tool


def model_only(predictor: SlicePredictor, tensors: list[torch.Tensor], batch_size: int) -> float:
    """Seconds for the forward passes alone."""
    batches = [torch.stack(tensors[i : i + batch_size]) for i in range(0, len(tensors), batch_size)]
    predictor.predict(batches[0])  # warm-up: first-call allocations
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in batches:
        predictor.predict(batch)  # returns numpy: the device is synchronised
    return time.perf_counter() - started


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
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pacs-node-inference-") as scratch:
        root = Path(scratch)
        model = arguments.model or (BUNDLED_MODEL if BUNDLED_MODEL.is_dir() else None)
        if model is None:
            model = tiny_artifact(root / "model", input_size=224)
        predictor = SlicePredictor(load_artifact(model), arguments.device)
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
        storage = Storage(root / "var")
        seconds: dict[str, list[float]] = defaultdict(list)
        for _ in range(arguments.rounds):
            seconds["model only"].append(model_only(predictor, tensors, arguments.batch_size))
            for name, paths in inputs.items():
                seconds[f"stage, {name}"].append(whole_stage(classifier, paths, storage))
        print(
            f"{arguments.slices} slices, batch {arguments.batch_size}, {predictor.device}, "
            f"model {predictor.manifest.model_id}, input {preprocessing.input_size}px, "
            f"torch threads {torch.get_num_threads()}, {arguments.rounds} rounds (medians)"
        )
        rates = {
            name: arguments.slices / statistics.median(values) for name, values in seconds.items()
        }
        for name, rate in rates.items():
            print(f"{name:<26} {rate:8.1f} slices/s")
        for name in inputs:
            ratio = rates[f"stage, {name}"] / rates["model only"]
            print(f"ratio stage/model-only ({name}): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

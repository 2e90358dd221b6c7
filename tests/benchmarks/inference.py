"""Inference benchmark: the whole infer stage against the model's forward pass alone.

    .venv/bin/python -m tests.benchmarks.inference [--slices 300] [--batch-size 16]
        [--model ARTIFACT] [--device cpu|cuda] [--rounds 3] [--compile]
        [--decode-threads 2 [N ...]] [--lanes N]

The stage: read each file, decode (uncompressed, or JPEG Lossless made with
DCMTK's dcmcjpeg), preprocess, forward, aggregate, once per number of decode
threads asked for: the infer stage's work but its job store commit (rows,
claim, result: ~20 ms a series, which `tests.benchmarks.queue` measures). The
SR is the report stage's job, not timed here but in "classification + SR":
the uncompressed stage followed by the SR built and written durably, as the
infer stage did until session 21. The slices come as the
infer stage gets them from the job store: read through the layout the receiver
recorded, without parsing (uncompressed words in place, the JPEG Lossless frame
from its items); "uncompressed, parsed" reads the same files with pydicom, as
`pacs-node classify` does. The model-only
reference: the node's own forward pass (SlicePredictor) on the same slices
already turned into tensors, same batch size, same device, same process, as
many batches at once as it has lanes (--lanes; by default the node's own
choice, `inference.forward_lane_count`).
The table also shows the other ways to run the network, their throughput,
set-up time and largest probability difference from the node's on the
same slices, so the node's choice can be checked:
- on a CPU: eager fp32, channels-last, frozen TorchScript, and the node's
  ONNX Runtime session with one lane (when it has more);
- on CUDA (where the node runs eager fp32): fp16 and bf16 autocast
  channels-last, fp16 weights, a CUDA graph of the fp16 forward pass, and the
  node's forward pass on the CPU (ONNX Runtime) and eager fp32 on the CPU, so
  that both devices can be seen to give the same classes; then the ceiling:
  the network in fp16 channels-last on inputs already on the GPU, at larger
  batches;
- with --compile, torch.compile (compiles for ~25 s).
Rounds alternate between the cases; the table shows medians and the last
lines the ratios. "cores" is this process's CPU time (all its threads) over
the wall time, "core-ms" its CPU milliseconds per slice: where the forward
pass alone already keeps every core busy, the stage's extra core-ms per slice
(decoding, the SR) bound its ratio to the model however it is scheduled.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom
import torch

from models.artifact import Artifact, load_artifact
from models.predictor import SlicePredictor, resolve_device
from models.preprocessing import input_from_dataset
from pacs_node.config import BUNDLED_MODEL
from pacs_node.cores import forward_threads
from pacs_node.inference import (
    SeriesClassifier,
    Slice,
    forward_lane_count,
    settle_long_lived_objects,
)
from pacs_node.report import ReportingNode, build_report
from pacs_node.reporter import encode_report
from pacs_node.storage import Storage
from tests.benchmarks.series import long_series
from tests.dicom_data import stored_slice, tiny_artifact
from tests.peers import tool

Predict = Callable[[np.ndarray], np.ndarray]
# The model-only reference: the forward pass the node itself runs.
NODE = "node (SlicePredictor)"
REPORTING_NODE = ReportingNode(ae_title="BENCH")
NAME_WIDTH = 52  # the longest case name, "classification + SR, uncompressed, N decode threads"


class Timing(NamedTuple):
    seconds: float
    cpu_seconds: float  # of this process, all its threads


def timed(run: Callable[[], object]) -> Timing:
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def model_only(predict: Predict, device: str, batches: list[np.ndarray]) -> Timing:
    """The forward passes alone (with the softmax, as the node runs them)."""
    predict(batches[0])  # warm-up: first-call allocations
    if device == "cuda":
        torch.cuda.synchronize()
    # predict returns numpy: the device is synchronised
    return timed(lambda: [predict(batch) for batch in batches])


def node_predictor(
    model: Path, device: str, lanes: int | None, onnx_cache: Path | None = None
) -> SlicePredictor:
    """The node's predictor, with `lanes` or, by default, the node's own choice."""
    chosen = lanes or forward_lane_count("auto", resolve_device(device))
    return SlicePredictor(model, device, onnx_cache, chosen, threads=forward_threads())


def node_model_only(predictor: SlicePredictor, batches: list[np.ndarray]) -> Timing:
    """The node's own forward passes alone, as many at once as it has lanes."""
    predictor.predict(batches[0])  # warm-up: first-call allocations

    def run() -> None:
        with predictor.in_flight() as forwards:
            for batch in batches:
                forwards.put(batch)
            forwards.drain()

    return timed(run)


Forward = Callable[[torch.Tensor], torch.Tensor]


def cpu_variants(artifact: Artifact) -> dict[str, Callable[[], Forward]]:
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

    return {
        "eager fp32": artifact.build_network,
        "channels-last": channels_last,
        "torchscript frozen": torchscript,
    }


def cuda_variants(artifact: Artifact, batch_size: int) -> dict[str, Callable[[], Forward]]:
    """Builders of the other ways to run the network on CUDA, all channels-last."""
    cuda = torch.device("cuda")

    def network() -> torch.nn.Module:
        return artifact.build_network().to(cuda).to(memory_format=torch.channels_last)

    def on_gpu(batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return batch.to(cuda, dtype, memory_format=torch.channels_last)

    def autocast(dtype: torch.dtype) -> Callable[[], Forward]:
        def build() -> Forward:
            model = network()

            def forward(batch: torch.Tensor) -> torch.Tensor:
                with torch.autocast("cuda", dtype=dtype):
                    logits: torch.Tensor = model(on_gpu(batch))
                return logits

            return forward

        return build

    def fp16_weights() -> Forward:
        half = network().half()
        return lambda batch: half(on_gpu(batch, torch.float16))

    def cuda_graph() -> Forward:
        """The fp16 autocast forward pass captured once for a full batch and replayed.

        A shorter last batch is padded with zeros; only its own rows are returned.
        """
        model = network()
        size = artifact.manifest.preprocessing.input_size
        static_input = on_gpu(torch.zeros(batch_size, 3, size, size))
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.autocast("cuda", dtype=torch.float16):
            for _ in range(3):  # warm-up outside the capture, as CUDA graphs need
                model(static_input)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.autocast("cuda", dtype=torch.float16):
            static_output: torch.Tensor = model(static_input)

        def forward(batch: torch.Tensor) -> torch.Tensor:
            count = len(batch)
            static_input[:count].copy_(batch, non_blocking=True)
            static_input[count:].zero_()
            graph.replay()
            return static_output[:count]

        return forward

    return {
        "fp16 autocast": autocast(torch.float16),
        "bf16 autocast": autocast(torch.bfloat16),
        "fp16 weights": fp16_weights,
        "CUDA graph (fp16 autocast)": cuda_graph,
    }


def as_predict(forward: Forward) -> Predict:
    """A forward pass as the node runs it: no autograd, softmax in fp32, numpy."""

    @torch.inference_mode()
    def predict(batch: np.ndarray) -> np.ndarray:
        logits = forward(torch.from_numpy(batch)).float()
        return torch.softmax(logits, dim=1).cpu().numpy().astype(np.float64)

    return predict


def variants(
    artifact: Artifact, device: str, batch_size: int, compile: bool
) -> dict[str, Callable[[], Predict]]:
    """Builders of the predicts compared with the node's, for `device`."""
    forwards = cpu_variants(artifact) if device == "cpu" else cuda_variants(artifact, batch_size)
    builders = {name: _predicting(build) for name, build in forwards.items()}
    if compile:
        if device == "cpu":
            builders["torch.compile"] = lambda: as_predict(torch.compile(artifact.build_network()))
        else:
            builders["torch.compile (node's forward)"] = lambda: compiled_node(artifact)
    if device == "cuda":
        # The node's own CPU path and the reference network on the CPU: both devices
        # must give the same classes.
        node_on_cpu = "node on the CPU (ONNX Runtime)"
        builders[node_on_cpu] = lambda: SlicePredictor(artifact.folder, "cpu").predict
        builders["eager fp32 on the CPU"] = _predicting(artifact.build_network)
    return builders


def _predicting(build: Callable[[], Forward]) -> Callable[[], Predict]:
    return lambda: as_predict(build())


def compiled_node(artifact: Artifact) -> Predict:
    """The node's CUDA forward pass (eager fp32, the batch copied in), compiled."""
    network = torch.compile(artifact.build_network().to("cuda"))
    return as_predict(lambda batch: network(batch.to("cuda", non_blocking=True)))


def gpu_ceiling(
    artifact: Artifact, inputs: list[np.ndarray], batch_sizes: list[int], rounds: int
) -> dict[int, float]:
    """Slices/s of the network on inputs already on the GPU, by batch size.

    fp16 autocast and channels-last, no host copies, no softmax, no
    synchronisation but at the end: the most the network itself can do on this GPU.
    """
    network = artifact.build_network().to("cuda").to(memory_format=torch.channels_last)
    on_gpu = torch.from_numpy(np.stack(inputs)).to("cuda", memory_format=torch.channels_last)
    rates = {}
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        for size in batch_sizes:
            batches = [on_gpu[i : i + size] for i in range(0, len(on_gpu), size)]
            network(batches[0])
            seconds = []
            for _ in range(rounds):
                torch.cuda.synchronize()
                started = time.perf_counter()
                for batch in batches:
                    network(batch)
                torch.cuda.synchronize()
                seconds.append(time.perf_counter() - started)
            rates[size] = len(on_gpu) / statistics.median(seconds)
    return rates


def infer_stage(classifier: SeriesClassifier, paths: Sequence[Slice]) -> Timing:
    """The infer stage's work on one series: read, decode, preprocess, forward, aggregate."""
    return timed(lambda: classifier.classify(paths))


def with_report(classifier: SeriesClassifier, paths: Sequence[Slice], storage: Storage) -> Timing:
    """Classify, then build the SR and write it durably, one after the other."""

    def run() -> None:
        classification = classifier.classify(paths)
        report = build_report(
            sources=classification.sources_for_report(),
            result=classification.result,
            manifest=classifier.predictor.manifest,
            revision=1,
            node=REPORTING_NODE,
        )
        path = storage.report_path(report.StudyInstanceUID, report.SOPInstanceUID)
        storage.write(path, [encode_report(report)])

    return timed(run)


def stage_name(inputs: str, threads: int) -> str:
    return f"stage, {inputs}, {threads} decode threads"


def with_report_name(threads: int) -> str:
    return f"classification + SR, uncompressed, {threads} decode threads"


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
    parser.add_argument(
        "--decode-threads", type=int, nargs="+", default=[2], help="stage runs, one per count"
    )
    parser.add_argument("--lanes", type=int, default=None, help="default: the node's choice")
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pacs-node-inference-") as scratch:
        root = Path(scratch)
        model = arguments.model or (BUNDLED_MODEL if BUNDLED_MODEL.is_dir() else None)
        if model is None:
            model = tiny_artifact(root / "model", input_size=224)
        artifact = load_artifact(model)
        started = time.perf_counter()
        # A fresh export cache: the set-up time includes the export a first start pays.
        predictor = node_predictor(model, arguments.device, arguments.lanes, root / "onnx")
        set_up = {NODE: time.perf_counter() - started}
        settle_long_lived_objects(predictor.manifest, REPORTING_NODE)  # as load_classifier does
        classifiers = {
            threads: SeriesClassifier(predictor, arguments.batch_size, decode_threads=threads)
            for threads in arguments.decode_threads
        }
        plain = long_series(root / "plain", arguments.slices)
        lossless = root / "jpeg-lossless"
        lossless.mkdir()
        for path in plain:
            subprocess.run(
                [tool("dcmcjpeg"), "+e1", str(path), str(lossless / path.name)], check=True
            )
        # As received: read through their layouts. "parsed": the same files read by
        # pydicom (`pacs-node classify`, rows stored before the layouts).
        inputs: dict[str, Sequence[Slice]] = {
            "uncompressed": [stored_slice(path) for path in plain],
            "uncompressed, parsed": plain,
            "jpeg lossless": [stored_slice(path) for path in sorted(lossless.iterdir())],
        }
        preprocessing = predictor.manifest.preprocessing
        slices = [input_from_dataset(pydicom.dcmread(path), preprocessing) for path in plain]
        size = arguments.batch_size
        batches = [np.stack(slices[i : i + size]) for i in range(0, len(slices), size)]
        predicts: dict[str, Predict] = {}
        builders = variants(artifact, predictor.device, size, arguments.compile)
        if predictor.lanes > 1:
            builders["node with one lane"] = lambda: (
                SlicePredictor(
                    model, arguments.device, root / "onnx", threads=forward_threads()
                ).predict
            )
        for name, build in builders.items():
            started = time.perf_counter()
            try:
                predict = build()
                predict(batches[0])  # torch.compile compiles on its first call
            except Exception as error:  # one way failing on this machine must not hide the rest
                print(f"{name}: not measured, {type(error).__name__}: {error}")
                continue
            predicts[name] = predict
            set_up[name] = time.perf_counter() - started
        predicts[NODE] = predictor.predict
        reference = np.concatenate([predictor.predict(batch) for batch in batches])
        storage = Storage(root / "var")
        # Warm-up: the first series pays one-time imports and caches (decoders, highdicom's
        # IOD tables), which would otherwise weigh on the median of a few rounds.
        for paths in inputs.values():
            with_report(classifiers[arguments.decode_threads[0]], paths[:size], storage)
        timings: dict[str, list[Timing]] = defaultdict(list)
        for _ in range(arguments.rounds):
            for name, predict in predicts.items():
                if name == NODE:
                    timings[name].append(node_model_only(predictor, batches))
                else:
                    timings[name].append(model_only(predict, predictor.device, batches))
            for name, paths in inputs.items():
                for threads, classifier in classifiers.items():
                    timings[stage_name(name, threads)].append(infer_stage(classifier, paths))
            for threads, classifier in classifiers.items():
                timings[with_report_name(threads)].append(
                    with_report(classifier, inputs["uncompressed"], storage)
                )
        print(
            f"{arguments.slices} slices, batch {size}, {predictor.device}, "
            f"model {predictor.manifest.model_id}, input {preprocessing.input_size}px, "
            f"torch threads {torch.get_num_threads()}, {predictor.lanes} lanes, "
            f"{arguments.rounds} rounds (medians); "
            f"max |dp| and classes against the {NODE}"
        )
        rates = {
            name: arguments.slices / statistics.median(t.seconds for t in values)
            for name, values in timings.items()
        }
        print(
            f"{'':<{NAME_WIDTH}} {'slices/s':>8} {'cores':>5} {'core-ms':>7} "
            f"{'set-up s':>8} {'max |dp|':>9} classes"
        )
        for name, rate in rates.items():
            cores = statistics.median(t.cpu_seconds / t.seconds for t in timings[name])
            core_ms = 1000 * statistics.median(t.cpu_seconds for t in timings[name])
            per_slice = core_ms / arguments.slices
            line = f"{name:<{NAME_WIDTH}} {rate:8.1f} {cores:5.2f} {per_slice:7.2f}"
            if name in predicts:
                probabilities = np.concatenate([predicts[name](batch) for batch in batches])
                same = (probabilities.argmax(1) == reference.argmax(1)).all()
                difference = np.abs(probabilities - reference).max()
                line += f" {set_up[name]:8.1f} {difference:9.1e} {'same' if same else 'DIFFER'}"
            print(line)
        node = rates[NODE]
        if predictor.device == "cuda":
            ceiling = gpu_ceiling(artifact, slices, [size, 64, 256], arguments.rounds)
            for batch_size, rate in ceiling.items():
                name = f"ceiling: fp16 network, batch {batch_size}, on GPU"
                print(f"{name:<{NAME_WIDTH}} {rate:8.1f}")
            print(f"ratio model-only node/ceiling at batch {size}: {node / ceiling[size]:.2f}")
        for name in list(predicts)[:-1]:
            print(f"ratio model-only node/{name}: {node / rates[name]:.2f}")
        for name in inputs:
            for threads in classifiers:
                stage = stage_name(name, threads)
                print(f"ratio {stage}/model-only: {rates[stage] / node:.2f}")
        for threads in classifiers:
            name = with_report_name(threads)
            print(f"ratio {name}/model-only: {rates[name] / node:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Decode benchmark: slices/s of the infer stage's decoding alone, in threads and in processes.

    .venv/bin/python -m tests.benchmarks.decode [--slices 300] [--workers 1 2 4 8 16]
        [--rounds 3]

Each worker turns slices into the model's input as the infer stage does
(`pacs_node.inference.decode_slice`), four slices per task: parsed by
pydicom in threads (as `pacs-node classify` reads files) or in spawned
processes, and read through the layouts the receiver records, in threads (as
the infer stage reads uncompressed slices it received). Threads share one
GIL; processes do not, but send each input back through a pipe. The table
shows, per worker count, the median rate of the rounds and the CPU the main
process spent per slice; the last lines the ratios to parsing in threads. It
tells what would feed a fast model (a GPU).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from models.manifest import Preprocessing, load_manifest
from pacs_node.config import BUNDLED_MODEL
from pacs_node.inference import Slice, decode_slice
from tests.benchmarks.series import long_series
from tests.dicom_data import stored_slice

SLICES_PER_TASK = 4
LAYOUTS = "threads, layouts"


def decode(slices: list[Slice], preprocessing: Preprocessing) -> list[np.ndarray]:
    decoded = [decode_slice(item, preprocessing).pixels for item in slices]
    return [pixels for pixels in decoded if pixels is not None]


def pools(workers: int) -> dict[str, Callable[[], Executor]]:
    spawn = multiprocessing.get_context("spawn")
    return {
        "threads": lambda: ThreadPoolExecutor(workers),
        "processes": lambda: ProcessPoolExecutor(workers, mp_context=spawn),
        LAYOUTS: lambda: ThreadPoolExecutor(workers),
    }


def rate(
    pool: Executor, tasks: Sequence[list[Slice]], preprocessing: Preprocessing
) -> tuple[float, float]:
    """Slices/s and main-process CPU ms per slice for one pass over `tasks`."""
    slices = sum(len(task) for task in tasks)
    started, cpu = time.perf_counter(), time.process_time()
    for _ in pool.map(decode, tasks, [preprocessing] * len(tasks)):
        pass
    seconds = time.perf_counter() - started
    return slices / seconds, (time.process_time() - cpu) / slices * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args(argv)
    preprocessing = load_manifest(BUNDLED_MODEL).preprocessing
    with tempfile.TemporaryDirectory(prefix="pacs-node-decode-") as scratch:
        files = long_series(Path(scratch), arguments.slices)
        paths: list[Slice] = list(files)
        stored: list[Slice] = [stored_slice(path) for path in files]

        def tasks_of(slices: list[Slice]) -> list[list[Slice]]:
            return [slices[i : i + SLICES_PER_TASK] for i in range(0, len(slices), SLICES_PER_TASK)]

        print(
            f"{arguments.slices} uncompressed 512x512 slices, {SLICES_PER_TASK} per task, "
            f"{arguments.rounds} rounds (medians)"
        )
        print(f"{'':<28} {'slices/s':>8} {'main CPU ms/slice':>18}")
        medians: dict[tuple[str, int], float] = {}
        for workers in arguments.workers:
            for name, make in pools(workers).items():
                tasks = tasks_of(stored if name == LAYOUTS else paths)
                with make() as pool:
                    rate(pool, tasks[: 2 * workers], preprocessing)  # start the workers
                    results = [rate(pool, tasks, preprocessing) for _ in range(arguments.rounds)]
                slices_per_second = statistics.median(r[0] for r in results)
                main_cpu = statistics.median(r[1] for r in results)
                medians[name, workers] = slices_per_second
                label = f"{name}, {workers} workers"
                print(f"{label:<28} {slices_per_second:8.0f} {main_cpu:18.2f}")
        for workers in arguments.workers:
            for name in ("processes", LAYOUTS):
                ratio = medians[name, workers] / medians["threads", workers]
                print(f"ratio {name}/threads, {workers} workers: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

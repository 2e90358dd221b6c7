"""Infer processes: a `serve` that classifies a queue of series in 1, 2, ... processes.

    .venv/bin/python -m tests.benchmarks.infer_processes [--series 8] [--slices 300]
        [--device cpu|cuda] [--processes 1 2 4] [--rounds 2]

Each run starts `pacs-node serve --stages infer` with inference.processes = N
(every other setting the node's own choice for this host: lanes, decode threads,
each process's share of the cores) on a new SQLite job store, waits until it
is ready, then queues `--series` stored series of `--slices` uncompressed
slices at once. The rate is their slices over the time from the first infer
job claimed to the last report job done (the last SR written), from the job
events. Runs alternate between the
process counts. The reference is the node's forward pass alone (one process,
all the cores, its own lanes) on the first series' slices as ready tensors,
measured in this process before each round. Each run prints its figures as
it ends, then the table; the per-series seconds come from the stage's log
line, the time to ready (every process has loaded its model) from the serve's
start. The last lines are the ratios: each count against the
model alone, and against one process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pacs_node.config import BUNDLED_MODEL
from pacs_node.store import JobKind, JobStatus, NewInstance
from tests.benchmarks.inference import NODE, node_model_only, node_predictor
from tests.benchmarks.latency import event_time, seconds_fields
from tests.benchmarks.queue import (
    first_series_batches,
    print_rates,
    queued_store,
    stored_instances,
)
from tests.polling import wait_for
from tests.processes import NodeProcess


def classify_queue(
    root: Path, instances: list[NewInstance], series: int, processes: int, device: str, run: int
) -> tuple[float, list[float]]:
    """Seconds from the first infer job claimed to the last report job done, with
    `processes` infer processes; and each series' seconds from the infer stage's log line."""
    node = NodeProcess(
        root / "var",
        BUNDLED_MODEL,
        stages="infer",
        settings={
            "PACS_NODE_INFERENCE__PROCESSES": str(processes),
            "PACS_NODE_INFERENCE__DEVICE": device,
            "PACS_NODE_QUEUE__POLL_SECONDS": "0.05",
            # Only the benchmark completes the series, once all their rows are in: the
            # node's sweep would complete one whose rows are still being written.
            "PACS_NODE_SERIES__QUIET_SECONDS": str(10 * 24 * 3600),
            "PACS_NODE_DATABASE__URL": f"sqlite:///{root / f'run-{run}.sqlite3'}",
        },
    )
    starting = time.perf_counter()
    node.start(timeout=600)
    print(
        f"run {run}: {processes} processes ready in {time.perf_counter() - starting:.1f} s",
        flush=True,
    )
    try:
        store = queued_store(root / f"run-{run}.sqlite3", instances)
        wait_for(
            lambda: len(store.list_jobs(JobStatus.DONE, JobKind.REPORT, limit=1000)) == series,
            1800,
            f"{series} series classified and reported",
        )
        jobs = store.list_jobs(kind=JobKind.INFER, limit=1000)
        reports = store.list_jobs(kind=JobKind.REPORT, limit=1000)
        if len(jobs) != series or len(reports) != series:
            raise RuntimeError(
                f"{len(jobs)} infer and {len(reports)} report jobs for {series} series"
            )
        started = min(event_time(store, job, "claimed") for job in jobs)
        ended = max(event_time(store, job, "done") for job in reports)
        store.close()
    finally:
        node.stop()
    per_series = [
        seconds_fields(line)["seconds"] for line in node.lines if "series classified" in line
    ]
    return ended - started, per_series


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--series", type=int, default=8)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=2)
    arguments = parser.parse_args(argv)
    total = arguments.series * arguments.slices
    with tempfile.TemporaryDirectory(prefix="pacs-node-processes-") as scratch:
        root = Path(scratch)
        instances = stored_instances(root / "var", arguments.series, arguments.slices)
        predictor = node_predictor(BUNDLED_MODEL, arguments.device, None)
        batches = first_series_batches(root / "var", instances, arguments.slices, predictor, 16)
        model_rates: list[float] = []
        stage_rates: dict[int, list[float]] = {count: [] for count in arguments.processes}
        seconds: dict[int, list[float]] = {count: [] for count in arguments.processes}
        run = 0
        for _ in range(arguments.rounds):
            model_rates.append(arguments.slices / node_model_only(predictor, batches).seconds)
            print(f"model only: {model_rates[-1]:.0f} slices/s", flush=True)
            for count in arguments.processes:
                run += 1
                elapsed, per_series = classify_queue(
                    root, instances, arguments.series, count, arguments.device, run
                )
                stage_rates[count].append(total / elapsed)
                print(f"run {run}: {total / elapsed:.0f} slices/s", flush=True)
                seconds[count] += per_series
                time.sleep(1)  # the stopped node's memory and files settle
        print(
            f"{arguments.series} series of {arguments.slices} slices, {predictor.device}, "
            f"{arguments.rounds} rounds (medians; per round in brackets)"
        )
        rows = {f"{NODE}, model only": model_rates}
        rows |= {
            f"infer + report, {count} infer processes": stage_rates[count] for count in stage_rates
        }
        print_rates(rows, width=44)
        for count, values in seconds.items():
            print(f"one series' seconds, {count} processes: median {statistics.median(values):.2f}")
        model = statistics.median(model_rates)
        first = statistics.median(stage_rates[arguments.processes[0]])
        for count, rates in stage_rates.items():
            rate = statistics.median(rates)
            print(
                f"ratio {count} processes: infer + report/model-only {rate / model:.2f}, "
                f"against {arguments.processes[0]} process(es) {rate / first:.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

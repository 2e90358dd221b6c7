"""Memory benchmark: peak RSS of `serve` while it receives and classifies one long series.

    .venv/bin/python -m tests.benchmarks.memory [--slices 150 300 600] [--rounds 1]
        [--first-start]

For each length, a fresh `pacs-node serve` (every stage, config/node.toml's
settings, the bundled model on the CPU, DCMTK storescp as the destination)
receives one series of uncompressed 512x512 CT slices from DCMTK storescu
(TCP_NODELAY=1) over one association, classifies it by content completion
and delivers its SR. The peak is the sum of VmHWM from /proc of `serve` and
its infer process once the SR is delivered; "at ready" is the same once the
model is loaded and the port open. "starting" is the largest sum of the
tree's current RSS, sampled every 20 ms from the launch to the ready line: with
--first-start each node has an empty ONNX export cache, as on a first start,
so its infer process exports the model in a child of its own that ends before
the ready line (VmHWM, read at ready, cannot see it). The last lines compare
the longest series with the target and with the shortest: memory should not
grow with the series beyond the batch.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from pacs_node.config import BUNDLED_MODEL
from tests.benchmarks.receivers import tree_peak_rss_mb, tree_resident_mb
from tests.benchmarks.series import long_series, store_series, wait_for_delivery
from tests.dicom_data import series_uid
from tests.processes import NodeProcess, StoreSCP

TARGET_MB = 1536.0


class Measured(NamedTuple):
    """MB of a fresh node's process tree."""

    starting: float  # the largest sampled sum of current RSS, launch to ready
    at_ready: float  # sum of peaks (VmHWM) at the ready line
    peak: float  # sum of peaks once the series is reported


@contextmanager
def largest_tree_rss(node: NodeProcess, interval: float = 0.02) -> Iterator[list[float]]:
    """While inside: the largest sum of the RSS of `node`'s process tree seen, sampled
    every `interval` s from a thread (from when the node is launched), as a one-item list."""
    largest = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            try:
                pid = node.pid
            except RuntimeError:  # not launched yet
                continue
            largest[0] = max(largest[0], tree_resident_mb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield largest
    finally:
        done.set()
        sampler.join()


def measure(root: Path, files: list[Path], model: Path, first_start: bool) -> Measured:
    """A fresh node's memory as it starts, at its ready line, and once it has reported
    `files`; with `first_start`, with an empty ONNX export cache."""
    settings = {"PACS_NODE_SERIES__QUIET_SECONDS": "30"}
    if first_start:
        settings["XDG_CACHE_HOME"] = str(root / "cache")
    with StoreSCP(root / "pacs") as pacs:
        node = NodeProcess(
            root / "var", model, destinations=[(pacs.ae_title, pacs.port)], settings=settings
        )
        with largest_tree_rss(node) as sampled, node:
            starting = sampled[0]  # ready: the start is over
            at_ready = tree_peak_rss_mb(node.pid)
            store_series(node.port, "PACSNODE", files)
            wait_for_delivery(node, series_uid(files))
            return Measured(starting, at_ready, tree_peak_rss_mb(node.pid))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, nargs="+", default=[150, 300, 600])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument(
        "--first-start", action="store_true", help="each node with an empty ONNX export cache"
    )
    arguments = parser.parse_args(argv)
    lengths = sorted(arguments.slices)
    runs: dict[int, list[Measured]] = {length: [] for length in lengths}
    with tempfile.TemporaryDirectory(prefix="pacs-node-memory-") as scratch:
        root = Path(scratch)
        for round_number in range(arguments.rounds):
            for length in lengths:
                run = root / f"{length}-{round_number}"
                files = long_series(run / "data", length)
                runs[length].append(measure(run, files, arguments.model, arguments.first_start))
    cache = "an empty" if arguments.first_start else "the user's"
    print(
        f"one series of uncompressed 512x512 slices per fresh node, model "
        f"{arguments.model.name}, CPU, {cache} ONNX export cache; "
        f"{arguments.rounds} round(s), largest value"
    )
    print(
        f"{'slices':>6} {'starting MB':>11} {'peak at ready MB':>16} {'peak RSS MB':>12} "
        f"{'growth MB':>10}"
    )
    # Each column's largest value over the rounds.
    largest = {
        length: Measured(*(max(column) for column in zip(*runs[length], strict=True)))
        for length in lengths
    }
    for length, most in largest.items():
        print(
            f"{length:>6} {most.starting:>11.0f} {most.at_ready:>16.0f} {most.peak:>12.0f} "
            f"{most.peak - most.at_ready:>10.0f}"
        )
    shortest, longest = lengths[0], lengths[-1]
    peak = largest[longest].peak
    verdict = "met" if peak <= TARGET_MB else "missed"
    print(f"peak RSS, {longest} slices: {peak:.0f} MB (target {TARGET_MB:.0f} MB, {verdict})")
    starting = max(most.starting for most in largest.values())
    verdict = "met" if starting <= TARGET_MB else "missed"
    print(f"largest while starting: {starting:.0f} MB (target {TARGET_MB:.0f} MB, {verdict})")
    print(
        f"ratio peak RSS {longest}/{shortest} slices: {peak / largest[shortest].peak:.2f} "
        f"(series {longest / shortest:.0f}x as long)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

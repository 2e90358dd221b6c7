"""Ingest while a series is being classified, against the same node idle.

    .venv/bin/python -m tests.benchmarks.ingest_under_load [--rounds 3] [--slices 1200]

One `pacs-node serve` (all stages, the bundled model, CPU) per round. First
300 fresh instances go in while the node is idle; then a long series goes
in (long enough that classifying it outlasts the next step), completes by
content, and as soon as its inference is queued another 300 fresh instances
go in. A busy measurement counts only if the series was
still being classified when its last instance was acknowledged. The ratio
busy/idle says how much receiving slows once a series is being classified.

That includes more than the classification: the busy send also meets a database
and a storage folder fuller by the long series. So each round also sends 300
more instances with the infer process stopped (SIGSTOP, then SIGCONT), right
before or right after the busy send, in alternate rounds: busy/stopped is what
the running classification itself costs receiving, the node's state alike.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pacs_node.config import BUNDLED_MODEL
from tests.benchmarks.ingest import make_instances
from tests.benchmarks.receivers import Measurement, PacsNodeReceive, send
from tests.benchmarks.series import long_series
from tests.polling import wait_for
from tests.processes import stage_children

QUEUED = "queued for inference"
CLASSIFIED = "series classified"


def _infer_job_running(node: PacsNodeReceive) -> bool:
    listed = node.node.run("jobs", "list", "--status", "running", "--kind", "infer", "--json")
    return bool(json.loads(listed.stdout))


@contextmanager
def infer_stopped(serve: int) -> Iterator[None]:
    """The infer processes under `serve` stopped meanwhile (not its receiving ones)."""
    children = stage_children(serve, "infer")
    for child in children:
        os.kill(child, signal.SIGSTOP)
    try:
        yield
    finally:
        for child in children:
            os.kill(child, signal.SIGCONT)


def measure_round(
    root: Path, slices: int, images: int, stopped_first: bool
) -> tuple[Measurement, Measurement, Measurement, bool]:
    """(idle, busy, with the infer process stopped, whether the busy run overlapped
    classification throughout)."""
    node = PacsNodeReceive(
        root / "node",
        BUNDLED_MODEL,
        stages="receive,infer,send",
        # Only the long series' content completes it; the fresh ones wait.
        settings={"PACS_NODE_SERIES__QUIET_SECONDS": "600"},
    )
    node.start()
    try:
        idle = send(node, make_instances(root / "idle", images))
        load = long_series(root / "load", slices)
        fresh = make_instances(root / "busy", images)
        held = make_instances(root / "stopped", images)
        send(node, load)
        wait_for(lambda: node.node.has_logged(QUEUED), 60, "the long series to be queued")
        # Stopped while it claims the job, the infer process would hold the database's
        # write lock, and the receiver would wait for it (30 s, then refuse).
        wait_for(lambda: _infer_job_running(node), 60, "the infer process to claim the job")
        if stopped_first:
            with infer_stopped(node.node.pid):
                stopped = send(node, held)
        busy = send(node, fresh)
        overlapped = not node.node.has_logged(CLASSIFIED)
        if not stopped_first:
            with infer_stopped(node.node.pid):
                stopped = send(node, held)
        wait_for(lambda: node.node.has_logged(CLASSIFIED), 300, "the long series' result")
    finally:
        node.stop()
    return idle, busy, stopped, overlapped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=1200)
    parser.add_argument("--images", type=int, default=300)
    arguments = parser.parse_args(argv)
    rows: list[tuple[Measurement, Measurement, Measurement, bool]] = []
    for round_number in range(arguments.rounds):
        with tempfile.TemporaryDirectory(prefix="pacs-node-under-load-") as scratch:
            rows.append(
                measure_round(
                    Path(scratch), arguments.slices, arguments.images, round_number % 2 == 1
                )
            )
        idle, busy, stopped, overlapped = rows[-1]
        print(
            f"round {round_number + 1}: idle {idle.images_per_second:.1f} images/s "
            f"({idle.cpu_seconds:.2f} CPU s), busy {busy.images_per_second:.1f} images/s "
            f"({busy.cpu_seconds:.2f} CPU s), infer stopped {stopped.images_per_second:.1f} "
            f"images/s, classification overlapped: {overlapped}"
        )
    valid = [(idle, busy, stopped) for idle, busy, stopped, overlapped in rows if overlapped]
    print(
        f"{arguments.images} instances into `serve` (all stages), idle and while a "
        f"{arguments.slices}-slice series is classified; {len(valid)} of {len(rows)} rounds "
        "overlapped"
    )
    if not valid:
        print("no round overlapped classification: use more --slices")
        return 1
    print(f"peak RSS of serve: {max(busy.peak_rss_mb for _, busy, _ in valid):.0f} MB")
    for name, ratios in (
        ("busy/idle", [busy.images_per_second / idle.images_per_second for idle, busy, _ in valid]),
        (
            "busy/infer stopped",
            [busy.images_per_second / stopped.images_per_second for _, busy, stopped in valid],
        ),
    ):
        print(
            f"ratio {name}: {statistics.median(ratios):.2f} "
            f"(per round: {', '.join(f'{ratio:.2f}' for ratio in ratios)})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

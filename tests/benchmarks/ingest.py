"""Ingest benchmark: 300 CT instances by DCMTK storescu into three receivers.

    .venv/bin/python -m tests.benchmarks.ingest [--rounds 3] [--associations 1 4]
        [--receive-processes N] [--split-nodes N]

Receivers: DCMTK storescp (the native reference; with more than one
association `--fork`, its way of serving them in parallel), pynetdicom's
stock storescp app, and `pacs-node serve --stages receive` with its durable
defaults (fsync + database row per instance). The receivers run in
alternating order, round after round, so that drifts of this machine hit all
of them alike; the ratios are taken per round, then their median printed.
With several association counts, each receiver is measured at each of them,
and the node's rate with N associations is compared with its rate with one.

"kernel s" is the part of the receiver's "CPU s" spent in the kernel (socket
reads, file writes, syncs): the rest ran the receiver's own code. "cores busy"
is the CPU time of the receiver and of the storescu senders over the wall
time: near this machine's core count, the CPU is the limit.
With --receive-processes N, the node also receives each association count
above one with dicom.receive_processes = N: N processes accepting from its one
port, sharing its database and folder (the node's default, "auto", is two on
2 to 11 cores: `--receive-processes 1` compares one).
With --split-nodes N, the associations (when there are at least N) are also
dealt to N separate `serve --stages receive` processes, each with its own
database and folder: the most that receiving in several processes could give
on this machine, with no shared lock or database at all.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

from tests.benchmarks.receivers import (
    DcmtkStoreSCP,
    Measurement,
    PacsNodeReceive,
    PynetdicomStoreSCP,
    Receiver,
    send_to,
)
from tests.dicom_data import renamed_series, tiny_artifact
from tests.peers import CHEST_CT

DCMTK, PYNETDICOM, NODE = DcmtkStoreSCP.name, PynetdicomStoreSCP.name, PacsNodeReceive.name


def make_instances(folder: Path, count: int) -> list[Path]:
    """`count` instances from the 30 real slices, 30 per new series."""
    files: list[Path] = []
    copy = 0
    while len(files) < count:
        files += renamed_series(CHEST_CT, folder / f"series-{copy:03d}", suffix=f"-{copy}")
        copy += 1
    return files[:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--receive-processes", type=int, default=0, help="also the node with N receiving processes"
    )
    parser.add_argument("--split-nodes", type=int, default=0, help="also N separate nodes")
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pacs-node-ingest-") as scratch:
        root = Path(scratch)
        files = make_instances(root / "data", arguments.images)
        model = tiny_artifact(root / "model")
        results: Results = defaultdict(list)
        for round_number in range(arguments.rounds):
            for associations in arguments.associations:
                name = f"{round_number}-{associations}"
                cases: list[tuple[str, list[Receiver]]] = [
                    (DCMTK, [DcmtkStoreSCP(root / f"dcmtk-{name}", fork=associations > 1)]),
                    (PYNETDICOM, [PynetdicomStoreSCP(root / f"pynetdicom-{name}")]),
                    (NODE, [PacsNodeReceive(root / f"node-{name}", model)]),
                ]
                processes = arguments.receive_processes
                if processes and associations > 1:
                    setting = {"PACS_NODE_DICOM__RECEIVE_PROCESSES": str(processes)}
                    node = PacsNodeReceive(root / f"processes-{name}", model, settings=setting)
                    label = f"{processes} process" + ("es" if processes > 1 else "")
                    cases.append((f"{NODE} {label}", [node]))
                split = arguments.split_nodes
                if split > 1 and associations >= split:
                    nodes: list[Receiver] = [
                        PacsNodeReceive(root / f"split-{name}-{i}", model) for i in range(split)
                    ]
                    cases.append((f"{NODE} x{split}", nodes))
                if round_number % 2:
                    cases.reverse()
                for case, receivers in cases:
                    for receiver in receivers:
                        receiver.start()
                    try:
                        measurement = send_to(receivers, files, associations)
                    finally:
                        for receiver in receivers:
                            receiver.stop()
                    results[case, associations].append(measurement)
        print_table(results, arguments)
    return 0


# (receiver name, associations) -> one measurement per round
Results = dict[tuple[str, int], list[Measurement]]


def print_table(results: Results, arguments: argparse.Namespace) -> None:
    print(
        f"{arguments.images} instances, {arguments.rounds} round(s), "
        f"{os.cpu_count()} CPU cores; medians"
    )
    print(
        f"{'receiver':<30} {'assocs':>6} {'images/s':>9} {'MB/s':>7} {'CPU s':>7} "
        f"{'kernel s':>9} {'peak RSS MB':>12} {'senders CPU s':>14} {'cores busy':>11}"
    )
    for (name, associations), runs in results.items():
        print(
            f"{name:<30} {associations:>6} "
            f"{statistics.median(r.images_per_second for r in runs):>9.1f} "
            f"{statistics.median(r.megabytes_per_second for r in runs):>7.1f} "
            f"{statistics.median(r.cpu_seconds for r in runs):>7.2f} "
            f"{statistics.median(r.kernel_cpu_seconds for r in runs):>9.2f} "
            f"{max(r.peak_rss_mb for r in runs):>12.0f} "
            f"{statistics.median(r.sender_cpu_seconds for r in runs):>14.2f} "
            f"{statistics.median(r.cores_busy for r in runs):>11.2f}"
        )
    for associations in arguments.associations:
        for reference in (DCMTK, PYNETDICOM):
            print_ratio(
                f"node/{reference.split()[0]}, {associations} association(s)",
                results[NODE, associations],
                results[reference, associations],
            )
    single = arguments.associations[0]
    for (name, associations), runs in results.items():
        if name.startswith(NODE) and (name, associations) != (NODE, single):
            print_ratio(
                f"{name}, {associations} associations / node {single}", runs, results[NODE, single]
            )


def print_ratio(label: str, mine: list[Measurement], theirs: list[Measurement]) -> None:
    ratios = [a.images_per_second / b.images_per_second for a, b in zip(mine, theirs, strict=True)]
    print(
        f"ratio {label}: {statistics.median(ratios):.2f} "
        f"(per round: {', '.join(f'{ratio:.2f}' for ratio in ratios)})"
    )


if __name__ == "__main__":
    raise SystemExit(main())

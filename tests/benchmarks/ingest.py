"""Ingest benchmark: 300 CT instances by DCMTK storescu into three receivers.

    .venv/bin/python -m tests.benchmarks.ingest [--rounds 3] [--associations 1]

Receivers: DCMTK storescp (the native reference), pynetdicom's stock
storescp app, and `pacs-node serve --stages receive` with its durable
defaults (fsync + database row per instance). The receivers run in
alternating order, round after round, so that drifts of this machine hit all
of them alike; the ratios are taken per round, then their median printed.
"""

from __future__ import annotations

import argparse
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
    send,
)
from tests.dicom_data import renamed_series, tiny_artifact
from tests.peers import CHEST_CT


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
    parser.add_argument("--associations", type=int, default=1)
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pacs-node-ingest-") as scratch:
        root = Path(scratch)
        files = make_instances(root / "data", arguments.images)
        model = tiny_artifact(root / "model")
        results: dict[str, list[Measurement]] = defaultdict(list)
        for round_number in range(arguments.rounds):
            receivers: list[Receiver] = [
                DcmtkStoreSCP(root / f"dcmtk-{round_number}"),
                PynetdicomStoreSCP(root / f"pynetdicom-{round_number}"),
                PacsNodeReceive(root / f"node-{round_number}", model),
            ]
            if round_number % 2:
                receivers.reverse()
            for receiver in receivers:
                receiver.start()
                try:
                    results[receiver.name].append(send(receiver, files, arguments.associations))
                finally:
                    receiver.stop()
        print_table(results, arguments)
    return 0


def print_table(results: dict[str, list[Measurement]], arguments: argparse.Namespace) -> None:
    print(
        f"{arguments.images} instances, {arguments.associations} association(s), "
        f"{arguments.rounds} round(s); medians"
    )
    print(f"{'receiver':<22} {'images/s':>9} {'MB/s':>7} {'CPU s':>7} {'peak RSS MB':>12}")
    for name, runs in results.items():
        print(
            f"{name:<22} {statistics.median(r.images_per_second for r in runs):>9.1f} "
            f"{statistics.median(r.megabytes_per_second for r in runs):>7.1f} "
            f"{statistics.median(r.cpu_seconds for r in runs):>7.2f} "
            f"{max(r.peak_rss_mb for r in runs):>12.0f}"
        )
    node = results["pacs-node receive"]
    for reference in ("dcmtk storescp", "pynetdicom storescp"):
        ratios = [
            mine.images_per_second / theirs.images_per_second
            for mine, theirs in zip(node, results[reference], strict=True)
        ]
        print(
            f"ratio node/{reference.split()[0]}: {statistics.median(ratios):.2f} "
            f"(per round: {', '.join(f'{ratio:.2f}' for ratio in ratios)})"
        )


if __name__ == "__main__":
    raise SystemExit(main())

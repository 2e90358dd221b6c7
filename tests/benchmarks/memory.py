"""Memory benchmark: peak RSS of `serve` while it receives and classifies one long series.

    .venv/bin/python -m tests.benchmarks.memory [--slices 150 300 600] [--rounds 1]

For each length, a fresh `pacs-node serve` (every stage, config/node.toml's
settings, the bundled model on the CPU, DCMTK storescp as the destination)
receives one series of uncompressed 512x512 CT slices from DCMTK storescu
(TCP_NODELAY=1) over one association, classifies it by content completion
and delivers its SR. The peak is the sum of VmHWM from /proc of `serve` and
its infer process once the SR is delivered; "at ready" is the same once the
model is loaded and the port open. The last lines compare the longest series
with the target and with the shortest: memory should not grow with the
series beyond the batch.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from pacs_node.config import BUNDLED_MODEL
from tests.benchmarks.receivers import tree_peak_rss_mb
from tests.benchmarks.series import long_series, store_series, wait_for_delivery
from tests.dicom_data import series_uid
from tests.processes import NodeProcess, StoreSCP

TARGET_MB = 1536.0


def measure(root: Path, files: list[Path], model: Path) -> tuple[float, float]:
    """Peak RSS in MB of a fresh node at its ready line, and once it has reported `files`."""
    with StoreSCP(root / "pacs") as pacs:
        node = NodeProcess(
            root / "var",
            model,
            destinations=[(pacs.ae_title, pacs.port)],
            settings={"PACS_NODE_SERIES__QUIET_SECONDS": "30"},
        )
        with node:
            at_ready = tree_peak_rss_mb(node.pid)
            store_series(node.port, "PACSNODE", files)
            wait_for_delivery(node, series_uid(files))
            return at_ready, tree_peak_rss_mb(node.pid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, nargs="+", default=[150, 300, 600])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    arguments = parser.parse_args(argv)
    lengths = sorted(arguments.slices)
    peaks: dict[int, list[float]] = {length: [] for length in lengths}
    ready: dict[int, list[float]] = {length: [] for length in lengths}
    with tempfile.TemporaryDirectory(prefix="pacs-node-memory-") as scratch:
        root = Path(scratch)
        for round_number in range(arguments.rounds):
            for length in lengths:
                run = root / f"{length}-{round_number}"
                at_ready, peak = measure(run, long_series(run / "data", length), arguments.model)
                ready[length].append(at_ready)
                peaks[length].append(peak)
    print(
        f"one series of uncompressed 512x512 slices per fresh node, model "
        f"{arguments.model.name}, CPU; {arguments.rounds} round(s), largest value"
    )
    print(f"{'slices':>6} {'peak at ready MB':>16} {'peak RSS MB':>12} {'growth MB':>10}")
    for length in lengths:
        print(
            f"{length:>6} {max(ready[length]):>16.0f} {max(peaks[length]):>12.0f} "
            f"{max(peaks[length]) - max(ready[length]):>10.0f}"
        )
    shortest, longest = lengths[0], lengths[-1]
    peak = max(peaks[longest])
    verdict = "met" if peak <= TARGET_MB else "missed"
    print(f"peak RSS, {longest} slices: {peak:.0f} MB (target {TARGET_MB:.0f} MB, {verdict})")
    print(
        f"ratio peak RSS {longest}/{shortest} slices: {peak / max(peaks[shortest]):.2f} "
        f"(series {longest / shortest:.0f}x as long)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

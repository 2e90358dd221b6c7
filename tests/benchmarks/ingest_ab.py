"""Ingest A/B: the node's receiver from two source trees, in alternating rounds.

    .venv/bin/python -m tests.benchmarks.ingest_ab [--rounds 10] [--associations 1]
        [--images 300] BEFORE AFTER

BEFORE and AFTER are folders that hold a `pacs_node` package, for instance a
`git worktree add ../before <commit>` and `.`. Each round starts `serve --stages
receive` from each tree in turn (the order alternating between rounds), sends
the same instances with DCMTK storescu, and records the rate and the
receiver's CPU time per instance. On a noisy machine a change of a few percent
shows only in the ratio of rounds run side by side, not in separate runs of
the ingest benchmark. The last lines: medians, and the per-round ratio
AFTER/BEFORE.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from tests.benchmarks.ingest import make_instances
from tests.benchmarks.receivers import PacsNodeReceive, send
from tests.dicom_data import tiny_artifact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--associations", type=int, default=1)
    parser.add_argument("--images", type=int, default=300)
    arguments = parser.parse_args(argv)
    trees = {"before": arguments.before.resolve(), "after": arguments.after.resolve()}
    for tree in trees.values():
        if not (tree / "pacs_node" / "__init__.py").is_file():
            parser.error(f"{tree} holds no pacs_node package")
    rates: dict[str, list[float]] = {name: [] for name in trees}
    cpu_ms: dict[str, list[float]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="pacs-node-ingest-ab-") as scratch:
        root = Path(scratch)
        files = make_instances(root / "data", arguments.images)
        model = tiny_artifact(root / "model")
        for round_number in range(arguments.rounds):
            order = list(trees.items())
            for name, tree in order if round_number % 2 == 0 else order[::-1]:
                # The tree's package comes first on the path, before the installed one.
                node = PacsNodeReceive(
                    root / f"{name}-{round_number}", model, settings={"PYTHONPATH": str(tree)}
                )
                node.start()
                try:
                    measurement = send(node, files, arguments.associations)
                finally:
                    node.stop()
                rates[name].append(measurement.images / measurement.seconds)
                cpu_ms[name].append(1000 * measurement.cpu_seconds / measurement.images)
    print(
        f"{arguments.images} instances, {arguments.associations} association(s), "
        f"{arguments.rounds} alternating rounds"
    )
    for name, tree in trees.items():
        print(
            f"{name} ({tree}): images/s median {statistics.median(rates[name]):.1f} "
            f"(rounds {', '.join(f'{rate:.0f}' for rate in rates[name])}); "
            f"CPU ms per instance median {statistics.median(cpu_ms[name]):.2f}"
        )
    ratios = [after / before for before, after in zip(rates["before"], rates["after"], strict=True)]
    print(
        f"ratio after/before: {statistics.median(ratios):.2f} "
        f"(per round: {', '.join(f'{ratio:.2f}' for ratio in ratios)})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

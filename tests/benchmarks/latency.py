"""Latency benchmark: from a series' last C-STORE response to its SR acknowledged by the PACS.

    .venv/bin/python -m tests.benchmarks.latency [--slices 300] [--rounds 3] [--model ARTIFACT]
        [--device cpu|cuda] [--batch-size 16] [--decode-threads 2]

`pacs-node serve` runs every stage with the settings of config/node.toml
(quiet period 30 s, so the series must complete by its content), the bundled
model on the CPU (or --device), and DCMTK storescp as the destination. Each
round DCMTK storescu (TCP_NODELAY=1) sends a new series of uncompressed
512x512 CT slices over one association. The clock starts at storescu's last
"Received Store Response" and stops at the send job's `done` event, which the
node records right after the destination answered the SR's C-STORE. A
30-slice series first warms the node up (the first forward pass allocates).

Where the time goes, from the job events and the node's log fields:
assembly wait (last response -> inference job queued), queue wait (queued
-> claimed), decode (the model waiting for decoded slices), forward (the
forward passes), receiving wait (the infer process giving way to C-STOREs
between batches), other infer (the rest of the inference job, the result
committed included), report wait (inference done -> report job claimed),
report (the report job: SR built and written, sends queued), send wait
(report done -> send job claimed), send (association, C-STORE, release,
commit).
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from datetime import datetime
from pathlib import Path

from pacs_node.config import BUNDLED_MODEL
from pacs_node.store import Job, JobKind, JobStore
from tests.benchmarks.series import long_series, store_series, wait_for_delivery
from tests.dicom_data import series_uid
from tests.processes import NodeProcess, StoreSCP

TARGET_SECONDS = 10.0
STAGES = (
    "assembly wait",
    "queue wait",
    "decode",
    "forward",
    "receiving wait",
    "other infer",
    "report wait",
    "report",
    "send wait",
    "send",
)


def seconds_fields(line: str) -> dict[str, float]:
    """The `*seconds=` fields of one of the node's log lines."""
    return {name: float(value) for name, value in re.findall(r"(\w*seconds)=([\d.]+)", line)}


def logged_seconds(node: NodeProcess, message: str, uid: str) -> dict[str, float]:
    """The `*seconds=` fields of the node's log line with `message` for series `uid`."""
    for line in node.lines:
        if message in line and f"series_uid={uid}" in line:
            return seconds_fields(line)
    raise AssertionError(f"no log line {message!r} for series {uid}")


def event_time(store: JobStore, job: Job, event: str) -> float:
    times = [record.at for record in store.job_events(job.id) if record.event == event]
    return datetime.timestamp(times[-1])


def one_job(store: JobStore, kind: JobKind, uid: str) -> Job:
    (job,) = [
        job for job in store.list_jobs(kind=kind, limit=10_000) if job.series_instance_uid == uid
    ]
    return job


def stage_seconds(
    node: NodeProcess, store: JobStore, uid: str, last_response: float
) -> dict[str, float]:
    infer, report = one_job(store, JobKind.INFER, uid), one_job(store, JobKind.REPORT, uid)
    send = one_job(store, JobKind.SEND, uid)
    queued, claimed, inferred = (event_time(store, infer, e) for e in ("queued", "claimed", "done"))
    report_claimed, reported = (
        event_time(store, report, "claimed"),
        event_time(store, report, "done"),
    )
    send_claimed, delivered = event_time(store, send, "claimed"), event_time(store, send, "done")
    fields = logged_seconds(node, "series classified", uid)
    decode, forward, waited = (
        fields[f"{name}_seconds"] for name in ("decode", "forward", "receiving_wait")
    )
    return {
        "assembly wait": queued - last_response,
        "queue wait": claimed - queued,
        "decode": decode,
        "forward": forward,
        "receiving wait": waited,
        "other infer": inferred - claimed - decode - forward - waited,
        "report wait": report_claimed - inferred,
        "report": reported - report_claimed,
        "send wait": send_claimed - reported,
        "send": delivered - send_claimed,
        "total": delivered - last_response,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--decode-threads", type=int, default=2)
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pacs-node-latency-") as scratch:
        root = Path(scratch)
        warm_up = long_series(root / "warm-up", 30)
        series = [
            long_series(root / f"series-{n}", arguments.slices) for n in range(arguments.rounds)
        ]
        rounds: list[dict[str, float]] = []
        with StoreSCP(root / "pacs") as pacs:
            node = NodeProcess(
                root / "var",
                arguments.model,
                destinations=[(pacs.ae_title, pacs.port)],
                # config/node.toml's values, not the test suite's faster ones.
                settings={
                    "PACS_NODE_SERIES__QUIET_SECONDS": "30",
                    "PACS_NODE_QUEUE__POLL_SECONDS": "1",
                    "PACS_NODE_INFERENCE__DEVICE": arguments.device,
                    "PACS_NODE_INFERENCE__BATCH_SIZE": str(arguments.batch_size),
                    "PACS_NODE_INFERENCE__DECODE_THREADS": str(arguments.decode_threads),
                },
            )
            with node:
                store = JobStore(f"sqlite:///{root / 'var' / 'pacs-node.sqlite3'}")
                for files in [warm_up, *series]:
                    last_response = store_series(node.port, "PACSNODE", files)
                    wait_for_delivery(node, series_uid(files))
                    if files is not warm_up:
                        rounds.append(stage_seconds(node, store, series_uid(files), last_response))
                store.close()
        print_table(rounds, arguments)
    return 0


def print_table(rounds: list[dict[str, float]], arguments: argparse.Namespace) -> None:
    print(
        f"{arguments.slices} uncompressed 512x512 slices, completion by content, model "
        f"{arguments.model.name}, {arguments.device}, batch {arguments.batch_size}, "
        f"{arguments.decode_threads} decode threads; {len(rounds)} round(s), medians and per round"
    )
    total = statistics.median(r["total"] for r in rounds)
    print(f"{'stage':<14} {'seconds':>8} {'share':>6}  per round")
    for stage in (*STAGES, "total"):
        values = [r[stage] for r in rounds]
        median = statistics.median(values)
        per_round = ", ".join(f"{value:.2f}" for value in values)
        print(f"{stage:<14} {median:>8.2f} {median / total:>6.0%}  {per_round}")
    verdict = "met" if total <= TARGET_SECONDS else "missed"
    print(
        f"last response to SR acknowledged: {total:.2f} s "
        f"(target {TARGET_SECONDS:.0f} s, {verdict})"
    )
    print(f"ratio latency/target: {total / TARGET_SECONDS:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())

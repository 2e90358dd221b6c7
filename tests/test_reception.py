"""Inference gives way to receiving: the wait, its bound, across processes, in `serve`."""

from __future__ import annotations

import multiprocessing
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path

from pacs_node.reception import BUSY_SECONDS, Reception
from tests.benchmarks.series import long_series
from tests.dicom_data import series_uid
from tests.polling import wait_for
from tests.processes import NodeProcess, storescu


@contextmanager
def storing(reception: Reception, seconds: float) -> Iterator[None]:
    """A receiver taking a C-STORE every 5 ms for `seconds`, in a thread."""

    def store() -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            reception.stored()
            time.sleep(0.005)

    thread = threading.Thread(target=store)
    thread.start()
    try:
        yield
    finally:
        thread.join()


def test_no_wait_when_nothing_is_received() -> None:
    assert Reception().give_way(5.0) < 0.05


def test_the_wait_lasts_while_c_stores_arrive() -> None:
    reception = Reception()
    with storing(reception, 0.6):
        waited = reception.give_way(5.0)
    assert 0.6 - 0.1 < waited < 0.6 + BUSY_SECONDS + 0.3


def test_a_sender_that_never_pauses_delays_a_batch_by_the_limit_only() -> None:
    reception = Reception()
    with storing(reception, 1.5):
        waited = reception.give_way(0.3)
        assert reception.busy()
    assert 0.3 <= waited < 0.6


def _report_busy(reception: Reception, answers: Connection) -> None:
    answers.send(reception.busy())
    deadline = time.monotonic() + 10
    while not reception.busy() and time.monotonic() < deadline:
        time.sleep(0.005)
    answers.send(reception.busy())


def test_a_spawned_infer_process_sees_the_receivers_c_stores() -> None:
    reception = Reception()
    context = multiprocessing.get_context("spawn")
    answers, sending = context.Pipe(duplex=False)
    child = context.Process(target=_report_busy, args=(reception, sending))
    child.start()
    try:
        assert answers.poll(30) and answers.recv() is False
        with storing(reception, 1.0):
            assert answers.poll(10) and answers.recv() is True
    finally:
        child.join(10)


def test_serve_classifies_a_series_giving_way_to_the_c_stores_that_follow_it(
    tmp_path: Path, tiny_model: Path
) -> None:
    # Series `first` (3 slices saying so) completes by content at once; while it is
    # classified, one slice per batch, the 150 instances of `next` keep arriving.
    first = long_series(tmp_path / "first", 3)
    following = long_series(tmp_path / "next", 150)
    settings = {
        "PACS_NODE_INFERENCE__BATCH_SIZE": "1",
        "PACS_NODE_SERIES__QUIET_SECONDS": "600",
        "PACS_NODE_SERIES__SWEEP_SECONDS": "300",
    }
    with NodeProcess(tmp_path / "node", tiny_model, settings=settings) as node:
        sent = storescu(node.port, "PACSNODE", [*first, *following])
        assert sent.returncode == 0, sent.stderr
        uid = series_uid(first)

        def classified() -> str | None:
            return next(
                (line for line in node.lines if "series classified" in line and uid in line),
                None,
            )

        wait_for(lambda: classified() is not None, 60, "the first series classified")
    waited = re.search(r"receiving_wait_seconds=([\d.]+)", classified() or "")
    assert waited is not None and float(waited.group(1)) > 0

"""Back-pressure: a full disk or a deep queue makes C-STORE answer 0xA700, then recovers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom

from pacs_node.admission import Admission
from tests.dicom_data import renamed_series
from tests.peers import chest_ct
from tests.polling import wait_for
from tests.processes import NodeProcess
from tests.scu import store_status


def test_low_disk_refuses_until_space_returns(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    depth = 0
    admission = Admission(tmp_path, free + 2**30, lambda: depth, max_queue_depth=10)
    refusal = admission.refusal()
    assert refusal is not None and "below storage.min_free_mb" in refusal
    # Space comes back (here: the watermark is lowered); the next check accepts.
    admission.min_free_bytes = 0
    wait_for(lambda: admission.refusal() is None, 5, "admission to recover")
    depth = 11
    wait_for(lambda: admission.refusal(), 5, "the queue limit to refuse")


def test_a_deep_queue_refuses_new_instances_until_workers_catch_up(
    tmp_path: Path, tiny_model: Path
) -> None:
    first = renamed_series(chest_ct(), tmp_path / "first", count=2)
    second = renamed_series(chest_ct(), tmp_path / "second", count=2)
    third = pydicom.dcmread(renamed_series(chest_ct(), tmp_path / "third", count=1)[0])
    # Receive only: nothing drains the queue, each complete series adds a job.
    receiver_settings = {
        "PACS_NODE_QUEUE__MAX_DEPTH": "1",
        "PACS_NODE_SERIES__QUIET_SECONDS": "0.5",
    }
    receiver = NodeProcess(
        tmp_path / "node", tiny_model, stages="receive", settings=receiver_settings
    )
    with receiver:
        for queued, files in enumerate((first, second), start=1):
            for path in files:
                assert store_status(receiver.port, pydicom.dcmread(path)) == 0x0000
            wait_for(
                # Evaluated within this iteration, so the late binding is harmless.
                lambda: receiver.log.count("queued for inference") >= queued,  # noqa: B023
                30,
                "the series to be queued",
            )
        wait_for(
            lambda: store_status(receiver.port, third) == 0xA700, 10, "a refusal for a deep queue"
        )
        assert receiver.has_logged("refusing new instances")
        assert receiver.has_logged("above queue.max_depth 1")

        # An inference worker in its own process drains the queue ...
        worker = NodeProcess(
            tmp_path / "node", tiny_model, stages="infer", settings=receiver_settings
        )
        with worker:
            # ... and the receiver accepts again by itself.
            wait_for(lambda: store_status(receiver.port, third) == 0x0000, 120, "acceptance")
        assert receiver.has_logged("accepting new instances again")

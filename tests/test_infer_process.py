"""A receiving `serve` classifies in a child process: niced, restarted, never orphaned."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.dicom_data import renamed_series
from tests.peers import chest_ct
from tests.polling import wait_for
from tests.processes import NodeProcess, descendants, storescu


def infer_children(pid: int) -> list[int]:
    """Child processes running multiprocessing's spawned target (not its resource tracker)."""
    return [
        child
        for child in descendants(pid)
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]


def nice(pid: int) -> int:
    # Field 19 of /proc/PID/stat (1-based), after the command name in parentheses.
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone too: it only waits for its parent to read its status.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def classified(node: NodeProcess) -> int:
    return sum("series classified" in line for line in list(node.lines))


def test_classification_runs_niced_in_a_child_that_is_restarted_when_it_dies(
    tmp_path: Path, tiny_model: Path
) -> None:
    with NodeProcess(
        tmp_path / "node", tiny_model, settings={"PACS_NODE_INFERENCE__NICE": "7"}
    ) as node:
        (infer,) = infer_children(node.pid)
        assert nice(infer) == 7 and nice(node.pid) == 0
        first = renamed_series(chest_ct(), tmp_path / "first", count=3)
        assert storescu(node.port, "PACSNODE", first).returncode == 0
        wait_for(lambda: classified(node) == 1, 60, "the first series classified")

        os.kill(infer, signal.SIGKILL)
        wait_for(lambda: node.has_logged("infer process exited with code -9"), 30, "the log")
        wait_for(lambda: infer_children(node.pid) not in ([], [infer]), 60, "a new infer process")
        second = renamed_series(chest_ct(), tmp_path / "second", count=3)
        assert storescu(node.port, "PACSNODE", second).returncode == 0
        wait_for(lambda: classified(node) == 2, 60, "the second series classified")


def test_the_child_stops_when_its_parent_is_killed(tmp_path: Path, tiny_model: Path) -> None:
    node = NodeProcess(tmp_path / "node", tiny_model).start()
    (infer,) = infer_children(node.pid)
    node.stop(signal.SIGKILL)
    wait_for(lambda: not alive(infer), 30, "the orphaned infer process to stop")

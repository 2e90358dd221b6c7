"""A receiving `serve` classifies in child processes: niced, restarted, never orphaned,
as many as inference.processes, each taking series from the queue on its own."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from pacs_node.config import InferenceSettings, Settings, StorageSettings
from pacs_node.stage_process import (
    PipeWake,
    StageProcess,
    StartCancelledError,
)
from tests.dicom_data import renamed_series
from tests.peers import chest_ct
from tests.polling import wait_for
from tests.processes import (
    NodeProcess,
    descendants,
    export_child,
    running,
    spawned_children,
    stage_children,
    storescu,
)


def infer_children(pid: int) -> list[int]:
    return stage_children(pid, "infer")


def nice(pid: int) -> int:
    # Field 19 of /proc/PID/stat (1-based), after the command name in parentheses.
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def reported(node: NodeProcess) -> int:
    return sum("SR written" in line for line in list(node.lines))


def wait_until_reported(node: NodeProcess, series: int) -> None:
    """Until the infer processes have classified `series` series and written their SRs
    (an infer process takes the report job before its next infer job)."""
    wait_for(lambda: reported(node) == series, 60, f"{series} series classified and reported")


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
        wait_until_reported(node, 1)

        os.kill(infer, signal.SIGKILL)
        wait_for(lambda: node.has_logged("infer process exited with code -9"), 30, "the log")
        wait_for(lambda: infer_children(node.pid) not in ([], [infer]), 60, "a new infer process")
        second = renamed_series(chest_ct(), tmp_path / "second", count=3)
        assert storescu(node.port, "PACSNODE", second).returncode == 0
        wait_until_reported(node, 2)


def test_the_children_stop_when_their_parent_is_killed(tmp_path: Path, tiny_model: Path) -> None:
    settings = {"PACS_NODE_DICOM__RECEIVE_PROCESSES": "2"}
    node = NodeProcess(tmp_path / "node", tiny_model, settings=settings).start()
    (infer,) = infer_children(node.pid)
    (receiving,) = stage_children(node.pid, "receive")
    node.stop(signal.SIGKILL)
    wait_for(lambda: not running(infer), 30, "the orphaned infer process to stop")
    wait_for(lambda: not running(receiving), 30, "the orphaned receiving process to stop")


def stacks_waiting_to_stop(node: NodeProcess) -> int:
    """Stacks in the log whose main thread waits for its stop signal."""
    pattern = re.compile(r'stop_signals\.py", line \d+ in wait')
    return sum(pattern.search(line) is not None for line in list(node.lines))


def test_each_process_of_a_serve_writes_its_stacks_on_sigusr1_and_runs_on(
    tmp_path: Path, tiny_model: Path
) -> None:
    with NodeProcess(tmp_path / "node", tiny_model) as node:
        (infer,) = infer_children(node.pid)
        # One after the other: two processes writing their stacks to one log at
        # once interleave their lines (6 of 15 times in a scratch test).
        os.kill(node.pid, signal.SIGUSR1)
        wait_for(lambda: stacks_waiting_to_stop(node) == 1, 30, "the serve's stacks")
        os.kill(infer, signal.SIGUSR1)
        wait_for(lambda: stacks_waiting_to_stop(node) == 2, 30, "the infer process's stacks")
        assert infer_children(node.pid) == [infer]
        assert node.stop() == 0


def test_two_infer_processes_each_classify_alone_and_one_that_dies_is_restarted(
    tmp_path: Path, tiny_model: Path
) -> None:
    settings = {
        "PACS_NODE_INFERENCE__PROCESSES": "2",
        # Woken by the completed series, not by polling: a process stopped while it
        # polls could hold the SQLite write lock (a poll every 5 s makes that unlikely).
        "PACS_NODE_QUEUE__POLL_SECONDS": "5",
    }
    with NodeProcess(tmp_path / "node", tiny_model, settings=settings) as node:
        assert any(" ready: " in line and "(2 processes)" in line for line in node.lines)
        children = infer_children(node.pid)
        assert len(children) == 2
        for number, stopped in enumerate(children, start=1):
            os.kill(stopped, signal.SIGSTOP)
            try:
                series = renamed_series(chest_ct(), tmp_path / f"series-{number}", count=3)
                assert storescu(node.port, "PACSNODE", series).returncode == 0
                wait_until_reported(node, number)
            finally:
                os.kill(stopped, signal.SIGCONT)
        # One that dies is restarted under its own name; the other runs on.
        os.kill(children[0], signal.SIGKILL)
        wait_for(lambda: node.has_logged("exited with code -9; restarting it"), 30, "the log")
        assert any(re.search(r"infer process \d exited with code -9", line) for line in node.lines)
        wait_for(
            lambda: (
                len(infer_children(node.pid)) == 2 and children[0] not in infer_children(node.pid)
            ),
            60,
            "a new first infer process",
        )
        assert children[1] in infer_children(node.pid)


def test_a_starting_child_is_ended_at_once_when_its_parent_stops(
    tmp_path: Path, tiny_model: Path
) -> None:
    settings = Settings(
        storage=StorageSettings(root=tmp_path / "storage"),
        inference=InferenceSettings(model=tiny_model, device="cpu"),
    )
    child = StageProcess(settings, "infer", (PipeWake(), PipeWake()))
    child.launch()
    (pid,) = wait_for(lambda: infer_children(os.getpid()), 30, "the child")
    # Asked at once: the child is still loading torch and its model.
    with pytest.raises(StartCancelledError):
        child.wait_until_running(cancelled=lambda: True)
    assert not running(pid)


def test_a_node_stopped_while_it_restarts_a_child_does_not_wait_for_the_child_to_load(
    tmp_path: Path, tiny_model: Path
) -> None:
    with NodeProcess(
        tmp_path / "node", tiny_model, settings={"PACS_NODE_INFERENCE__PROCESSES": "2"}
    ) as node:
        first, _ = infer_children(node.pid)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: node.has_logged("exited with code -9; restarting it"), 30, "the log")
        assert node.stop() == 0
    # Only the child that ran says it stopped: the new one was ended while it loaded.
    assert sum("pacs-node stopped: stages infer" in line for line in node.lines) == 1


@pytest.mark.parametrize("stages", [None, "infer"], ids=["in an infer process", "in serve"])
def test_a_node_stopped_during_its_first_start_does_not_wait_for_the_model_export(
    tmp_path: Path, tiny_model: Path, stages: str | None
) -> None:
    """A stop while the first start exports the model to ONNX ends the start at once:
    the infer process and its export child end, no export is written, and the node
    says it stopped while starting. Before, it exported, said ready, then stopped.
    A `serve` that receives exports in its infer process; one that does not, itself."""
    cache = tmp_path / "cache"  # empty: the infer process must export the model
    node = NodeProcess(
        tmp_path / "node", tiny_model, stages=stages, settings={"XDG_CACHE_HOME": str(cache)}
    )
    node.launch()
    try:
        export = wait_for(lambda: export_child(node.pid), 60, "the export child")
        children = [*descendants(node.pid)]
    finally:
        code = node.stop()
    assert code == 0
    assert node.has_logged("received SIGTERM while starting; stopped")
    assert not node.has_logged(" ready: ")
    wait_for(lambda: not any(map(running, children)), 10, "the node's processes to end")
    assert not running(export)
    assert list(cache.rglob("*.onnx")) == []


def test_a_first_start_exports_the_model_before_any_infer_process_starts(
    tmp_path: Path, tiny_model: Path
) -> None:
    """The export child's ~1.2 GB must not add to an infer process's ~300 MB: `serve`
    exports the model before it starts its infer processes, which read the export."""
    cache = tmp_path / "cache"  # empty: the model must be exported
    node = NodeProcess(tmp_path / "node", tiny_model, settings={"XDG_CACHE_HOME": str(cache)})
    serve = node.launch().pid
    try:
        export = wait_for(lambda: export_child(serve), 60, "the export child")
        stat = Path(f"/proc/{export}/stat").read_text()
        # None yet, named or not; receiving children start after the infer stage.
        spawned_while_exporting = spawned_children(serve)
        wait_for(lambda: node.has_logged(" ready: "), 120, "the ready line")
        assert len(infer_children(serve)) == 1
    finally:
        assert node.stop() == 0
    assert int(stat.rsplit(")", 1)[1].split()[1]) == serve  # the export's parent
    assert spawned_while_exporting == []
    assert sum("exporting the model to ONNX" in line for line in node.lines) == 1
    assert len(list(cache.rglob("*.onnx"))) == 1


def test_an_infer_only_serve_is_the_first_of_its_infer_processes(
    tmp_path: Path, tiny_model: Path
) -> None:
    settings = {"PACS_NODE_INFERENCE__PROCESSES": "3"}
    with NodeProcess(tmp_path / "node", tiny_model, stages="infer", settings=settings) as node:
        assert any(" ready: " in line and "(3 processes)" in line for line in node.lines)
        assert len(infer_children(node.pid)) == 2

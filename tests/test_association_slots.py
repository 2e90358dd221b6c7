"""AssociationSlots: one dicom.max_associations for several receiving processes."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from pacs_node.association_slots import AssociationSlots

_CONTEXT = multiprocessing.get_context("spawn")


def _take_all(slots: AssociationSlots, answers: multiprocessing.SimpleQueue[list[bool]]) -> None:
    answers.put([slots.take() for _ in range(3)])


def test_processes_take_from_one_limit_and_a_process_that_ended_is_cleared(
    tmp_path: Path,
) -> None:
    slots = AssociationSlots(4, processes=2, lock_file=tmp_path / "slots.lock")
    parent, child = slots.for_process(0), slots.for_process(1)
    assert [parent.take(), parent.take()] == [True, True]
    answers: multiprocessing.SimpleQueue[list[bool]] = _CONTEXT.SimpleQueue()
    process = _CONTEXT.Process(target=_take_all, args=(child, answers))
    process.start()
    process.join(30)
    assert answers.get() == [True, True, False]  # two were the parent's
    assert parent.in_use() == 4
    child.clear()  # the child has ended: its two no longer count
    assert parent.in_use() == 2
    parent.give_back()
    assert parent.in_use() == 1


def test_the_lock_file_is_touched_and_made_again_if_removed(tmp_path: Path) -> None:
    lock_file = tmp_path / "slots.lock"
    slots = AssociationSlots(2, processes=2, lock_file=lock_file).for_process(0)
    assert slots.take()
    os.utime(lock_file, (0, 0))
    assert slots.take()
    assert lock_file.stat().st_mtime > 0
    lock_file.unlink()  # a cleaner of /tmp took it
    assert not slots.take()  # still counted: the limit (2) is reached
    slots.give_back()
    assert slots.take()
    assert lock_file.exists()

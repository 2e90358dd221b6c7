"""The cores a node may use: its CPU affinity, lowered by a cgroup CPU quota."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest

from pacs_node import cores
from pacs_node.cores import (
    cpu_quota,
    forward_threads,
    one_process_per_four_cores,
    physical_cores,
    usable_cores,
)
from pacs_node.stage_process import infer_process_count, receive_process_count
from tests.peers import REPO


def write(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_cgroup_v2_quotas_are_read_along_the_path_and_the_least_counts(tmp_path: Path) -> None:
    write(tmp_path / "kubepods", {"cpu.max": "max 100000\n"})
    write(tmp_path / "kubepods/pod1", {"cpu.max": "150000 100000\n"})
    write(tmp_path / "kubepods/pod1/container", {"cpu.max": "max 100000\n"})
    assert cpu_quota("0::/kubepods/pod1/container\n", tmp_path) == 1.5
    write(tmp_path / "kubepods", {"cpu.max": "100000 100000\n"})
    assert cpu_quota("0::/kubepods/pod1/container\n", tmp_path) == 1.0
    # A container's namespaced view: its own cgroup is the root, and has the quota.
    write(tmp_path, {"cpu.max": "400000 100000\n"})
    assert cpu_quota("0::/\n", tmp_path) == 4.0


def test_cgroup_v1_quota_of_a_container_mounted_as_the_root(tmp_path: Path) -> None:
    membership = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"
    mount = tmp_path / "cpu,cpuacct"
    write(mount, {"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n"})
    assert cpu_quota(membership, tmp_path) is None
    write(mount, {"cpu.cfs_quota_us": "250000\n"})
    assert cpu_quota(membership, tmp_path) == 2.5


def test_no_quota_anywhere_is_none(tmp_path: Path) -> None:
    assert cpu_quota("0::/user.slice/session-1.scope\n", tmp_path) is None
    assert cpu_quota("", tmp_path) is None


@pytest.mark.parametrize(
    ("cpu_max", "affinity", "cores"),
    [
        (None, 16, 16),
        ("max 100000", 16, 16),
        ("150000 100000", 16, 2),  # part of a core counts as one
        ("50000 100000", 16, 1),
        ("400000 100000", 2, 2),  # the affinity is the lower
    ],
)
def test_usable_cores_are_the_affinity_or_the_quota_whichever_is_less(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_max: str | None, affinity: int, cores: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    membership = tmp_path / "cgroup"
    membership.write_text("0::/node.service\n")
    if cpu_max is not None:
        write(tmp_path / "root/node.service", {"cpu.max": cpu_max})
    assert usable_cores(tmp_path / "root", membership) == cores


@pytest.fixture
def cgroup_with_half_a_cpu() -> Iterator[Path]:
    """A new cgroup of this kernel, 50 ms of CPU time each 100 ms; skipped where this
    process may not make one (not root, or a read-only cgroup file system)."""
    line = next(
        (
            line
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if line.split(":")[1] == "" or "cpu" in line.split(":")[1].split(",")
        ),
        None,
    )
    if line is None:
        pytest.skip("no cgroup CPU controller")
    _, controllers, _ = line.split(":", 2)
    version_2 = controllers == ""
    hierarchy = Path("/sys/fs/cgroup") / ("" if version_2 else controllers)
    folder = hierarchy / f"pacs-node-test-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir()
    except OSError as error:
        pytest.skip(f"cannot make a cgroup here: {error}")
    try:
        try:
            if version_2:
                (folder / "cpu.max").write_text("50000 100000")
            else:
                (folder / "cpu.cfs_period_us").write_text("100000")
                (folder / "cpu.cfs_quota_us").write_text("50000")
        except OSError as error:  # e.g. v2 without the cpu controller for its children
            pytest.skip(f"cannot set a CPU quota here: {error}")
        yield folder
    finally:
        folder.rmdir()


def test_a_process_in_a_cgroup_of_half_a_cpu_uses_one_core(cgroup_with_half_a_cpu: Path) -> None:
    script = "from pacs_node.cores import usable_cores; print(usable_cores())"
    # The shell joins the cgroup, then becomes Python: the process counted is the one inside.
    join_then_run = 'echo $$ > "$1/cgroup.procs" && exec "$2" -c "$3"'
    completed = subprocess.run(
        ["sh", "-c", join_then_run, "sh", str(cgroup_with_half_a_cpu), sys.executable, script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (completed.stdout, completed.stderr) == ("1\n", "")


@pytest.mark.parametrize(
    ("variable", "threads"),
    [(None, 6), ("1", 1), ("4", 4), ("12", 6), ("4,2", 4), ("0", 6), ("many", 6), ("", 6)],
)
def test_forward_threads_are_the_usable_cores_or_fewer_under_omp_num_threads(
    monkeypatch: pytest.MonkeyPatch, variable: str | None, threads: int
) -> None:
    """OMP_NUM_THREADS, the limit torch's thread count followed, still holds now that
    the CPU path runs without torch; a value that is no count is ignored."""
    monkeypatch.setattr(cores, "usable_cores", lambda: 6)
    monkeypatch.setattr(cores, "physical_cores", lambda cpus, topology: 8)
    if variable is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", variable)
    assert forward_threads() == threads


def _topology(root: Path, siblings: dict[int, str]) -> Path:
    """A fake /sys/devices/system/cpu: each CPU's thread_siblings_list."""
    for cpu, listed in siblings.items():
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "thread_siblings_list").write_text(listed + "\n")
    return root


def test_hyperthreads_of_one_core_count_once(tmp_path: Path) -> None:
    topology = _topology(tmp_path, {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3", 4: "4", 5: "5"})
    assert physical_cores(range(6), topology) == 4
    assert physical_cores([0, 2], topology) == 1  # an affinity of one core's two threads
    assert physical_cores([0, 1, 6, 7], topology) == 4  # unreadable ones count alone


def test_forward_threads_are_the_physical_cores_at_most_the_usable_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 logical CPUs on 4 hyperthreaded cores give 4 threads, as torch counted."""
    topology = _topology(tmp_path, {cpu: f"{cpu % 4},{cpu % 4 + 4}" for cpu in range(8)})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(cores, "usable_cores", lambda: 8)
    assert forward_threads(topology) == 4
    monkeypatch.setattr(cores, "usable_cores", lambda: 3)  # a quota of 3 CPUs
    assert forward_threads(topology) == 3


@pytest.mark.parametrize(
    ("usable", "processes"), [(1, 1), (2, 1), (7, 1), (8, 2), (15, 3), (16, 4), (64, 4)]
)
def test_auto_process_counts_are_one_per_four_cores_from_one_to_four(
    usable: int, processes: int
) -> None:
    assert one_process_per_four_cores(usable) == processes


def test_auto_process_counts_follow_a_cpu_quota_not_the_hosts_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 16 cores to run on, a container's quota of 2 CPUs: one process, not four.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(cores, "cpu_quota", lambda membership, root: 2.0)
    assert one_process_per_four_cores() == 1
    monkeypatch.setattr(cores, "cpu_quota", lambda membership, root: None)
    assert one_process_per_four_cores() == 4


@pytest.mark.parametrize(
    ("count", "on_two_cores"), [(infer_process_count, 1), (receive_process_count, 2)]
)
def test_a_stages_process_count_is_the_number_set_or_by_its_cores(
    count: Callable[[int | Literal["auto"], int | None], int], on_two_cores: int
) -> None:
    assert count(3, 2) == 3
    assert count("auto", 1) == 1
    # Two receiving processes took four associations ~1.3x as fast as one on 2 cores.
    assert count("auto", 2) == count("auto", 7) == on_two_cores
    assert count("auto", 12) == 3
    assert count("auto", 16) == 4

"""How many cores this process may use, which every "auto" count of threads and processes follows.

The cores it may run on (its CPU affinity: taskset, a cpuset), fewer where a
cgroup CPU quota allows less: a container's `--cpus`, a Kubernetes CPU limit,
systemd's CPUQuota. Why: a process's default thread counts follow the host, so
in a container allowed 2 CPUs on a 64-core host the node would run dozens of
threads that the kernel throttles to 2 CPUs' time, and "auto" would start four
infer processes instead of one. A quota of 1.5 CPUs counts as 2 cores, as the
JVM counts it: one thread per part-core.

Without torch: a receiving `serve` decides how many infer processes to start
before any model is loaded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_MEMBERSHIP = Path("/proc/self/cgroup")
CPU_TOPOLOGY = Path("/sys/devices/system/cpu")


def usable_cores(root: Path = CGROUP_ROOT, membership: Path = CGROUP_MEMBERSHIP) -> int:
    """The cores this process may run on, at most as many as its cgroups' CPU quota allows."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota = cpu_quota(membership.read_text(), root)
    except OSError:  # no /proc: nothing says there is a quota
        return cores
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def one_process_per_four_cores(cores: int | None = None, at_least: int = 1) -> int:
    """An "auto" count of processes for one stage: one per 4 `cores` (by default
    the usable cores), at most 4, and at least `at_least` where there are as many
    cores. Below 8 cores one process for the infer stage, two for receiving, which
    the measurements on 2 cores favoured (README "Performance"); four on a 16-core
    host, where four infer processes and four receiving ones were measured. No
    more than four: more were not measured, and each holds its own memory."""
    usable = cores or usable_cores()
    return min(4, max(min(at_least, usable), usable // 4, 1))


def forward_threads(topology: Path = CPU_TOPOLOGY) -> int:
    """The threads the forward passes of this host may run: one per physical core
    this process may run on (hyperthreads of a core share its arithmetic units;
    torch's and ONNX Runtime's own defaults count so), at most the usable cores,
    fewer where OMP_NUM_THREADS says so (its first value), as torch's count did."""
    threads = min(usable_cores(), physical_cores(os.sched_getaffinity(0), topology))
    limit = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return min(threads, int(limit)) if limit.isdigit() and int(limit) > 0 else threads


def physical_cores(cpus: Iterable[int], topology: Path = CPU_TOPOLOGY) -> int:
    """How many physical cores the logical `cpus` lie on, by each one's hyperthread
    siblings in sysfs; a CPU whose siblings cannot be read counts as a core."""
    cores = set()
    for cpu in cpus:
        try:
            cores.add((topology / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text())
        except OSError:
            cores.add(f"cpu{cpu}")
    return max(1, len(cores))


def cpu_quota(membership: str, root: Path) -> float | None:
    """The CPUs that the cgroups named in `membership` (the text of /proc/self/cgroup)
    allow, the least along each one's path up to its hierarchy's root; None where
    none sets a quota. cgroup v2 (`cpu.max`) and v1 (`cpu.cfs_quota_us`), mounted
    under `root` as systemd, Docker and Kubernetes mount them."""
    quotas: list[float] = []
    for line in membership.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # the v2 hierarchy
            quotas += _quotas_along(root, path, _v2_quota)
        elif "cpu" in controllers.split(","):
            quotas += _quotas_along(root / controllers, path, _v1_quota)
    return min(quotas, default=None)


def _quotas_along(
    mount: Path, path: str, read_quota: Callable[[Path], float | None]
) -> list[float]:
    """Each quota set from the process's cgroup up to the hierarchy's root."""
    folder = mount / path.lstrip("/")
    if not folder.is_dir():
        # A container's own cgroup mounted as the root, while /proc names it by its
        # path on the host (cgroup v1 without a cgroup namespace, as Docker does).
        folder = mount
    quotas = []
    for level in [folder, *folder.parents]:
        try:
            quota = read_quota(level)
        except (OSError, ValueError):  # no such file at this level, or unreadable
            quota = None
        if quota is not None:
            quotas.append(quota)
        if level == mount:
            break
    return quotas


def _v2_quota(folder: Path) -> float | None:
    # "max 100000" (none), or "150000 100000": 150 ms of CPU time each 100 ms.
    limit, period = (folder / "cpu.max").read_text().split()
    return None if limit == "max" else int(limit) / int(period)


def _v1_quota(folder: Path) -> float | None:
    limit = int((folder / "cpu.cfs_quota_us").read_text())
    period = int((folder / "cpu.cfs_period_us").read_text())
    return None if limit < 0 else limit / period

"""How many CPU cores this process may use: the threads a sweep's cells, ``--nproc``'s processes and
``ssvi bench`` share out.

Two limits apply besides the machine's core count: the process's CPU affinity (a SLURM job's cpuset,
``taskset``) and its cgroup's CPU quota (``docker run --cpus 4``, a Kubernetes CPU limit), which lets
the process see every core of the host while it may use only a few of them over time. Threads beyond
the quota are throttled, not run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator, Optional

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int:
    """The CPU cores this process may run on: its affinity, lowered to its cgroup's CPU quota rounded
    up (a quota of 1.5 CPUs counts 2), never below 1; not every core of the machine as
    ``os.cpu_count()`` counts them."""
    return _lowered(cgroup_cpu_quota(root, self_cgroup))


def _lowered(quota: Optional[float]) -> int:
    """The affinity's cores, lowered to ``quota`` rounded up, never below 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, math.ceil(quota)) if quota is not None else cores)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> Optional[float]:
    """The CPUs' worth of time this process's cgroup (or one above it) may use, the smallest quota
    found; ``None`` where none is set or it cannot be read (not Linux, no cgroup file system).

    cgroup v2: ``cpu.max`` (``"max 100000"`` or ``"QUOTA PERIOD"``) in the process's group, found from
    the ``0::PATH`` line of ``/proc/self/cgroup``, and in the groups above it. cgroup v1: the
    ``cpu.cfs_quota_us`` (-1 for none) and ``cpu.cfs_period_us`` of the ``cpu`` controller's group.
    A container sees its own group as the root of the mount, so the root is read as well."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    quotas = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            for base in (root, root / "unified"):
                quotas += [q for d in _groups(base, path) if (q := _v2_quota(d)) is not None]
        elif "cpu" in controllers.split(","):
            for base in {root / controllers, root / "cpu"}:
                quotas += [q for d in _groups(base, path) if (q := _v1_quota(d)) is not None]
    return min(quotas) if quotas else None


def _groups(base: Path, path: str) -> Iterator[Path]:
    """``base/path`` and each folder above it up to ``base`` itself, those that exist."""
    parts = [p for p in path.strip().split("/") if p and p not in (".", "..")]
    for n in range(len(parts), -1, -1):
        folder = base.joinpath(*parts[:n])
        if folder.is_dir():
            yield folder


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _ratio(quota: str, period: str) -> Optional[float]:
    try:
        q, p = float(quota), float(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 and math.isfinite(q / p) else None


def _v2_quota(group: Path) -> Optional[float]:
    text = _read(group / "cpu.max")
    fields = text.split() if text else []
    return _ratio(fields[0], fields[1]) if len(fields) == 2 and fields[0] != "max" else None


def _v1_quota(group: Path) -> Optional[float]:
    quota, period = _read(group / "cpu.cfs_quota_us"), _read(group / "cpu.cfs_period_us")
    return _ratio(quota, period) if quota is not None and period is not None else None


def fit_torch_threads() -> None:
    """Lower torch's CPU threads to :func:`usable_cpus` where a cgroup's CPU quota is below the cores
    torch counted (its affinity) and ``OMP_NUM_THREADS`` does not decide: in a container limited to 2
    CPUs of a 64-core host, 64 threads would be throttled to 2 CPUs' time. Never raises the count;
    imports torch only under a quota."""
    if os.environ.get("OMP_NUM_THREADS") or (quota := cgroup_cpu_quota()) is None:
        return
    import torch

    if torch.get_num_threads() > (cores := _lowered(quota)):
        torch.set_num_threads(cores)

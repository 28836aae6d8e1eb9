"""The cores a process may use (ssvi_cli.training.cpus): affinity and a container's CPU quota, read
from cgroup file systems written here in the kernel's layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ssvi_cli.training import cpus


def _tree(tmp_path: Path, files: dict[str, str], self_cgroup: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(self_cgroup)
    return root, proc


V1_LINES = "12:memory:/job\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"


@pytest.mark.parametrize("files, self_cgroup, quota", [
    # cgroup v2, a container's own group mounted as the root (docker run --cpus 3)
    ({"cpu.max": "300000 100000", "cgroup.controllers": "cpu"}, "0::/\n", 3.0),
    # v2 in a nested group; the parent's limit is the smaller one
    ({"kubepods/pod1/cpu.max": "max 100000", "kubepods/cpu.max": "150000 100000"}, "0::/kubepods/pod1\n", 1.5),
    # v2 without a limit
    ({"cpu.max": "max 100000"}, "0::/\n", None),
    # v2 under a hybrid layout
    ({"unified/app/cpu.max": "200000 100000"}, "0::/app\n", 2.0),
    # cgroup v1: the cpu controller's group, named as the mount names it
    ({"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "400000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"},
     V1_LINES, 4.0),
    # v1 inside the container: the group's path is not under the mount, its root is the group
    ({"cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "100000"}, V1_LINES, 0.5),
    # v1 without a limit
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, V1_LINES, None),
    # unreadable or odd contents are no limit
    ({"cpu.max": "banana"}, "0::/\n", None),
    ({"cpu.max": "100000 0"}, "0::/\n", None),
    ({"cpu.max": "200000 100000"}, "garbage line\n0::/../..\n", 2.0),
])
def test_the_cgroup_quota_is_read_as_the_kernel_writes_it(tmp_path: Path, files, self_cgroup, quota):
    root, proc = _tree(tmp_path, files, self_cgroup)
    assert cpus.cgroup_cpu_quota(root, proc) == quota


def test_no_cgroup_file_system_is_no_limit(tmp_path: Path):
    assert cpus.cgroup_cpu_quota(tmp_path / "none", tmp_path / "missing") is None


@pytest.mark.parametrize("affinity, files, expected", [
    ({0, 1, 2, 3, 4, 5, 6, 7}, {"cpu.max": "200000 100000"}, 2),   # a quota below the cores: the quota
    ({0, 1, 2, 3, 4, 5, 6, 7}, {"cpu.max": "150000 100000"}, 2),   # rounded up
    ({0, 1, 2, 3, 4, 5, 6, 7}, {"cpu.max": "250000 100000"}, 3),   # up, not to the nearest (round(2.5) is 2)
    ({0, 1, 2, 3, 4, 5, 6, 7}, {"cpu.max": "210000 100000"}, 3),
    ({0, 1, 2, 3, 4, 5, 6, 7}, {"cpu.max": "300000 100000"}, 3),   # a whole quota as it is
    ({0, 1, 2, 3, 4, 5, 6, 7}, {"cpu.max": "100000 100000"}, 1),
    ({0, 1}, {"cpu.max": "800000 100000"}, 2),                     # the affinity below the quota
    ({0, 1, 2}, {"cpu.max": "max 100000"}, 3),                     # no quota: the affinity
    ({0, 1, 2}, {"cpu.max": "10000 100000"}, 1),                   # a tenth of a core: still one thread
])
def test_the_usable_cores_are_the_affinity_lowered_to_the_quota(tmp_path: Path, monkeypatch, affinity, files, expected):
    """A container on a large host sees every core in its affinity; its CPU quota is what it may use,
    so the threads a sweep shares out per cell stop at the quota (they were throttled beyond it)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: affinity, raising=False)
    root, proc = _tree(tmp_path, files, "0::/\n")
    assert cpus.usable_cpus(root, proc) == expected


def test_a_sweep_shares_out_the_quota(tmp_path: Path, monkeypatch):
    """A sweep's threads per cell: the quota's cores over the jobs, not the 16 cores the host shows."""
    import ssvi_cli.sweep.runner as runner
    from ssvi_cli.cli import run
    from ssvi_cli.sweep.runner import Outcome

    calls = []
    monkeypatch.setattr(runner, "run_cells", lambda _dir, _cells, jobs, threads, *_: calls.append((jobs, threads)) or Outcome())
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda *a: 4.0)
    assert run(["sweep", "--sparsity", "0.9", "--set", "train.epochs=1", "--jobs", "2",
                "--out", str(tmp_path / "sw"), "--no-figures"]) == 0
    assert calls == [(2, 2)]


def test_a_command_lowers_torch_threads_to_the_quota(monkeypatch):
    """Every command runs with no more torch threads than the container's quota allows, unless
    OMP_NUM_THREADS says otherwise; without a quota torch's own count stays."""
    import torch

    from ssvi_cli.cli import run

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda *a: None)
        assert run(["presets"]) == 0 and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda *a: 1.0)
        assert run(["presets"]) == 0 and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert run(["presets"]) == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)

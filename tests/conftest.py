import os

import pytest
import torch

# pytest-xdist's workers set COLUMNS=80, which the consoles obey (ssvi_cli.cli.common): the tests
# read tables printed as into a file, without it.
os.environ.pop("COLUMNS", None)

from ssvi_cli.training.cpus import usable_cpus  # noqa: E402  (after COLUMNS is dropped)

_CORES = usable_cpus()  # a container's CPU quota too

# Keep tests deterministic and light on a shared 2-core machine: each xdist worker takes its share.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, _CORES) // _workers))


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: without the plugin (-p no:xdist, scripts/gpu-check) unused
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: a process per core, at most four (each holds torch and its fixtures' models)."""
    return max(1, min(4, _CORES))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # `--dist loadfile` hands out files by their number of tests, most first: a file of one long test
    # (test_accuracy's two minutes) went last, with the other worker idle the while. Files are handed
    # out in the order below instead.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Files with slow tests first (most slow tests first), then the others by their number of tests."""
    slow, count = {}, {}
    for item in items:
        slow[item.fspath] = slow.get(item.fspath, 0) + (item.get_closest_marker("slow") is not None)
        count[item.fspath] = count.get(item.fspath, 0) + 1
    first = {path: n for n, path in enumerate(sorted(count, key=lambda path: (-slow[path], -count[path])))}
    items.sort(key=lambda item: first[item.fspath])  # stable: a file's own order is kept

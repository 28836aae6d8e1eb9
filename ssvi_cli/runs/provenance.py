"""What produced a run's or an evaluation's numbers, recorded beside them for whoever reproduces them:
ssvi's and torch's versions (a CPU's numbers move in their last digits with torch's, its kernels and
the thread count) and the processor or GPU, with the CPU threads."""

from __future__ import annotations

import platform
from typing import Any

import torch

from ssvi_cli.machine import cpu_model
from ssvi_cli.version import __version__


def provenance(device: torch.device) -> dict[str, Any]:
    """``{"ssvi", "torch", "python", "device", "threads"}``: the versions, the CPU's model name or the
    GPU's, and the CPU threads torch runs on (None on a GPU)."""
    on_gpu = device.type == "cuda"
    return {"ssvi": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if on_gpu else cpu_model(),
            "threads": None if on_gpu else torch.get_num_threads()}

"""Interleaved timing: every variant warmed up, then timed once per repeat in a rotated order, so the
load of a shared machine hits every variant alike; medians over the repeats."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


@dataclass
class Variant:
    """One timed thing: a zero-argument callable and the row it reports into."""

    key: str
    run: Callable[[], Any]
    row: dict[str, Any]
    times: list[float] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    """Wait for queued CUDA kernels, so a timing measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(variants: list[Variant], repeats: int, warmup: int,
                     on_progress: Optional[Callable[[str], None]] = None,
                     device: torch.device = torch.device("cpu")) -> None:
    """Warm every variant up, then time each once per repeat in a rotated order."""
    for v in variants:
        for _ in range(warmup):
            v.run()
    n = len(variants)
    for r in range(repeats):
        if on_progress:
            on_progress(f"repeat {r + 1}/{repeats}")
        for j in range(n):
            v = variants[(j + r) % n]
            _sync(device)
            t0 = time.perf_counter()
            v.run()
            _sync(device)
            v.times.append(time.perf_counter() - t0)


def summarise(v: Variant) -> dict[str, Any]:
    """The variant's row with its median, minimum and every repeat's time in milliseconds."""
    row = dict(v.row)
    row["median_ms"] = 1e3 * statistics.median(v.times) if v.times else None
    row["min_ms"] = 1e3 * min(v.times) if v.times else None
    row["times_ms"] = [round(1e3 * t, 3) for t in v.times]
    return row

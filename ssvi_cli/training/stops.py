"""Stopping a run on request: Ctrl-C (SIGINT) or SIGTERM, as a batch scheduler sends before it kills
a job, finish the current step, write a checkpoint and raise :class:`Interrupted`."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


class Interrupted(RuntimeError):
    """Training stopped on request (Ctrl-C, SIGTERM) after writing a checkpoint."""

    def __init__(self, run_dir: Path, step: int, signum: int = signal.SIGINT) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint written")
        self.run_dir, self.step, self.signum = Path(run_dir), step, signal.Signals(signum)


@contextmanager
def stop_signals(on_signal: Callable[[signal.Signals], None]) -> Iterator[None]:
    """Route SIGINT and SIGTERM to ``on_signal`` inside the block; the previous handlers come back
    after it. A repeated signal is routed too rather than cutting the step short: under ``--nproc``
    each rank gets Ctrl-C twice (from the terminal, then forwarded by the launcher), and both must
    lead to the checkpoint. Outside the main thread the signals are left alone."""
    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        on_signal(signal.Signals(signum))

    previous: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

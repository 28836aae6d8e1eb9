"""Ctrl-C in the ``ssvi`` command never lands inside an import. Python raises KeyboardInterrupt wherever
the main thread is, and one raised while a module runs its own code (numpy's, torch's: imported as a
command first needs them) leaves the module half made in ``sys.modules``: the command then failed with
an error of that module ("module 'numpy' has no attribute 'matrix'", exit 1, a sweep's cell recorded as
failed), or went on and finished as if no Ctrl-C had come. Here a Ctrl-C that comes during an import
waits for it to end, then takes effect as any other: through whatever SIGINT handler is there by then
(training's, which writes a checkpoint; the default one, which ends the process). So does a SIGTERM
or SIGHUP that unwinds a command (:func:`held_back`). Only the command's process installs the Ctrl-C
handler (:func:`install`); the library leaves the signals to its caller."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from types import FrameType
from typing import Iterator, Optional

# Re-entrant: a second signal runs its handler in the main thread while the first one's holds the lock.
_lock = threading.RLock()
_pending: dict[int, float] = {}  # signals held back until their import ends (one of each), and since when
POLL_S = 0.01  # how often the import under way is looked at again
INSIST_S = 2.0  # the same signal again after this long acts at once: an import that never ends stays stoppable


def _importing(frame: Optional[FrameType]) -> bool:
    """Whether ``frame`` (a thread's innermost) runs inside an import: a module's code, or the
    machinery finding and loading it."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _deliver(signum: int) -> None:
    """Once the main thread is out of its imports, send the signal held back to this process again."""
    main = threading.main_thread().ident
    while True:
        time.sleep(POLL_S)
        frame = sys._current_frames().get(main)  # type: ignore[arg-type]
        if frame is None or not _importing(frame):
            break
        del frame
    with _lock:
        if signum in _pending and frame is not None:
            del _pending[signum]
            if os.name == "nt":  # where os.kill of any other signal than a console's events ends the process
                import _thread

                _thread.interrupt_main(signum)
            else:  # the system's signal: it also wakes a main thread that sleeps or waits
                os.kill(os.getpid(), signum)


def held_back(signum: int) -> bool:
    """For a signal handler to ask first: whether the signal came while an import is under way, in
    which case it is sent again once the import ends, and the handler returns at once. The same signal
    again, :data:`INSIST_S` after the first was held, is not held: it acts in the import (a hung one)."""
    if not _importing(sys._getframe(1)):  # the handler's caller: the code the signal came in
        return False
    with _lock:
        first = signum not in _pending
        if not first and time.monotonic() - _pending[signum] > INSIST_S:
            del _pending[signum]
            return False
        _pending.setdefault(signum, time.monotonic())
    if first:  # outside the lock: a signal that comes while the thread starts finds it held, and returns
        threading.Thread(target=_deliver, args=(signum,), name="ssvi-held-signal", daemon=True).start()
    return True


def _interrupt(signum: int, frame: Optional[FrameType]) -> None:  # noqa: ARG001
    """The SIGINT handler: KeyboardInterrupt, as Python's own, once no import is under way."""
    if not held_back(signum):
        raise KeyboardInterrupt


_interrupt.ssvi_ctrl_c = True  # type: ignore[attr-defined]  # Ctrl-C's own behaviour otherwise: see distributed


def install() -> None:
    """Hold a Ctrl-C back while an import is under way, in this process's main thread; where SIGINT
    is Python's own (not where it is ignored, as in a job a script ran in the background)."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)


def take_pending() -> None:
    """At a point with no import under way: a Ctrl-C held back meanwhile raises KeyboardInterrupt now."""
    with _lock:
        if signal.SIGINT in _pending:
            del _pending[signal.SIGINT]
            raise KeyboardInterrupt


@contextmanager
def uninterrupted(active: bool = True) -> Iterator[None]:
    """A Ctrl-C in the block (where it raises KeyboardInterrupt in the main thread: Python's own SIGINT
    handler or :func:`install`'s) is raised once the block has ended, so that what it changes
    together (a support, its values and their optimizer state) is changed whole or not at all; a
    block that raises after the Ctrl-C came ends in the KeyboardInterrupt too, its exception the
    context. Elsewhere (another thread, a caller's own handler), and where not ``active``, the block
    runs as it is."""
    handler = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if not active or handler not in (signal.default_int_handler, _interrupt):
        yield
        return
    came: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        if came:  # also where the block raised: the Ctrl-C came first, and the block's exception is its context
            raise KeyboardInterrupt

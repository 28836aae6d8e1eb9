"""A time bound (SIGALRM, main thread) for tests whose failure mode would be a hang: the block
raises :class:`Hang` instead of blocking the suite."""

import signal
from contextlib import contextmanager


class Hang(AssertionError):
    pass


@contextmanager
def time_bound(seconds: float):
    def alarm(signum, frame):  # noqa: ARG001
        raise Hang(f"no answer within {seconds}s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

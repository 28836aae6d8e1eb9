"""A stall limit for the downloads ssvi starts (torchvision datasets, torch.hub weights).

Neither torchvision nor torch.hub passes a timeout to ``urlopen``, so a connection that stops
answering would hang a run forever. Inside :func:`stall_limit` every new socket gives up after
``SSVI_NETWORK_TIMEOUT`` seconds (default 60; ``0`` or ``none``: no limit) without data; a slow but
moving download is not limited. The error that follows is an ``OSError`` ("timed out"), which the
callers already turn into one line. The limit is the process's default socket timeout for the
duration of the block, so a socket another thread opens meanwhile gets it too.
"""

from __future__ import annotations

import math
import os
import socket
from contextlib import contextmanager
from typing import Iterator, Optional

DEFAULT_SECONDS = 60.0
VARIABLE = "SSVI_NETWORK_TIMEOUT"


class NetworkSettingError(ValueError):
    """``SSVI_NETWORK_TIMEOUT`` holds something that is not a number of seconds."""


def stall_seconds() -> Optional[float]:
    """``SSVI_NETWORK_TIMEOUT`` in seconds: unset or empty 60, ``0``/``none``/``off`` no limit (None)."""
    raw = os.environ.get(VARIABLE, "").strip()
    if not raw:
        return DEFAULT_SECONDS
    if raw.lower() in ("none", "off"):
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if value == 0:
        return None
    if not (0 < value < 1e9):  # socket timeouts overflow far below inf
        raise NetworkSettingError(f"{VARIABLE}={raw!r}: give the seconds a download may go without data "
                                  "(a positive number below 1e9), or 0 for no limit")
    return value


@contextmanager
def stall_limit() -> Iterator[None]:
    """Sockets opened inside the block time out after :func:`stall_seconds` without data."""
    seconds = stall_seconds()
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)

"""A stall limit for the downloads ssvi starts (torchvision datasets, torch.hub weights).

Neither torchvision nor torch.hub passes a timeout to ``urlopen``, so a connection that stops
answering would hang a run forever. Inside :func:`stall_limit` every new socket gives up after
``SSVI_NETWORK_TIMEOUT`` seconds (default 60) without data; a slow but moving download is not
limited. The error that follows is an ``OSError`` ("timed out"), which the callers already turn
into one line.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Iterator

DEFAULT_SECONDS = 60.0


def stall_seconds() -> float:
    """``SSVI_NETWORK_TIMEOUT`` in seconds (a positive number), else 60."""
    raw = os.environ.get("SSVI_NETWORK_TIMEOUT", "")
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_SECONDS
    return value if value > 0 else DEFAULT_SECONDS


@contextmanager
def stall_limit() -> Iterator[None]:
    """Sockets opened inside the block time out after :func:`stall_seconds` without data."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(stall_seconds())
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)

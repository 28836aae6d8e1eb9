"""Warnings said once: a folder is scanned more than once in one command, and a warning per image
would bury the others. "Once" holds within a scope (:func:`warnings_scope`): a whole command of the
CLI, or one call of the API that reads data, so that a notebook's second call of the same folder, or
a call on another folder, says its warnings again."""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator

_WARNED: set[tuple[str, str]] = set()  # the keys of the warnings given in this scope (warn_once)
_WARNED_LOCK = threading.Lock()
_DEPTH = [0]  # scopes open (warnings_scope): the outermost one begins with nothing said
_HELD = threading.local()  # a reading thread's warnings, held for its taker (held_warnings)
HeldWarning = tuple[logging.Logger, tuple[str, str], str, tuple[object, ...]]


def warn_once(logger: logging.Logger, key: tuple[str, str], message: str, *args: object) -> None:
    """``logger``'s warning, once a scope for ``key`` (a folder and what is said of it). In a thread
    inside :func:`held_warnings`, kept for the thread that takes its files instead."""
    if (held := getattr(_HELD, "warnings", None)) is not None:
        held.append((logger, key, message, args))
        return
    with _WARNED_LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    logger.warning(message, *args)


def warned(key: tuple[str, str]) -> bool:
    """Whether the warning of ``key`` was given in this scope (a check that costs a pass is skipped)."""
    return key in _WARNED


@contextmanager
def warnings_scope() -> Iterator[None]:
    """The span within which :func:`warn_once` says each warning once; the outermost one opened
    forgets the warnings of those before it. Also a decorator."""
    with _WARNED_LOCK:
        if _DEPTH[0] == 0:
            _WARNED.clear()
        _DEPTH[0] += 1
    try:
        yield
    finally:
        with _WARNED_LOCK:
            _DEPTH[0] -= 1


@contextmanager
def held_warnings(into: list[HeldWarning]) -> Iterator[None]:
    """This thread's :func:`warn_once` warnings go into ``into``: files read by several threads at
    once (``decoding.read_ahead``) are then said in the files' order, as one thread says them, not in
    the order the threads finish (the first image with transparent pixels is the one named)."""
    _HELD.warnings = into
    try:
        yield
    finally:
        _HELD.warnings = None

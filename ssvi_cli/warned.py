"""Warnings said once: a folder is scanned more than once in one command, and a warning per image
would bury the others. "Once" holds within a scope (:func:`warnings_scope`): a whole command of the
CLI, or one call of the API that reads data, so that a notebook's second call of the same folder, or
a call on another folder, says its warnings again. A scope is the caller's own (a context variable):
another thread's call opens its own, and threads that read for a call share its scope."""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional

_OUTSIDE: set[tuple[str, str]] = set()  # the keys of the warnings given outside any scope: once a process
_SCOPE: ContextVar[Optional[set[tuple[str, str]]]] = ContextVar("ssvi_warned", default=None)  # a scope's keys
_WARNED_LOCK = threading.Lock()
_HELD = threading.local()  # a reading thread's warnings, held for its taker (held_warnings)
HeldWarning = tuple[logging.Logger, tuple[str, str], str, tuple[object, ...]]


def _given() -> set[tuple[str, str]]:
    scope = _SCOPE.get()
    return _OUTSIDE if scope is None else scope


def warn_once(logger: logging.Logger, key: tuple[str, str], message: str, *args: object) -> None:
    """``logger``'s warning, once a scope for ``key`` (a folder and what is said of it). In a thread
    inside :func:`held_warnings`, kept for the thread that takes its files instead."""
    if (held := getattr(_HELD, "warnings", None)) is not None:
        held.append((logger, key, message, args))
        return
    with _WARNED_LOCK:
        given = _given()
        if key in given:
            return
        given.add(key)
    logger.warning(message, *args)


def warned(key: tuple[str, str]) -> bool:
    """Whether the warning of ``key`` was given in this scope (a check that costs a pass is skipped)."""
    return key in _given()


@contextmanager
def warnings_scope() -> Iterator[None]:
    """The span within which :func:`warn_once` says each warning once: the outermost one opened in
    this context begins with nothing said; one inside it adds to it. Also a decorator."""
    if _SCOPE.get() is not None:
        yield
        return
    token = _SCOPE.set(set())
    try:
        yield
    finally:
        _SCOPE.reset(token)


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

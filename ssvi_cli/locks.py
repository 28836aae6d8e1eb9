"""Advisory locks between ssvi processes: a run's, a sweep's, a sweep cell's (``flock``, dropped by the
system when their holder exits, however it exits)."""

from __future__ import annotations

import errno
import logging
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager

from ssvi_cli.fileio import UnwritablePath
from ssvi_cli.warned import warn_once

logger = logging.getLogger(__name__)
_UNLOCKED_SAID: list[bool] = []  # the warning that a system without flock locks nothing was given


class Locked(RuntimeError):
    """Another process holds the lock; ``holder`` is its process id as it wrote it ("?" if unknown)."""

    def __init__(self, holder: str) -> None:
        super().__init__(f"held by process {holder}")
        self.holder = holder


def acquire_lock(lock_path: Path, what: str, shared: bool = False, wait: bool = False) -> ContextManager[Any]:
    """An advisory ``flock`` on ``lock_path`` (made, with its folder, as needed; our process id written
    in it), held until the returned context ends; :class:`Locked` if another process holds it
    (``shared``: a lock that other shared holders may hold too, and that keeps out only an exclusive
    one; no process id is written, and ``Locked.holder`` is "?"; ``wait``: for a lock held a moment,
    waits until its holder lets it go instead). The
    system drops it when its holder exits, however it exits. Without ``fcntl`` (Windows), or on a file
    system that has no locks (Lustre or NFS mounted without them), nothing is locked: a warning says so
    and the work goes on. ``what`` names the lock in the error when it cannot be written
    (:class:`UnwritablePath`)."""
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows): said once per process, as a sweep takes many locks
        if not _UNLOCKED_SAID:
            _UNLOCKED_SAID.append(True)
            logger.warning("%s is not locked: this system has no flock (Windows), so nothing stops a second "
                           "process from writing there meanwhile (nor in other runs' folders)", lock_path.parent)
        return nullcontext()
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        # Never through a link: a lock file planted as one would have its target emptied for our id.
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        fh = os.fdopen(fd, "r+", encoding="utf-8")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnwritablePath(exc.errno, f"cannot write {what} {lock_path}: it is a symbolic link, which ssvi "
                                            "does not follow (remove it)") from None
        raise UnwritablePath(exc.errno, f"cannot write {what} {lock_path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        fh.seek(0)
        holder = (fh.read().strip() or "?") if not shared else "?"
        fh.close()
        raise Locked(holder) from None
    except OSError as exc:  # ENOSYS, ENOLCK, EOPNOTSUPP: locks are not to be had here
        fh.close()
        warn_once(logger, (str(lock_path.parent), "takes no locks"),  # once a command: a sweep takes several there
                  "%s is not locked: its file system takes no locks (%s), so nothing stops a second process from "
                  "writing there meanwhile", lock_path.parent, exc.strerror or exc)
        return nullcontext()
    if not shared:
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
    return fh  # closing it releases the lock


def lock_holder(lock_path: Path) -> str | None:
    """The process id (as written; "?" if unknown) of another process holding ``lock_path`` alone
    (:func:`acquire_lock`), or None: free, missing, or on a system without locks. Changes nothing."""
    try:
        import fcntl

        fh = open(lock_path, encoding="utf-8")
    except (ImportError, OSError):
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return fh.read().strip() or "?"
        except OSError:
            return None
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None

"""Atomic file writes: a temporary file in the same folder, flushed, fsynced and renamed."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

logger = logging.getLogger(__name__)


class UnwritablePath(OSError):
    """The folder of a file to write cannot be made or written to (read-only, no permission, a file
    where a folder should be). The message names the file asked for, not the temporary file."""

    def __str__(self) -> str:
        return str(self.strerror)


def check_writable(folder: Path, flag: str) -> None:
    """Refuse a folder (or, while it is missing, the nearest folder above it that it would be made
    in) that takes no new file, so that it is reported before the work whose result would go there.
    Asks the system (``os.access``) and changes nothing; a refusal the system only gives on writing
    (some special file systems) is still named by :func:`atomic_path`."""
    existing = _nearest_existing(Path(folder))
    if not existing.is_dir():
        raise UnwritablePath(errno.ENOTDIR, f"{flag}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        raise UnwritablePath(errno.EROFS if read_only else errno.EACCES, f"{flag}: cannot write into {existing}: "
                             + ("Read-only file system" if read_only else "Permission denied"))


def _nearest_existing(folder: Path) -> Path:
    """``folder``, or while it is missing the nearest path above it that exists (a folder, or a file
    where a folder of the path should be)."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def denied(exc: PermissionError) -> str:
    """A refusal by the system's permissions as one line: the path it names and, where one is on its
    way, the folder this user may not enter (a path below another user's private folder, say)."""
    if not exc.filename:
        return str(exc)
    name = os.fsdecode(exc.filename)
    if exc.filename2:  # a rename or a link: both paths, the one refused unknown
        name = f"{name} -> {os.fsdecode(exc.filename2)}"
        return f"{name}: {exc.strerror or 'Permission denied'}"
    path, closed = Path(os.path.abspath(name)), None
    for folder in reversed(path.parents):  # from the root down: the first one that cannot be entered
        try:
            if folder.is_dir() and not os.access(folder, os.X_OK):
                closed = folder
                break
        except OSError:
            break
    where = f" (this user may not enter {closed})" if closed is not None else ""
    return f"{name}: {exc.strerror or 'Permission denied'}{where}"


def looked_in(path: Path) -> str:
    """Where a relative ``path`` that is not there was looked for, for a message: `` in CWD (relative
    paths are read from the folder ssvi runs in)``; nothing for an absolute one."""
    return "" if Path(path).expanduser().is_absolute() else \
        f" in {Path.cwd()} (relative paths are read from the folder ssvi runs in)"


def is_entry(path: Path, name: str) -> bool:
    """Whether ``path`` is its folder's entry ``name``: by that very name, or by another case of it on
    a disk that ignores case (macOS's and Windows' by default), where ``Config.yaml`` is
    ``config.yaml``. On a disk that keeps case (Linux's) the two are different entries."""
    path = Path(path)
    if path.name == name:
        return True
    if path.name.casefold() != name.casefold():
        return False
    try:
        return os.path.samefile(path, path.with_name(name))
    except OSError:  # one of them is missing: a different entry, unless the system ignores case
        return not sys.platform.startswith("linux")


def _cannot_write(path: Path, exc: OSError) -> UnwritablePath:
    return UnwritablePath(exc.errno, f"cannot write {path}: {exc.strerror or exc}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    A crash or kill before the rename leaves any previous file at ``path`` untouched. A symbolic link
    at ``path`` is replaced; a user's output is written through its link by passing the target
    (``cli.common.check_output_file`` returns it, once checked).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The name cut to 100 bytes: a legal name of up to 255 with the temporary's additions is not.
        short = path.name
        while len(os.fsencode(short)) > 100:
            short = short[:-1]
        fd, tmp = tempfile.mkstemp(prefix=f".{short}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        try:
            above: Optional[Path] = _nearest_existing(path.parent)
            above = above if above.exists() and not above.is_dir() else None  # a file where a folder should be
        except OSError:  # a folder above that cannot be searched: the error as the system gave it
            above = None
        if above is not None:
            raise UnwritablePath(errno.ENOTDIR, f"cannot write {path}: {above} is a file, not a folder") from exc
        raise _cannot_write(path, exc) from exc
    tmp_path = Path(tmp)
    try:
        os.close(fd)
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())  # where a network or delayed-allocation file system reports a full disk
        except Exception as exc:  # noqa: BLE001 - re-raised, or said plainly when the disk is full
            full = _disk_full(path, exc)
            if full is None:
                raise
            raise full from exc
        # mkstemp and safetensors create 0600: the mode of the file replaced (0600 stays so), else the usual
        try:
            mode = path.stat().st_mode & 0o7777 if path.is_file() and not path.is_symlink() else 0o666 & ~_umask()
        except OSError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp_path, mode)
        try:
            os.replace(tmp_path, path)
        except OSError as exc:  # a folder of that name, say: named as asked, not by the temporary file
            raise _cannot_write(path, exc) from exc
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


FULL_BELOW = 16 << 20  # bytes free under which a failed write is put down to a full disk


def _disk_full(path: Path, exc: BaseException) -> UnwritablePath | None:
    """A writer's failure as "no space left" (or "disk quota exceeded"), naming the file, when it is
    one: ENOSPC or EDQUOT, or an I/O error of the writers (an OSError, torch's bare RuntimeError
    ``unexpected pos``, safetensors' SafetensorError) with almost nothing left free there. Anything
    else (a stop signal's exception, a bug) is left as it is."""
    import shutil

    if isinstance(exc, OSError) and exc.errno == errno.EDQUOT:
        return UnwritablePath(errno.EDQUOT, f"cannot write {path}: disk quota exceeded; the previous {path.name}, "
                                            "if any, is unchanged")
    said = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    writer = isinstance(exc, OSError) or type(exc) is RuntimeError or type(exc).__name__ == "SafetensorError"
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if not said and not (writer and free is not None and free < FULL_BELOW):
        return None
    left = f", {free:,} bytes free there" if free is not None else ""
    return UnwritablePath(errno.ENOSPC, f"cannot write {path}: no space left on the device ({brief(exc)}{left}); "
                                        f"the previous {path.name}, if any, is unchanged")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def json_default(obj: Any) -> Any:
    """JSON for tensors and numpy values: lists for arrays, plain numbers for scalars."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def json_ready(obj: Any) -> Any:
    """A copy that standard JSON can hold: numpy scalars and arrays as Python values, NaN and
    infinities as None (``null``; Python's ``NaN`` token is not JSON and breaks other parsers)."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if hasattr(obj, "tolist") and type(obj) not in (int, float, bool):  # numpy and torch values
        return json_ready(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def compact_json(obj: Any) -> str:
    """``obj`` as one line of standard JSON (no spaces; NaN and infinities as null)."""
    return json.dumps(json_ready(obj), separators=(",", ":"), default=json_default, allow_nan=False)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(json_ready(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line by a single write, complete or absent (binary: Windows' text mode adds \\r)."""
    line = (compact_json(record) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        size = os.fstat(fd).st_size  # not os.pread, which Windows lacks; O_APPEND writes at the end after lseek
        if size and os.lseek(fd, size - 1, os.SEEK_SET) >= 0 and os.read(fd, 1) != b"\n":
            line = b"\n" + line  # after a torn line (a crash mid-write) start a line of our own
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read complete JSON lines; a torn last line (from a crash) is skipped, and any other line that is
    not a JSON record is skipped with a warning naming it (what is read from the rest leaves it out)."""
    out: list[dict[str, Any]] = []
    if not Path(path).exists():
        return out
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    bad = []
    for number, raw in enumerate(lines, 1):
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            out.append(record)
        elif raw.strip() and number < len(lines):  # the last line may be one a crash cut short
            bad.append(number)
    if bad:
        which = f"line {bad[0]} is not a JSON record and is" if len(bad) == 1 else \
            f"lines {bad[0]} and {len(bad) - 1} more are not JSON records and are"
        logger.warning("%s: %s passed over; what is read from the file leaves them out", path, which)
    return out


def visible_entries(folder: Path) -> list[Path]:
    """The entries directly under ``folder``, sorted, without hidden ones (``.DS_Store``, locks)."""
    return sorted(p for p in Path(folder).iterdir() if not p.name.startswith("."))


def not_ours(folder: Path, entries: list[Path], kind: str) -> str:
    """The refusal for an ``--out`` that holds ``entries`` but is not a ``kind`` ("run", "sweep")."""
    more = " and more" if len(entries) > 1 else ""
    return (f"--out {folder} holds {entries[0].name}{more} and is not a {kind} folder; choose another --out "
            f"(--force replaces only a {kind})")


def remove_entries(folder: Path, names: Iterable[str]) -> None:
    """Remove the files and folders ``names`` directly under ``folder``; missing ones are fine.
    Everything else in ``folder`` stays: replacing a run or a sweep never deletes what it did not
    write."""
    import shutil

    for name in names:
        path = Path(folder) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def plain(text: str) -> str:
    """``text`` without ANSI colour codes (torch colours some advice in its messages)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def brief(error: BaseException | str, limit: int = 160) -> str:
    """What a reader (torch, safetensors, a model's forward) said, as one line for our own message:
    its first line, cut at the last sentence end within ``limit`` characters, else at a word with
    "...", rather than mid-word; the exception's type name when it said nothing; without colour
    codes (:func:`plain`)."""
    text = plain(str(error)).strip()
    if not text:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    line = text.splitlines()[0].strip()
    if len(line) <= limit:
        return line
    head = line[:limit]
    end = head.rfind(". ")
    if end >= limit // 3:
        return head[:end + 1]
    return (head[:head.rfind(" ")] if " " in head else head).rstrip(",;:.") + "..."

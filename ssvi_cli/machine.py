"""What the machine has: memory as Linux reports it (elsewhere nothing is known, and nothing is checked)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Optional

MEMINFO = "/proc/meminfo"
SELF_STATUS = "/proc/self/status"


def meminfo_bytes(path: str, key: str) -> Optional[int]:
    """The ``key:`` line of a Linux ``/proc`` status file, in bytes (None where there is none)."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory() -> Optional[int]:
    """Bytes the system can give without swapping (``MemAvailable``); None where it is not reported."""
    return meminfo_bytes(MEMINFO, "MemAvailable")


def short_of_memory(need: int) -> Optional[int]:
    """The bytes the system has available where ``need`` bytes would not fit in them; None where they
    fit or it does not say (nothing is then checked)."""
    available = available_memory()
    return None if available is None or need <= available else available


def own_memory() -> Optional[int]:
    """This process's resident size in bytes; None where it is not reported."""
    return meminfo_bytes(SELF_STATUS, "VmRSS")


def shell_quote(word: str) -> str:
    """``word`` as one word of a command line to paste: POSIX shell quoting, or on Windows double
    quotes around a word with anything but letters, digits and ``_-.:\\/=+@~`` in it (cmd.exe keeps
    single quotes as part of a path; in double quotes its ``&|<>^`` and spaces are plain text, though
    ``%NAME%`` still expands there, as ``$name`` does in PowerShell's)."""
    if sys.platform == "win32":
        import re

        return word if re.fullmatch(r"[\w\-.:\\/=+@~]+", word, re.ASCII) else '"' + word.replace('"', '\\"') + '"'
    import shlex

    return shlex.quote(word)


def given_path(path: Path) -> Path:
    """A path to read as given on a command line, its ``~`` expanded where the shell left it (quoted,
    or after ``=``) and nothing of that literal name exists, as ``--init-from`` and ``--preset`` read it."""
    if not str(path).startswith("~") or path.exists():
        return path
    try:
        return path.expanduser()
    except RuntimeError:  # ~nosuchuser, or a file named ~x.png: as given, for its own error
        return path


def path_word(path: object) -> str:
    """A path as a word of a command line to paste: ``./-x`` for ``-x``, which would read as an option."""
    text = str(path)
    return f"./{text}" if text.startswith("-") else text


def quote_path(path: object) -> str:
    """:func:`path_word`, quoted (:func:`shell_quote`)."""
    return shell_quote(path_word(path))


def shell_join(words: Iterable[str]) -> str:
    """``words`` as a command line to paste (:func:`shell_quote`)."""
    return " ".join(shell_quote(w) for w in words)


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name"), or the platform's processor string."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

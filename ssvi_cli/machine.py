"""What the machine has: memory as Linux reports it (elsewhere nothing is known, and nothing is checked)."""

from __future__ import annotations

from typing import Optional

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


def own_memory() -> Optional[int]:
    """This process's resident size in bytes; None where it is not reported."""
    return meminfo_bytes(SELF_STATUS, "VmRSS")

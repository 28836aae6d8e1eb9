"""The parser of the commands' whole-number options that have a bound (``--jobs``, ``--seed``, ...).

Click's ``IntRange`` showed its range beside the metavar, ``<int range> [x>=1]``: a column that took
a fifth of ``--help`` at 80 columns, so that words in the help text were cut. The metavar is
``<int>`` and the bound is said by the error, in one line as ssvi's checks of a value say it."""

from __future__ import annotations

from typing import Callable, Optional

from ssvi_cli.cli.common import UsageError


def whole(flag: str, least: int, most: Optional[int] = None) -> Callable[[str], int]:
    """A parser of ``flag``'s value: a whole number from ``least`` to ``most`` (no limit if None)."""
    def read(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise UsageError(f"{flag} {text}: give a whole number") from None
        if value < least or (most is not None and value > most):
            bound = f"from {least} to {most}" if most is not None else f"{least} or more"
            raise UsageError(f"{flag} {text}: give a whole number {bound}")
        return value
    read.__name__ = flag.lstrip("-").replace("-", "_")
    return read

"""Type checks of the Python API's numeric arguments: a wrong type is one ``TypeError`` naming the
argument, before a comparison deep inside would fail with ``'<=' not supported ...``; and
:func:`has_control` and :func:`printable`, for a name ssvi prints or writes on one line."""

from __future__ import annotations

import math
import numbers


def real(name: str, value: object, *, finite: bool = True) -> float:
    """``value`` as a float: a Python or numpy number, or a one-element tensor (a learning rate or
    a KL weight kept in a tensor); a bool, a string, None or a larger tensor is refused, as is inf or
    NaN unless ``finite`` is False."""
    number = None
    if not isinstance(value, (bool, str, bytes)):
        if isinstance(value, numbers.Real):
            number = float(value)
        elif hasattr(value, "__float__") and getattr(value, "numel", lambda: 0)() == 1:
            number = float(value)  # type: ignore[arg-type]
    if number is None:
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if finite and not math.isfinite(number):
        raise ValueError(f"{name}={number} must be finite")
    return number


def whole(name: str, value: object) -> int:
    """``value`` as an int (numpy integers too); a float (2.5, or 3.0), a bool or anything else not
    integral is refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def has_control(text: str) -> bool:
    """Whether ``text`` holds a control character (C0, DEL or C1: a newline, a terminal escape), which
    a name ssvi prints or writes on one line must not."""
    return any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)


def printable(text: str) -> str:
    """``text`` with each control character written as its escape (``\\x1b``, ``\\n``): a file name's
    terminal escape sequence printed in a table is shown, not run by the terminal."""
    if not has_control(text):
        return text
    return "".join(c.encode("unicode_escape").decode("ascii") if has_control(c) else c for c in text)

"""Type checks of the Python API's numeric arguments: a wrong type is one ``TypeError`` naming the
argument, before a comparison deep inside would fail with ``'<=' not supported ...``."""

from __future__ import annotations

import math
import numbers


def real(name: str, value: object, *, finite: bool = True) -> float:
    """``value`` as a float; a bool, a string, a tensor or None is refused, as is inf or NaN
    unless ``finite`` is False."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name}={value} must be finite")
    return value


def whole(name: str, value: object) -> int:
    """``value`` as an int; a float (2.5, or 3.0), a bool or anything else not integral is refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)

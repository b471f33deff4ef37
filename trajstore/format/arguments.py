"""Checks of Python API arguments: the wrong type or range is one trajstore error, never a silent
conversion ("11" -> 11, "36" -> (3, 6), 5.5 -> 5) and never a raw TypeError from deep inside."""

from __future__ import annotations

import math
import numbers
import operator

from ..errors import OutOfRangeError, TrajstoreError


def short_repr(x, limit: int = 60) -> str:
    """repr for messages: a hostile value can be megabytes long."""
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def integer(x, name: str, where=None) -> int:
    """x as an int if it is one (Python or numpy integers; not bool, float or str)."""
    if isinstance(x, bool):
        raise TrajstoreError(f"{name}={x!r} must be an integer", where)
    try:
        return operator.index(x)
    except TypeError:
        raise TrajstoreError(f"{name}={short_repr(x)} must be an integer, not {type(x).__name__}", where) from None


def integers(xs, name: str, where=None) -> tuple[int, ...]:
    """A sequence of integers; a string is refused rather than read digit by digit."""
    if isinstance(xs, (str, bytes)) or not hasattr(xs, "__iter__"):
        raise TrajstoreError(f"{name}={short_repr(xs)} must be a sequence of integers, e.g. (6, 25)", where)
    return tuple(integer(x, name, where) for x in xs)


def real(x, name: str, where=None) -> float:
    """x as a finite float if it is a real number (not bool or str; a one-element tensor is accepted)."""
    if x.__class__ is float and math.isfinite(x):  # the usual call, answered without the checks below (hot in `at`)
        return x
    if hasattr(x, "numel") and hasattr(x, "item") and x.numel() == 1 and not x.dtype.is_complex:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise OutOfRangeError(f"{name}={short_repr(x)} must be a real number, not {type(x).__name__}", where)
    try:
        value = float(x)
    except OverflowError:  # an int beyond float range, e.g. 10**400
        value = math.inf
    if not math.isfinite(value):
        raise OutOfRangeError(f"{name}={short_repr(x)} must be a finite number", where)
    return value

"""One spelling per rule for checking a value the user gave (a config key, a flag, a function argument).

Each check returns the value or raises ``UserError`` with one line naming the key, the value and what is
valid. Messages come in the house's two layouts, both kept as users and tests know them:
``key=value must be ...`` (the default) and ``key: must be ..., got value`` (``got=True``, the data modules').
A bool is never a number here: ``batch_size: true`` is a config mistake, not 1.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable
from typing import Any

from lightning_lora.errors import UserError

INTERVALS = ("[0, 1)", "(0, 1]", "[0, 1]", "(0, 1)")


def _fail(key: str, value: Any, rule: str, got: bool) -> UserError:
    if got:
        return UserError(f"{key}: must be {rule}, got {value!r}")
    return UserError(f"{key}={value!r} must be {rule}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(value: Any, key: str, *, hint: str = "", got: bool = False, whole_floats: bool = False) -> int:
    """``value`` as an int > 0. ``hint`` follows the rule as written (``" (e.g. 8)"``, ``" or null"``);
    ``whole_floats`` also takes a whole float (``4.0`` -> 4), as adapter ranks from YAML may come."""
    whole = _is_int(value) or (whole_floats and isinstance(value, float) and value.is_integer())
    if not whole or value <= 0:
        raise _fail(key, value, "a positive integer" + hint, got)
    return int(value)


def optional_positive_int(value: Any, key: str, *, hint: str = "", got: bool = False) -> int | None:
    """None (not set), or ``value`` checked by :func:`positive_int`."""
    return None if value is None else positive_int(value, key, hint=hint, got=got)


def non_negative_int(value: Any, key: str, *, got: bool = False) -> int:
    """``value``, an int >= 0."""
    if not _is_int(value) or value < 0:
        raise _fail(key, value, "a non-negative integer", got)
    return value


def finite(value: Any, key: str, *, hint: str = "", got: bool = False) -> float:
    """``value``, a finite number (a scale, a weight, a threshold): NaN and +-Inf are refused."""
    if not _is_number(value) or not math.isfinite(value):
        raise _fail(key, value, "a finite number" + hint, got)
    return float(value)


def fraction(value: Any, key: str, *, interval: str = "[0, 1)", hint: str = "", got: bool = False) -> float:
    """``value``, a number in ``interval`` (one of ``INTERVALS``: a square bracket includes its end)."""
    if interval not in INTERVALS:
        raise ValueError(f"interval {interval!r} is not one of {INTERVALS}")  # a caller's bug, not the user's
    low_open, high_open = interval.startswith("("), interval.endswith(")")
    inside = _is_number(value) and (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not inside:  # NaN is never inside
        # the ``got`` layout names the kind of value before the interval ("a number in [0, 1)")
        raise _fail(key, value, ("a number in " if got else "in ") + interval + hint, got)
    return value


def choice(value: Any, key: str, valid: Iterable[str], *, also: Iterable[str] = (), hint: str = "") -> Any:
    """``value`` when it is one of ``valid``. ``also`` names values the caller takes before asking (``null``,
    ``auto``): they are listed first; ``hint`` follows the list as written."""
    valid = tuple(valid)
    if value not in valid:
        raise UserError(f"{key}={value!r} is unknown; valid: {', '.join((*also, *valid))}{hint}")
    return value


def _bounds(low: float | None, low_open: bool, high: float | None, high_open: bool) -> str:
    """`` > 0``, `` in [0, 1)``, ``""`` (no bound): the bounds as a rule's words say them."""
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {_num(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {_num(high)}"
    return ""


def _num(value: float) -> str:
    """An int as written (4294967295), a float as short as it reads (0.5)."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def number(value: Any, key: str, *, low: float | None = None, low_open: bool = False, high: float | None = None,
           high_open: bool = False, hint: str = "") -> float:
    """``value``, a finite number (never a bool, a string, NaN or an infinity) within the bounds given: ``low``
    and ``high`` are included unless ``low_open`` / ``high_open``."""
    inside = _is_number(value) and math.isfinite(value)
    if inside and low is not None:
        inside = value > low if low_open else value >= low
    if inside and high is not None:
        inside = value < high if high_open else value <= high
    if not inside:
        raise _fail(key, value, "a finite number" + _bounds(low, low_open, high, high_open) + hint, False)
    return value


def integer(value: Any, key: str, *, low: int | None = None, high: int | None = None, also: Iterable[int] = (),
            hint: str = "") -> int:
    """``value``, an int in ``[low, high]`` (either end open-ended when None), or one of ``also`` (``-1`` for
    'no limit')."""
    also = tuple(also)
    if _is_int(value) and value in also:
        return value
    inside = _is_int(value) and (low is None or value >= low) and (high is None or value <= high)
    if not inside:
        rule = (" or ".join(map(str, also)) + " or " if also else "") + "an integer" + _bounds(low, False, high, False)
        raise _fail(key, value, rule + hint, False)
    return value


def boolean(value: Any, key: str, *, hint: str = "") -> bool:
    """``value``, a bool (``true``/``false`` in YAML): a string such as ``'no'`` would count as true."""
    if not isinstance(value, bool):
        raise _fail(key, value, "true or false" + hint, False)
    return value


def dotted_function(path: Any) -> Callable[..., Any] | None:
    """The callable a dotted path names (``package.module.function``, or a class's method below its module), or
    None when ``path`` is not such a path or does not import."""
    if not isinstance(path, str) or "." not in path:
        return None
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):  # the longest importable module prefix, then attributes
        try:
            found: Any = importlib.import_module(".".join(parts[:split]))
        except Exception:
            continue
        try:
            for name in parts[split:]:
                found = getattr(found, name)
        except AttributeError:
            return None
        return found if callable(found) else None
    return None

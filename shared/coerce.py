"""Text to bool, int and float, one way for every setting, training parameter and blob metadata key.

Settings and blob metadata arrive as text, sidecars as JSON; all of them mean the same thing by
"yes" or "7": a value that is neither clearly true nor clearly false is an error, never a silent
False, and a number that would lose its fraction is refused.
"""

from __future__ import annotations

import math
from typing import Any

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def to_bool(value: Any) -> bool:
    """ValueError unless ``value`` is a bool or one of TRUE / FALSE (any case, spaces ignored)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ValueError(f"{value!r} is neither true ({', '.join(TRUE)}) nor false ({', '.join(FALSE)})")


def to_int(value: Any) -> int:
    """ValueError for a bool or a number with a fraction (2.5), else the integer (from "7", 7 or 7.0)."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{value!r} is not a whole number")
    return int(str(value).strip()) if isinstance(value, str) else int(value)


def to_float(value: Any) -> float:
    """ValueError for a bool, a non-number or NaN / infinity, else the number."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    number = float(str(value).strip()) if isinstance(value, str) else float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


def to_kind(kind: type, value: Any) -> Any:
    """``value`` as ``kind`` (bool, int, float or str), by the rules above."""
    if kind is bool:
        return to_bool(value)
    if kind is int:
        return to_int(value)
    if kind is float:
        return to_float(value)
    return str(value)

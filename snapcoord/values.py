"""Checked values from what snapcoord reads back (journal, last run, inventory, freeze state,
the arm record): a JSON number is used only when it is a real number within its bounds. JSON
has no integer type of its own, booleans are integers to Python, and NaN, infinities and 1e300
parse fine: each reader asks here instead of checking by hand."""

from __future__ import annotations

import math
from typing import Any

#: the largest epoch second believed (the year 5138): larger is a corrupt file
MAX_EPOCH = 1e11


def number(value: Any, low: float, high: float) -> float | None:
    """``value`` as a float when it is a finite number (not a boolean) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    result = float(value)
    return result if math.isfinite(result) and low <= result <= high else None


def integer(value: Any, low: int, high: int) -> int | None:
    """``value`` when it is an integer (not a boolean, not 3.0) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if low <= value <= high else None

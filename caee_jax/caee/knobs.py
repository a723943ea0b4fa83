"""Range checks for pruning-rule knobs: NaN compares false with everything, so a plain `value < low` test
would let it through (and prune nothing, or everything)."""

from __future__ import annotations

import math


def check_number(what: str, value, low: float, high: float) -> None:
    """Raises ValueError unless `value` is a finite number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        bounds = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise ValueError(f"{what} must be a finite number {bounds}, got {value}")


def check_slots(what: str, value) -> None:
    """Raises ValueError unless `value` is a whole number of top-k slots >= 0."""
    check_number(what, value, 0, math.inf)
    if value != int(value):
        raise ValueError(f"{what} must be a whole number of slots, got {value}")

"""What a bench prints of several runs."""

from __future__ import annotations

import statistics

__all__ = ["spread"]


def spread(values: list[float]) -> dict[str, float]:
    """Min, median and max of ``values``, to four decimals."""
    return {
        "min": round(min(values), 4),
        "median": round(statistics.median(values), 4),
        "max": round(max(values), 4),
    }

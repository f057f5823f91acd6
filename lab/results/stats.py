"""Percentiles as every report of the lab gives them."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p90, p99 (linear interpolation), mean and max of `values`; all None when empty."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    xs = sorted(values)

    def pct(p: float) -> float:
        k = (len(xs) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {
        "p50": round(pct(0.5), 6),
        "p90": round(pct(0.9), 6),
        "p99": round(pct(0.99), 6),
        "mean": round(sum(xs) / len(xs), 6),
        "max": round(xs[-1], 6),
    }

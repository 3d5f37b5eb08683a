"""Latency percentiles (nearest-rank, so every reported value was actually observed)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (``pct`` in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float | int]:
    """p50/p95/p99/max/mean of latencies in milliseconds, rounded for reading."""
    values = sorted(latencies_ms)
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "p50": round(percentile(values, 50), 2),
        "p95": round(percentile(values, 95), 2),
        "p99": round(percentile(values, 99), 2),
        "max": round(values[-1], 2),
        "mean": round(sum(values) / len(values), 2),
    }

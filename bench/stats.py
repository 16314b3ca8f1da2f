"""Percentiles and medians, the only statistics the bench reports."""

from __future__ import annotations

import statistics
from typing import Iterable, Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank on the sorted values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))
    return float(ordered[rank])


def p50_p99(values: Sequence[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99)}


def median_of(runs: Iterable[dict[str, float]]) -> dict[str, float]:
    """Key by key, the median over repetitions."""
    runs = list(runs)
    return {key: float(statistics.median(run[key] for run in runs)) for key in runs[0]} if runs else {}

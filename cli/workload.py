"""What ``raftkv demo`` and the benchmarks share: percentiles, and this
process's CPU time."""

from __future__ import annotations

import math
import resource
from collections.abc import Sequence


def process_cpu_s() -> float:
    """CPU seconds this process has used (user and system, every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: Sequence[float], q: float) -> float:
    """The value at rank ``int(q * n)`` of the sorted values (q in [0, 1]); NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

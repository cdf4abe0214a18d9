"""What ``raftkv demo`` and the benchmarks share: percentiles, this
process's CPU time, and the commit a report was measured at."""

from __future__ import annotations

import math
import resource
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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


def code_version() -> dict[str, Any]:
    """The git commit the code runs from, and whether the tree has changes
    (None when this is not a git checkout)."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True)
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                 cwd=root, capture_output=True, text=True, timeout=10,
                                 check=True)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(changes.stdout.strip())}

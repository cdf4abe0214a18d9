"""jepsen-lite: raftkv's consistency harness.

This package currently holds the history model (`history`), readers for the
conformance formats (`formats`, `edn`) and the linearizability checker
(`checker`). The `jepsen-lite` command is in `cli`.
"""

from jepsen_lite.history import (
    UNKNOWN,
    Event,
    History,
    HistoryError,
    Operation,
    pair_operations,
)

__all__ = ["UNKNOWN", "Event", "History", "HistoryError", "Operation", "pair_operations"]

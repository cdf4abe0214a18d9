"""The garbage collector of a serving process (a node, a shard manager): how
it is tuned, and what its pauses cost.

CPython's collector stops every thread of the process while it runs: the
Raft hub, trio, every group. At its default first threshold (700 allocations
of container objects), a busy node runs a young collection every few hundred
requests, and the objects a request keeps for a few milliseconds (a proposed
command, its future, its reply) are promoted before they die; they pile up in
the oldest generation, which is then collected every one or two seconds, for
10-15 ms each on a leader of one group under 64 clients. With the first
threshold at 10,000, most of those objects die young: the same leader ran one
full collection instead of 15 in a 25 s run, and at 64 clients (workload A,
one shard) p99 latency fell from 16.8-17.2 ms to 12.7-14.1 ms and throughput
rose 9 %; at 8 shards neither moved beyond the noise (docs/PERFORMANCE.md).
``gc.freeze()`` after start-up also keeps the modules and configuration out of
every later full collection.

``CollectorStats`` records each collection's pause through ``gc.callbacks``,
for the node's and the manager's status.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

GC_THRESHOLDS = (10_000, 20, 10)
"""Allocations before a young collection; young collections before a middle
one; middle ones before a full one (CPython's defaults: 700, 10, 10)."""


class CollectorStats:
    """Collections and their pauses by generation, since the process started."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._started: float | None = None
        self.collections = [0, 0, 0]
        self.pause_s_total = [0.0, 0.0, 0.0]
        self.pause_s_max = [0.0, 0.0, 0.0]

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        """``gc.callbacks``' signature; must not raise (it runs inside the collector)."""
        if phase == "start":
            self._started = self._clock()
            return
        if self._started is None:
            return  # installed while a collection ran: its start was not seen
        pause = self._clock() - self._started
        self._started = None
        generation = min(max(int(info.get("generation", 2)), 0), 2)
        self.collections[generation] += 1
        self.pause_s_total[generation] += pause
        self.pause_s_max[generation] = max(self.pause_s_max[generation], pause)

    def to_json(self) -> dict[str, Any]:
        return {
            "thresholds": list(gc.get_threshold()),
            "collections": list(self.collections),
            "pause_ms_total": [round(s * 1000, 3) for s in self.pause_s_total],
            "pause_ms_max": [round(s * 1000, 3) for s in self.pause_s_max],
        }


def tune_collector() -> CollectorStats:
    """Set a serving process's collector (call once, after start-up, before
    serving) and start recording its pauses."""
    gc.collect()
    gc.freeze()  # what start-up allocated is never garbage: out of every collection
    gc.set_threshold(*GC_THRESHOLDS)
    stats = CollectorStats()
    gc.callbacks.append(stats.callback)
    return stats

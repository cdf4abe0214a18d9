"""Load generation shared by ``raftkv demo`` and ``raftkv bench``."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from raftkv.client import AsyncClient
from raftkv.errors import RaftKVError


@dataclass
class Recorder:
    latencies_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, exc: RaftKVError) -> None:
        self.errors[exc.code] = self.errors.get(exc.code, 0) + 1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_clients(client: AsyncClient, clients: int, duration_s: float,
                      op: Any) -> tuple[Recorder, float, float]:
    """Run ``op(client, worker, n)`` in ``clients`` concurrent loops for ``duration_s``.

    Returns the recorder, the elapsed seconds and this process's CPU seconds.
    """
    recorder = Recorder()
    deadline = trio.current_time() + duration_s
    cpu_before, wall_before = cpu_s(), time.perf_counter()

    async def worker(w: int) -> None:
        n = 0
        while trio.current_time() < deadline:
            started = time.perf_counter()
            try:
                await op(client, w, n)
            except RaftKVError as exc:
                recorder.error(exc)
            else:
                recorder.latencies_s.append(time.perf_counter() - started)
            n += 1

    async with trio.open_nursery() as nursery:
        for w in range(clients):
            nursery.start_soon(worker, w)
    return recorder, time.perf_counter() - wall_before, cpu_s() - cpu_before

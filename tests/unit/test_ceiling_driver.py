"""The ceilings benchmark's driver (cli/ceiling_group.py): what it counts.

A stand-in replica completes every entry a fixed time after it is submitted,
on a timer thread (as the Raft thread would); the driver is pure bookkeeping.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from raftkv_cli.ceiling_group import Driver


class _Hub:
    def call_soon(self, fn: Callable[[], object]) -> None:
        fn()


class _SlowReplica:
    """Every entry commits ``latency_s`` after it is submitted."""

    def __init__(self, latency_s: float) -> None:
        self.hub = _Hub()
        self.latency_s = latency_s
        self.submitted = 0

    def submit(self, _payload: bytes, on_done: Callable[[Any, Any], None]) -> None:
        self.submitted += 1
        timer = threading.Timer(self.latency_s, on_done, args=({"i": self.submitted}, None))
        timer.daemon = True
        timer.start()


@pytest.mark.timeout(20)
def test_a_window_shorter_than_one_latency_still_measures_the_pipeline() -> None:
    # 8 entries in flight, each taking 0.2 s, and a 0.05 s window: without
    # the stretch, nothing would complete inside the window.
    replica = _SlowReplica(0.2)
    driver = Driver(replica, lambda _slot: b"x", inflight=8, duration_s=0.05)  # type: ignore[arg-type]
    driver.run()
    assert driver.window_s >= 3 * 0.2
    assert driver.completed >= 8
    rate = driver.completed / driver.window_s
    assert 8 / 0.2 * 0.5 <= rate <= 8 / 0.2 * 1.2  # about inflight / latency
    assert min(driver.latencies_s) >= 0.2


@pytest.mark.timeout(20)
def test_a_window_longer_than_the_latency_stays_as_asked() -> None:
    replica = _SlowReplica(0.01)
    driver = Driver(replica, lambda _slot: b"x", inflight=2, duration_s=0.3)  # type: ignore[arg-type]
    driver.run()
    assert driver.window_s == 0.3
    assert driver.completed > 0

"""The collector's pause record (``raftkv.server.collector``), on a clock the test moves."""

from __future__ import annotations

from raftkv.server.collector import CollectorStats


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pauses_are_counted_by_generation() -> None:
    clock = Clock()
    stats = CollectorStats(clock)
    for generation, pause in ((0, 0.001), (0, 0.003), (2, 0.015)):
        stats.callback("start", {"generation": generation})
        clock.now += pause
        stats.callback("stop", {"generation": generation, "collected": 0})
    out = stats.to_json()
    assert out["collections"] == [2, 0, 1]
    assert out["pause_ms_total"] == [4.0, 0.0, 15.0]
    assert out["pause_ms_max"] == [3.0, 0.0, 15.0]


def test_a_stop_without_its_start_is_not_counted() -> None:
    # Installed while a collection ran: its "stop" comes without a "start".
    stats = CollectorStats(Clock())
    stats.callback("stop", {"generation": 1, "collected": 3})
    assert stats.to_json()["collections"] == [0, 0, 0]

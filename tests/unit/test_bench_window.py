"""The reshard benchmark's background window: latency summary and per-second timeline."""

from __future__ import annotations

from raftkv_cli.bench_reshard import Window


def window() -> Window:
    w = Window("during", started=100.0, ended=103.0)
    # Second 0: two fast reads; second 1: one slow write; second 2: a read and a write.
    w.record(100.1, 0.002, write=False)
    w.record(100.9, 0.004, write=False)
    w.record(101.5, 0.050, write=True)
    w.record(102.0, 0.001, write=False)
    w.record(102.99, 0.010, write=True)
    return w


def test_summary_splits_reads_from_writes() -> None:
    s = window().summary()
    assert (s["ops"], s["reads"], s["writes"]) == (5, 3, 2)
    assert s["max_ms"] == 50.0
    assert s["read_p99_ms"] == 4.0
    assert s["write_p99_ms"] == 50.0
    assert s["ops_per_s"] == round(5 / 3, 1)


def test_timeline_buckets_by_the_second_an_operation_started_in() -> None:
    t = window().timeline()
    assert [b["t_s"] for b in t] == [0.0, 1.0, 2.0]
    assert [b["ops"] for b in t] == [2, 1, 2]
    assert [b["max_ms"] for b in t] == [4.0, 50.0, 10.0]
    assert t[0]["p50_ms"] == 4.0  # rank int(0.5 * 2) of [2, 4]


def test_an_empty_window_has_no_percentiles() -> None:
    w = Window("before", started=0.0, ended=1.0)
    s = w.summary()
    assert s["ops"] == 0 and s["p99_ms"] is None and s["read_p99_ms"] is None
    assert w.timeline() == []

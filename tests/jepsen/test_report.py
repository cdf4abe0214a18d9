"""The run report: fault windows, the summary, and the two plots."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread

from jepsen_lite.history import Event, HistoryError, Status
from jepsen_lite.report import FaultWindow, fault_windows, summarize, write_plots

pytestmark = pytest.mark.timeout(60)

S = 1_000_000_000
MS = 1_000_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_BYTES_MIN = 5_000


def nemesis(f: str, target: Any, time: int | None) -> Event:
    return Event("info", "nemesis", f, None, target, time)


# --- a synthetic run ----------------------------------------------------------------


@dataclass
class Run:
    """A generated history and the ground truth it was built from."""

    events: list[Event]
    outcomes: Counter[Status] = field(default_factory=Counter)
    functions: dict[str, Counter[Status]] = field(default_factory=dict)


OK_OPS = 240  # latencies 1..240 ms, shuffled
FAIL_OPS = 40  # 5 ms each
INFO_DONE_OPS = 15  # completed with info after 1 s (timeouts)
PROCESSES = 5
OPEN_OPS = 3  # processes 0..2 end with an open invoke
FUNCTIONS = ("read", "write", "cas")


def synthetic_run(seed: int = 7) -> Run:
    rng = random.Random(seed)
    plan: list[tuple[Status | None, int]] = (
        [("ok", ms) for ms in range(1, OK_OPS + 1)]
        + [("fail", 5)] * FAIL_OPS
        + [("info", 1000)] * INFO_DONE_OPS
    )
    rng.shuffle(plan)
    per_process: list[list[tuple[Status | None, int]]] = [[] for _ in range(PROCESSES)]
    for i, step in enumerate(plan):
        per_process[i % PROCESSES].append(step)
    for p in range(OPEN_OPS):
        per_process[p].append((None, 0))  # never completes

    run = Run([])
    stamped: list[tuple[int, int, Event]] = []  # (time, sequence, event)
    seq = 0
    for p, steps in enumerate(per_process):
        t = 10 * MS * (p + 1)
        for n, (status, latency_ms) in enumerate(steps):
            f = FUNCTIONS[(p + n) % len(FUNCTIONS)]
            key = f"k{n % 3}"
            value: Any = None if f == "read" else (n, n + 1) if f == "cas" else n
            stamped.append((t, seq, Event("invoke", p, f, key, value, t)))
            seq += 1
            outcome: Status = "info" if status is None else status
            run.outcomes[outcome] += 1
            run.functions.setdefault(f, Counter())[outcome] += 1
            if status is None:
                break
            t += latency_ms * MS
            out = n if f == "read" and status == "ok" else value
            stamped.append((t, seq, Event(status, p, f, key, out, t)))
            seq += 1
            t += rng.randrange(0, 20) * MS
    # Two fault windows: a kill of n2 that ends, a partition still open at the end.
    for t, f, target in [
        (2 * S, "kill-start", "n2"),
        (4 * S + 500 * MS, "kill-stop", "n2"),
        (7 * S, "partition-start", "n1,n3|n2"),
    ]:
        stamped.append((t, seq, nemesis(f, target, t)))
        seq += 1
    stamped.sort(key=lambda s: (s[0], s[1]))
    run.events = [ev for _, _, ev in stamped]
    return run


@pytest.fixture(scope="module")
def run() -> Run:
    return synthetic_run()


def test_synthetic_run_is_well_formed(run: Run) -> None:
    times = [ev.time for ev in run.events]
    assert all(t is not None for t in times)
    assert times == sorted(times)  # type: ignore[type-var]
    assert sum(run.outcomes.values()) == OK_OPS + FAIL_OPS + INFO_DONE_OPS + OPEN_OPS
    assert len({ev.process for ev in run.events if ev.is_client}) == PROCESSES
    # the faults fall inside the run
    assert run.events[-1].time is not None
    assert run.events[-1].time > 8 * S


# --- fault_windows ------------------------------------------------------------------


def test_fault_windows_of_the_run(run: Run) -> None:
    assert fault_windows(run.events) == [
        FaultWindow(2 * S, 4 * S + 500 * MS, "kill n2"),
        FaultWindow(7 * S, None, "partition n1,n3|n2"),
    ]


def test_fault_windows_match_start_and_stop_by_kind_and_target() -> None:
    events = [
        nemesis("kill-start", "n2", 100),
        nemesis("kill-start", "n3", 200),
        nemesis("partition-start", "n2", 250),
        nemesis("kill-stop", "n3", 300),  # closes n3, not n2
        nemesis("partition-stop", "n2", 350),
        nemesis("kill-stop", "n2", 400),
        nemesis("kill-stop", "n2", 450),  # nothing open: ignored
        nemesis("kill-start", "n2", 500),
    ]
    assert fault_windows(events) == [
        FaultWindow(100, 400, "kill n2"),
        FaultWindow(200, 300, "kill n3"),
        FaultWindow(250, 350, "partition n2"),
        FaultWindow(500, None, "kill n2"),
    ]


def test_fault_windows_repeated_starts_close_oldest_first() -> None:
    events = [
        nemesis("pause-start", "n1", 10),
        nemesis("pause-start", "n1", 20),
        nemesis("pause-stop", "n1", 30),
    ]
    assert fault_windows(events) == [
        FaultWindow(10, 30, "pause n1"),
        FaultWindow(20, None, "pause n1"),
    ]


def test_fault_windows_ignore_clients_untimed_and_other_nemesis_events() -> None:
    events = [
        Event("invoke", 0, "write", None, 1, 5),
        Event("invoke", "nemesis", "kill-start", None, "n1", 6),  # only info counts
        nemesis("kill-start", "n1", None),  # no time: cannot be placed
        nemesis("clock-bump", "n1", 7),  # no -start/-stop
        nemesis("-start", "n1", 8),  # no kind
        Event("ok", 0, "write", None, 1, 9),
        nemesis("kill-start", None, 10),  # no target
        nemesis("kill-stop", None, 20),
    ]
    assert fault_windows(events) == [FaultWindow(10, 20, "kill")]
    assert fault_windows([]) == []


# --- summarize ----------------------------------------------------------------------


def test_summarize_the_run(run: Run) -> None:
    summary = summarize(run.events)
    assert summary["operations"] == OK_OPS + FAIL_OPS + INFO_DONE_OPS + OPEN_OPS
    assert summary["outcomes"] == {
        "ok": OK_OPS,
        "fail": FAIL_OPS,
        "info": INFO_DONE_OPS + OPEN_OPS,
    }
    assert summary["functions"] == {
        f: {s: run.functions[f][s] for s in ("ok", "fail", "info")} for f in sorted(FUNCTIONS)
    }
    # ok latencies are exactly 1..240 ms: nearest-rank p50 = 120, p99 = ceil(237.6) = 238
    assert summary["latency_ms"] == {"samples": OK_OPS, "p50": 120.0, "p99": 238.0, "max": 240.0}
    assert summary["faults"] == {"kill": 1, "partition": 1}


def test_summarize_small_history_exactly() -> None:
    events = [
        Event("invoke", 0, "write", "a", 1, 0),
        Event("invoke", 1, "read", "a", None, 1 * MS),
        Event("ok", 0, "write", "a", 1, 2 * MS),  # 2 ms
        nemesis("kill-start", "n1", 3 * MS),
        Event("ok", 1, "read", "a", 1, 5 * MS),  # 4 ms
        Event("invoke", 0, "cas", "a", (1, 2), 6 * MS),
        Event("fail", 0, "cas", "a", (1, 2), 7 * MS),
        Event("invoke", 2, "write", "a", 3, 8 * MS),
        Event("info", 2, "write", "a", 3, 9 * MS),
        nemesis("kill-stop", "n1", 10 * MS),
        nemesis("kill-start", "n2", None),  # untimed: still counted as injected
        Event("invoke", 3, "read", "a", None, 11 * MS),  # open at the end
    ]
    assert summarize(events) == {
        "operations": 5,
        "outcomes": {"ok": 2, "fail": 1, "info": 2},
        "functions": {
            "cas": {"ok": 0, "fail": 1, "info": 0},
            "read": {"ok": 1, "fail": 0, "info": 1},
            "write": {"ok": 1, "fail": 0, "info": 1},
        },
        "latency_ms": {"samples": 2, "p50": 2.0, "p99": 4.0, "max": 4.0},
        "faults": {"kill": 2},
    }


def test_summarize_empty_and_untimed_histories() -> None:
    empty = summarize([])
    assert empty == {
        "operations": 0,
        "outcomes": {"ok": 0, "fail": 0, "info": 0},
        "functions": {},
        "latency_ms": {"samples": 0, "p50": None, "p99": None, "max": None},
        "faults": {},
    }
    untimed = summarize([Event("invoke", 0, "read"), Event("ok", 0, "read", value=1)])
    assert untimed["outcomes"] == {"ok": 1, "fail": 0, "info": 0}
    assert untimed["latency_ms"]["samples"] == 0


def test_summarize_rejects_a_history_that_does_not_pair() -> None:
    with pytest.raises(HistoryError):
        summarize([Event("ok", 0, "read", value=1)])


# --- write_plots --------------------------------------------------------------------


def assert_png(path: Path, bytes_min: int = PNG_BYTES_MIN) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > bytes_min, (path, len(data))
    image = imread(path)
    assert image.shape[0] > 100
    assert image.shape[1] > 100


def test_write_plots_of_the_run(run: Run, tmp_path: Path) -> None:
    out = tmp_path / "report" / "plots"  # created if missing
    paths = write_plots(run.events, out, "synthetic run")
    assert paths == [out / "latency.png", out / "throughput.png"]
    for path in paths:
        assert_png(path)


def test_write_plots_overwrites(run: Run, tmp_path: Path) -> None:
    (tmp_path / "latency.png").write_bytes(b"stale")
    write_plots(run.events, tmp_path, "again")
    assert_png(tmp_path / "latency.png")


@pytest.mark.parametrize(
    "events",
    [
        pytest.param([], id="empty"),
        pytest.param(
            [
                Event("invoke", 0, "write", None, 1),
                Event("ok", 0, "write", None, 1),
                Event("invoke", 1, "read"),
                nemesis("kill-start", "n1", None),
            ],
            id="no-times",
        ),
        pytest.param(
            [
                Event("invoke", 0, "write", None, 1, 5 * S),
                Event("ok", 0, "write", None, 1, None),  # completion untimed
                Event("invoke", 1, "read", None, None, None),
                Event("ok", 1, "read", None, 1, 5 * S + 3 * MS),  # invoke untimed
                Event("invoke", 2, "read", None, None, 5 * S + 4 * MS),  # open
            ],
            id="some-times",
        ),
        pytest.param(
            [
                nemesis("partition-start", "n1", 0),
                Event("invoke", 0, "read", None, None, 1 * S),
                Event("ok", 0, "read", None, 1, 1 * S),  # zero latency on a log axis
            ],
            id="zero-latency",
        ),
    ],
)
def test_write_plots_degenerate_histories(events: list[Event], tmp_path: Path) -> None:
    paths = write_plots(events, tmp_path, "degenerate")
    assert [p.name for p in paths] == ["latency.png", "throughput.png"]
    for path in paths:
        assert_png(path, bytes_min=1_000)

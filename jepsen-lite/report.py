"""The report of a harness run: fault windows, a summary, and two plots.

`fault_windows` and `summarize` are pure: a history in, plain values out.
`write_plots` is the only function here that writes files; it draws with the
object API on an Agg canvas, so it needs no display, touches no pyplot state
and leaves no figure open.

Times in a history are nanoseconds (``Event.time``, possibly None). The plots
put them in seconds since the first timed event of the history; events and
operations without the times a plot needs are left out of that plot.

Fault events are the nemesis's ``info`` events whose ``f`` is
``"<kind>-start"`` or ``"<kind>-stop"`` (``kill-start``, ``partition-stop``),
with ``value`` naming the target (``"n2"``). Other non-client events (a
nemesis ``invoke``, an ``f`` without those suffixes) are ignored here.
"""

from __future__ import annotations

import json
import math
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypedDict

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from jepsen_lite.history import Event, Operation, Status, pair_operations, thaw

STATUSES: Final[tuple[Status, ...]] = ("ok", "fail", "info")
LATENCY_PLOT: Final = "latency.png"
THROUGHPUT_PLOT: Final = "throughput.png"

_NS_PER_S: Final = 1_000_000_000
_NS_PER_MS: Final = 1_000_000
_BUCKET_NS: Final = _NS_PER_S
# Where a latency of 0 is drawn on the log axis when no latency is positive.
_LATENCY_MS_MIN_DRAWN: Final = 1e-3
# Head room above the data for the fault labels (factor on the y range).
_HEADROOM_LINEAR: Final = 1.18
_HEADROOM_LOG: Final = 4.0
_START: Final = "-start"
_STOP: Final = "-stop"
_COLOR: Final[dict[Status, str]] = {"ok": "#2ca02c", "fail": "#d62728", "info": "#ff7f0e"}
_FAULT_COLORS: Final = ("#7f7f7f", "#9467bd", "#1f77b4", "#8c564b", "#e377c2", "#17becf")
_FIGSIZE_IN: Final = (11.0, 5.5)
_DPI: Final = 110


@dataclass(frozen=True)
class FaultWindow:
    """A fault in force from ``start_ns`` to ``end_ns`` (history times, ns).

    ``end_ns`` is None when the fault was never stopped: it lasts until the
    end of the run. ``label`` is ``"<kind> <target>"``, e.g. ``"kill n2"``.
    """

    start_ns: int
    end_ns: int | None
    label: str

    @property
    def kind(self) -> str:
        return self.label.split(" ", 1)[0]


class LatencySummary(TypedDict):
    """Latency of the ``ok`` operations whose invoke and completion are timed.

    Percentiles are nearest-rank (the smallest sample with at least p% of the
    samples at or below it), so each is one measured latency. All three are
    None when there is no sample.
    """

    samples: int
    p50: float | None
    p99: float | None
    max: float | None


class Summary(TypedDict):
    """What `summarize` returns.

    ``outcomes``: client operations by outcome (an invocation still open at
    the end counts as ``info``); ``functions``: the same per ``f``, each with
    all three outcomes; ``latency_ms``: see `LatencySummary`; ``faults``: the
    number of ``<kind>-start`` fault events per kind.
    """

    operations: int
    outcomes: dict[Status, int]
    functions: dict[str, dict[Status, int]]
    latency_ms: LatencySummary
    faults: dict[str, int]


# ---------------------------------------------------------------------------
# Pure: windows and summary


def _fault_edge(ev: Event) -> tuple[str, bool] | None:
    """``(kind, is_start)`` for a fault start/stop event, else None."""
    if ev.is_client or ev.type != "info":
        return None
    if ev.f.endswith(_START) and len(ev.f) > len(_START):
        return ev.f.removesuffix(_START), True
    if ev.f.endswith(_STOP) and len(ev.f) > len(_STOP):
        return ev.f.removesuffix(_STOP), False
    return None


def _target(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(thaw(value), default=str)


def fault_windows(events: Iterable[Event]) -> list[FaultWindow]:
    """The fault windows of a history, in the order the faults started.

    A ``<kind>-start`` is closed by the next ``<kind>-stop`` with the same
    target (``value``); if several starts of one kind and target are open, the
    oldest is closed first. A start never stopped gives a window with
    ``end_ns=None``; a stop with no open start is ignored. Fault events
    without a ``time`` are ignored (a window cannot be placed without one).
    """
    windows: list[FaultWindow] = []
    # (kind, target) -> indices in `windows` of the starts not yet stopped
    open_starts: dict[tuple[str, str], deque[int]] = {}
    for ev in events:
        edge = _fault_edge(ev)
        if edge is None or ev.time is None:
            continue
        kind, is_start = edge
        target = _target(ev.value)
        key = (kind, target)
        if is_start:
            open_starts.setdefault(key, deque()).append(len(windows))
            label = f"{kind} {target}" if target else kind
            windows.append(FaultWindow(ev.time, None, label))
        elif open_starts.get(key):
            slot = open_starts[key].popleft()
            start = windows[slot]
            assert ev.time >= start.start_ns, f"{ev.f} at {ev.time} before its start"
            windows[slot] = FaultWindow(start.start_ns, ev.time, start.label)
    return windows


def _nearest_rank(sorted_samples: Sequence[float], pct: float) -> float:
    assert sorted_samples, "no samples"
    rank = max(1, math.ceil(pct / 100 * len(sorted_samples)))
    return sorted_samples[rank - 1]


def _latency_ms(op: Operation) -> float | None:
    if op.call_time is None or op.ret_time is None:
        return None
    return (op.ret_time - op.call_time) / _NS_PER_MS


def summarize(events: Sequence[Event]) -> Summary:
    """Counts by outcome and function, ok latency in ms, and faults by kind.

    Raises `HistoryError` if the client events do not pair (see
    `pair_operations`).
    """
    ops = pair_operations(events)
    outcomes: dict[Status, int] = dict.fromkeys(STATUSES, 0)
    functions: dict[str, dict[Status, int]] = {}
    latencies: list[float] = []
    for op in ops:
        outcomes[op.status] += 1
        functions.setdefault(op.f, dict.fromkeys(STATUSES, 0))[op.status] += 1
        lat = _latency_ms(op)
        if op.status == "ok" and lat is not None:
            latencies.append(lat)
    latencies.sort()
    latency: LatencySummary = {
        "samples": len(latencies),
        "p50": _nearest_rank(latencies, 50) if latencies else None,
        "p99": _nearest_rank(latencies, 99) if latencies else None,
        "max": latencies[-1] if latencies else None,
    }
    faults = Counter(edge[0] for ev in events if (edge := _fault_edge(ev)) is not None and edge[1])
    return {
        "operations": len(ops),
        "outcomes": outcomes,
        "functions": dict(sorted(functions.items())),
        "latency_ms": latency,
        "faults": dict(sorted(faults.items())),
    }


# ---------------------------------------------------------------------------
# Plots


@dataclass(frozen=True)
class _Timeline:
    """The run's time span: ``t0_ns`` is the first timed event, ``end_s`` the
    last one in seconds after it (None for both if nothing is timed)."""

    t0_ns: int | None
    end_ns: int | None

    @classmethod
    def of(cls, events: Sequence[Event]) -> _Timeline:
        times = [ev.time for ev in events if ev.time is not None]
        if not times:
            return cls(None, None)
        return cls(min(times), max(times))

    def seconds(self, t_ns: int) -> float:
        assert self.t0_ns is not None
        return (t_ns - self.t0_ns) / _NS_PER_S

    @property
    def end_s(self) -> float:
        if self.t0_ns is None or self.end_ns is None:
            return 0.0
        return self.seconds(self.end_ns)


def _open_invocations(events: Sequence[Event]) -> set[int]:
    """Positions of the invokes with no completion at all (still open at the
    end). Assumes the history pairs (`pair_operations` has checked it)."""
    open_at: dict[int | str, int] = {}
    for pos, ev in enumerate(events):
        if not ev.is_client:
            continue
        if ev.type == "invoke":
            open_at[ev.process] = pos
        else:
            open_at.pop(ev.process, None)
    return set(open_at.values())


def write_plots(events: Sequence[Event], out_dir: Path, title: str) -> list[Path]:
    """Write ``latency.png`` and ``throughput.png`` into ``out_dir``.

    Creates ``out_dir`` if needed and returns the two paths. A history with
    no timed events still gives two (empty, captioned) plots. Raises
    `HistoryError` if the client events do not pair.
    """
    ops = pair_operations(events)
    timeline = _Timeline.of(events)
    windows = fault_windows(events)
    out_dir.mkdir(parents=True, exist_ok=True)
    latency_path = out_dir / LATENCY_PLOT
    throughput_path = out_dir / THROUGHPUT_PLOT
    _save(_latency_figure(events, ops, timeline, windows, title), latency_path)
    _save(_throughput_figure(ops, timeline, windows, title), throughput_path)
    return [latency_path, throughput_path]


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png")
    fig.clear()


def _new_axes(title: str) -> tuple[Figure, Axes]:
    fig = Figure(figsize=_FIGSIZE_IN, dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(visible=True, which="major", alpha=0.3)
    return fig, ax


def _no_data(ax: Axes) -> None:
    ax.text(
        0.5,
        0.5,
        "no timed operations",
        transform=ax.transAxes,
        ha="center",
        va="center",
        color="#555555",
    )


def _latency_figure(
    events: Sequence[Event],
    ops: Sequence[Operation],
    timeline: _Timeline,
    windows: Sequence[FaultWindow],
    title: str,
) -> Figure:
    fig, ax = _new_axes(f"{title}: latency")
    ax.set_xlabel("invoke time (s since the first event)")
    ax.set_ylabel("latency (ms, log)")
    if timeline.t0_ns is None or timeline.end_ns is None:
        _no_data(ax)
        return fig
    open_calls = _open_invocations(events)
    points: dict[Status, tuple[list[float], list[float]]] = {s: ([], []) for s in STATUSES}
    open_x: list[float] = []
    open_y: list[float] = []
    for op in ops:
        if op.call_time is None:
            continue
        lat = _latency_ms(op)
        if lat is not None:
            points[op.status][0].append(timeline.seconds(op.call_time))
            points[op.status][1].append(lat)
        elif op.call in open_calls:
            # Open at the end: it lasted at least until the run ended.
            open_x.append(timeline.seconds(op.call_time))
            open_y.append((timeline.end_ns - op.call_time) / _NS_PER_MS)
    # A log axis cannot show 0: draw such latencies (and lower bounds) at the
    # smallest positive one measured, so one zero does not stretch the axis.
    positive = [y for s in STATUSES for y in points[s][1] if y > 0]
    positive += [y for y in open_y if y > 0]
    floor_ms = min(positive, default=_LATENCY_MS_MIN_DRAWN)
    for status in STATUSES:
        points[status][1][:] = [max(y, floor_ms) for y in points[status][1]]
    open_y = [max(y, floor_ms) for y in open_y]
    handles: list[Any] = []
    for status in STATUSES:
        xs, ys = points[status]
        ax.scatter(xs, ys, s=9, color=_COLOR[status], alpha=0.7, linewidths=0, zorder=3)
        handles.append(
            Line2D(
                [],
                [],
                linestyle="",
                marker="o",
                color=_COLOR[status],
                label=f"{status} ({len(xs)})",
            )
        )
    if open_x:
        ax.scatter(
            open_x,
            open_y,
            s=40,
            marker="^",
            facecolors="none",
            edgecolors=_COLOR["info"],
            linewidths=1.2,
            zorder=4,
        )
        handles.append(
            Line2D(
                [],
                [],
                linestyle="",
                marker="^",
                markerfacecolor="none",
                color=_COLOR["info"],
                label=f"info, open at end (≥, {len(open_x)})",
            )
        )
    drawn = [y for s in STATUSES for y in points[s][1]] + open_y
    if drawn:
        ax.set_yscale("log")
        ax.set_ylim(min(drawn) / 2, max(drawn) * _HEADROOM_LOG)
    else:
        _no_data(ax)
    handles += _shade_faults(ax, windows, timeline)
    ax.set_xlim(0.0, max(timeline.end_s, 1.0))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return fig


def _throughput_figure(
    ops: Sequence[Operation],
    timeline: _Timeline,
    windows: Sequence[FaultWindow],
    title: str,
) -> Figure:
    fig, ax = _new_axes(f"{title}: throughput")
    ax.set_xlabel("completion time (s since the first event, 1 s buckets)")
    ax.set_ylabel("completed operations / s")
    if timeline.t0_ns is None:
        _no_data(ax)
        return fig
    t0_ns = timeline.t0_ns
    buckets = max(1, math.ceil(timeline.end_s))
    counts: dict[Status, list[int]] = {s: [0] * buckets for s in STATUSES}
    for op in ops:
        if op.ret_time is None:
            continue
        bucket = min((op.ret_time - t0_ns) // _BUCKET_NS, buckets - 1)
        counts[op.status][bucket] += 1
    lefts = [float(i) for i in range(buckets)]
    bottom = [0] * buckets
    handles: list[Any] = []
    for status in STATUSES:
        heights = counts[status]
        ax.bar(
            lefts,
            heights,
            width=1.0,
            bottom=bottom,
            align="edge",
            color=_COLOR[status],
            alpha=0.85,
            linewidth=0,
            zorder=3,
        )
        handles.append(Patch(color=_COLOR[status], label=f"{status} ({sum(heights)})"))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    if not any(bottom):
        _no_data(ax)
    handles += _shade_faults(ax, windows, timeline)
    ax.set_xlim(0.0, float(buckets))
    ax.set_ylim(0.0, max(*bottom, 1) * _HEADROOM_LINEAR)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return fig


def _shade_faults(ax: Axes, windows: Sequence[FaultWindow], timeline: _Timeline) -> list[Patch]:
    """Shade each window, label it at the top, and return one legend entry per
    kind. Open windows run to the end of the run and are hatched."""
    if timeline.t0_ns is None:
        return []
    kinds = list(dict.fromkeys(w.kind for w in windows))
    color = {k: _FAULT_COLORS[i % len(_FAULT_COLORS)] for i, k in enumerate(kinds)}
    end_s = max(timeline.end_s, 1.0)
    for i, w in enumerate(windows):
        start_s = timeline.seconds(w.start_ns)
        stop_s = end_s if w.end_ns is None else timeline.seconds(w.end_ns)
        ax.axvspan(
            start_s,
            stop_s,
            color=color[w.kind],
            alpha=0.15,
            linewidth=0,
            zorder=1,
            hatch=None if w.end_ns is not None else "//",
        )
        label = w.label if w.end_ns is not None else f"{w.label} (open)"
        ax.text(
            start_s,
            0.98 - 0.05 * (i % 4),
            label,
            transform=ax.get_xaxis_transform(),
            fontsize=7,
            va="top",
            ha="left",
            color=color[w.kind],
            zorder=5,
            clip_on=True,
        )
    return [Patch(color=color[k], alpha=0.3, label=f"fault: {k}") for k in kinds]

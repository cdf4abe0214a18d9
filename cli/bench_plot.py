"""Plots of a ``raftkv bench`` report (matplotlib, Agg, no pyplot state).

* ``throughput.png``: per workload, ops/s against client count, one line per
  target (and per raftkv physical-shard count when there are several);
* ``latency-cdf.png``: per workload, at its highest client count, the share
  of operations at or below each latency (from the report's histograms), one
  curve per target, with p50 and p99 marked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from raftkv_cli.ycsb import cdf

THROUGHPUT_PLOT: Final = "throughput.png"
LATENCY_PLOT: Final = "latency-cdf.png"
_DPI: Final = 110
_PANEL_IN: Final = (4.6, 3.6)
_COLORS: Final = {"raftkv": "#1f77b4", "etcd": "#d62728"}
_SHARD_STYLES: Final = ("-", "--", ":", "-.")


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write both PNGs under ``out_dir``; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = report["results"]
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    series = _series(results)
    paths = [out_dir / THROUGHPUT_PLOT, out_dir / LATENCY_PLOT]
    title = f"raftkv bench, {report.get('time', '')}"
    _save(_panels(workloads, title, lambda ax, w: _throughput(ax, w, results, series)),
          paths[0])
    _save(_panels(workloads, title, lambda ax, w: _latency(ax, w, results, series)), paths[1])
    return paths


def _series(results: list[dict[str, Any]]) -> list[tuple[str, int | None]]:
    """(target, physical shards) in order of appearance."""
    return list(dict.fromkeys((r["target"], r.get("physical_shards")) for r in results))


def _label(target: str, shards: int | None, series: list[tuple[str, int | None]]) -> str:
    several = len({s for t, s in series if t == "raftkv"}) > 1
    if target != "raftkv" or not several:
        return target
    return f"{target}, {shards} shard{'' if shards == 1 else 's'}"


def _style(target: str, shards: int | None, series: list[tuple[str, int | None]]
           ) -> dict[str, Any]:
    counts = [s for t, s in series if t == target]
    linestyle = _SHARD_STYLES[counts.index(shards) % len(_SHARD_STYLES)]
    return {"color": _COLORS.get(target, "#555555"), "linestyle": linestyle}


def _panels(workloads: list[str], title: str, draw: Callable[[Axes, str], None]) -> Figure:
    columns = min(2, len(workloads)) or 1
    rows = -(-len(workloads) // columns) or 1
    fig = Figure(figsize=(_PANEL_IN[0] * columns, _PANEL_IN[1] * rows), dpi=_DPI,
                 layout="constrained")
    fig.suptitle(title)
    for i, workload in enumerate(workloads):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.grid(visible=True, which="major", alpha=0.3)
        draw(ax, workload)
    return fig


def _throughput(ax: Axes, workload: str, results: list[dict[str, Any]],
                series: list[tuple[str, int | None]]) -> None:
    ax.set_title(f"workload {workload}: throughput")
    ax.set_xlabel("clients")
    ax.set_ylabel("ops/s")
    counts = sorted({r["clients"] for r in results if r["workload"] == workload})
    if len(counts) > 2:
        ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(c) for c in counts])
    for target, shards in series:
        points = sorted((r["clients"], r["ops_per_s"]) for r in results
                        if r["workload"] == workload and r["target"] == target
                        and r.get("physical_shards") == shards)
        if points:
            ax.plot([c for c, _ in points], [v for _, v in points], marker="o",
                    label=_label(target, shards, series), **_style(target, shards, series))
    ax.set_ylim(bottom=0)
    ax.legend(loc="best", fontsize="small")


def _latency(ax: Axes, workload: str, results: list[dict[str, Any]],
             series: list[tuple[str, int | None]]) -> None:
    clients = max(r["clients"] for r in results if r["workload"] == workload)
    ax.set_title(f"workload {workload}: latency at {clients} clients")
    ax.set_xlabel("latency (ms, log)")
    ax.set_ylabel("share of operations at or below")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0, 1.02)
    for q in (0.5, 0.99):
        ax.axhline(q, color="#999999", linewidth=0.8, linestyle=":")
        ax.annotate(f"p{round(q * 100)}", (0.01, q), xycoords=("axes fraction", "data"),
                    fontsize="small", color="#555555", va="top" if q > 0.9 else "bottom")
    drawn = False
    for target, shards in series:
        for r in results:
            if (r["workload"], r["clients"], r["target"], r.get("physical_shards")) != (
                    workload, clients, target, shards):
                continue
            xs, ys = cdf(r.get("histogram") or {})
            if xs:
                ax.step(xs, ys, where="post", label=f"{_label(target, shards, series)} "
                        f"(p99 {r['p99_ms']:.1f} ms)", **_style(target, shards, series))
                drawn = True
    if drawn:
        ax.legend(loc="lower right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no operations", transform=ax.transAxes, ha="center", va="center")


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png")
    fig.clear()

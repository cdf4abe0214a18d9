"""``raftkv reshard`` and ``raftkv reshard-worker``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from raftkv.localcluster import LocalCluster
from raftkv_cli.admin import manager_call
from raftkv_cli.common import (
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    cluster_dir_option,
    fail,
    keyspace_option,
    open_cluster,
)
from shardmgr.moves import RESHARD_LIVE
from shardmgr.reshard import COPY_KEYS_PER_S_DEFAULT, PER_NODE_MAX_DEFAULT

POLL_S = 0.25
EXIT_ABORTED = 1


@click.command()
@cluster_dir_option
@keyspace_option
@click.option("--physical-shards", type=click.IntRange(1, 4096), default=None,
              help="Physical shards (Raft groups) the keyspace should end with.")
@click.option("--workers", type=click.IntRange(0, 64), default=2, show_default=True,
              help="Worker processes to start (0: use workers started elsewhere).")
@click.option("--max-moves-per-node", type=click.IntRange(1, 64),
              default=PER_NODE_MAX_DEFAULT, show_default=True,
              help="Moves at once touching any one node.")
@click.option("--max-keys-per-s", type=click.FloatRange(min=0),
              default=COPY_KEYS_PER_S_DEFAULT, show_default=True,
              help="Keys each worker copies per second at most: the reshard's pace, "
              "for clients to keep their latency (0: no limit).")
@click.option("--plan", "plan_only", is_flag=True, help="Print the moves; change nothing.")
@click.option("--status", "status_only", is_flag=True, help="Print the latest reshard's state.")
@click.option("--abort", is_flag=True,
              help="Turn the running reshard back to the old layout (waits for it).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan, status or report as JSON.")
@click.option("--timeout-s", type=float, default=3600.0, show_default=True)
def reshard(cluster_dir: Path, keyspace: str, physical_shards: int | None, workers: int,
            max_moves_per_node: int, max_keys_per_s: float | None, plan_only: bool,
            status_only: bool, abort: bool, as_json: bool, timeout_s: float) -> None:
    """Split or merge a keyspace's physical shards while it serves.

    Creates the new groups, moves logical shards between groups with zero
    downtime, removes emptied groups; prints progress and a report. Exit 0
    when done; 1 if it ended aborted or a move needs an operator; 3 if the
    cluster is unavailable. Interrupted, the reshard stays where it is: run
    the same command again to go on, or --abort.
    """
    if sum((plan_only, status_only, abort)) > 1:
        raise click.UsageError("give at most one of --plan, --status and --abort")
    cluster = open_cluster(cluster_dir)
    if status_only:
        status = manager_call(cluster, {"op": "reshard_status", "ks": keyspace})
        if status is None:
            fail(f"keyspace {keyspace!r} was never resharded", EXIT_USAGE)
        _print_status(status, as_json)
        return
    if abort:
        status = manager_call(cluster, {"op": "reshard_abort", "ks": keyspace})
    else:
        if physical_shards is None:
            raise click.UsageError("--physical-shards is required (or --status, --abort)")
        if plan_only:
            _print_plan(manager_call(cluster, {"op": "reshard", "ks": keyspace,
                                               "physical_shards": physical_shards,
                                               "plan": True}), as_json)
            return
        status = manager_call(cluster, {"op": "reshard", "ks": keyspace,
                                        "physical_shards": physical_shards})
    final = _follow(cluster, keyspace, status, workers=workers,
                    per_node_max=max_moves_per_node, keys_per_s=max_keys_per_s,
                    timeout_s=timeout_s, quiet=as_json)
    if as_json:
        click.echo(json.dumps(_report(final), indent=2))
    else:
        _print_report(final)
    sys.exit(0 if final["state"] == "done" else EXIT_ABORTED)


@click.command("reshard-worker")
@cluster_dir_option
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Workers in this process.")
@click.option("--max-moves-per-node", type=click.IntRange(1, 64),
              default=PER_NODE_MAX_DEFAULT, show_default=True)
@click.option("--max-keys-per-s", type=click.FloatRange(min=0),
              default=COPY_KEYS_PER_S_DEFAULT, show_default=True,
              help="Keys each worker copies per second at most (0: no limit).")
@click.option("--id", "worker_id", default=None, help="Worker id (default host-pid).")
@click.option("--exit-when-idle", is_flag=True, help="Stop when no move is left to claim.")
@click.option("--log-level", default="WARNING", show_default=True)
def reshard_worker(cluster_dir: Path, workers: int, max_moves_per_node: int,
                   max_keys_per_s: float | None, worker_id: str | None, exit_when_idle: bool,
                   log_level: str) -> None:
    """Run resharding workers in the foreground: claim moves from the shard
    manager and carry them out (``raftkv reshard`` starts these for you)."""
    import logging

    import trio

    from shardmgr.worker import run_workers

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s reshard-worker %(levelname)s %(name)s: %(message)s")
    cluster = open_cluster(cluster_dir)
    trio.run(lambda: run_workers(cluster.client_addresses(), workers,
                                 per_node_max=max_moves_per_node, keys_per_s=max_keys_per_s,
                                 exit_when_idle=exit_when_idle, worker_id=worker_id))


def start_workers(cluster: LocalCluster, count: int, per_node_max: int,
                  keys_per_s: float | None = None,
                  log_level: str = "WARNING") -> list[subprocess.Popen[bytes]]:
    """``count`` worker processes, logging into the cluster directory
    (at INFO, a line per move's cutover); ``keys_per_s``: each one's copy
    pace (None: the workers' default, 0: no limit)."""
    processes = []
    for i in range(count):
        log = open(cluster.directory / f"reshard-worker-{i}.log", "ab")  # noqa: SIM115
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "raftkv_cli.main", "reshard-worker",
             *worker_args(cluster.directory, f"cli-{i}-{int(time.time())}", per_node_max,
                          keys_per_s, log_level)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, close_fds=True))
        log.close()
    return processes


def worker_args(cluster_dir: Path, worker_id: str, per_node_max: int,
                keys_per_s: float | None, log_level: str) -> list[str]:
    """The arguments of ``raftkv reshard-worker`` for one started worker."""
    pace = [] if keys_per_s is None else ["--max-keys-per-s", str(keys_per_s)]
    return ["--dir", str(cluster_dir), "--max-moves-per-node", str(per_node_max),
            "--id", worker_id, "--log-level", log_level, *pace]


def stop_workers(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _follow(cluster: LocalCluster, keyspace: str, status: dict[str, Any], *, workers: int,
            per_node_max: int, keys_per_s: float | None, timeout_s: float,
            quiet: bool) -> dict[str, Any]:
    """Run workers and show progress until the reshard ends; its last status."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    processes = start_workers(cluster, workers, per_node_max, keys_per_s) if status["state"] in \
        RESHARD_LIVE else []
    deadline = time.monotonic() + timeout_s
    reported_stuck = False
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                      MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
                      TimeElapsedColumn(), TimeRemainingColumn(),
                      disable=quiet or not sys.stderr.isatty(),
                      console=_stderr_console()) as progress:
            task = progress.add_task(f"{keyspace} -> {status['target']} shards",
                                     total=status["moves_total"] or 1, detail="")
            started = time.monotonic()
            while status["state"] in RESHARD_LIVE:
                if time.monotonic() > deadline:
                    fail(f"the reshard did not finish within {timeout_s:.0f} s; it is "
                         f"{status['state']}, {status['moves_done']} of "
                         f"{status['moves_total']} moves done (raftkv reshard --status)",
                         EXIT_UNAVAILABLE)
                if status["stuck"] and not reported_stuck:
                    reported_stuck = True
                    for stuck in status["stuck"]:
                        click.echo(f"raftkv: move {stuck['move']} (logical shard "
                                   f"{stuck['ls']}) needs an operator: {stuck['error']}; "
                                   "raftkv reshard --abort turns it back", err=True)
                rate = status["bytes"] / max(1e-3, time.monotonic() - started)
                progress.update(task, total=status["moves_total"] or 1,
                                completed=status["moves_done"] + status["moves_aborted"],
                                description=f"{keyspace} -> {status['target']} shards "
                                            f"({status['state']})",
                                detail=f"{_size(status['bytes'])} {_size(rate)}/s")
                if processes and all(p.poll() is not None for p in processes):
                    fail("every reshard worker exited; see reshard-worker-*.log in "
                         f"{cluster.directory}", EXIT_UNAVAILABLE)
                time.sleep(POLL_S)
                status = manager_call(cluster, {"op": "reshard_status", "ks": keyspace})
    except KeyboardInterrupt:
        fail("interrupted; the reshard waits where it is: run the same command to go on, "
             "or raftkv reshard --abort", EXIT_UNAVAILABLE)
    finally:
        stop_workers(processes)
    return status


def _stderr_console() -> Any:
    from rich.console import Console
    return Console(stderr=True)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _report(status: dict[str, Any]) -> dict[str, Any]:
    finished = status.get("finished_at") or time.time()
    return {
        "keyspace": status["keyspace"], "state": status["state"], "target": status["target"],
        "from_shards": status["before"], "duration_s": round(finished - status["started_at"], 3),
        "moves": status["moves_done"], "moves_aborted": status["moves_aborted"],
        "keys_moved": status["keys"], "bytes_moved": status["bytes"],
        "changelog_records": status["records"],
        "unavailability_ms": status["unavailable_ms"],
        "removed_shards": status["removed_shards"], "stuck": status["stuck"],
    }


def _print_report(status: dict[str, Any]) -> None:
    r = _report(status)
    u = r["unavailability_ms"]
    click.echo(f"reshard of {r['keyspace']} to {r['target']} physical shards: {r['state']} "
               f"in {r['duration_s']:.1f} s")
    click.echo(f"  moved {r['moves']} logical shards ({r['moves_aborted']} aborted): "
               f"{r['keys_moved']} keys, {_size(r['bytes_moved'])}, "
               f"{r['changelog_records']} changelog records")
    if u["count"]:
        click.echo(f"  unavailability per logical shard: p50 {u['p50']:.1f} ms, "
                   f"p99 {u['p99']:.1f} ms, max {u['max']:.1f} ms")
    if r["removed_shards"]:
        click.echo(f"  removed physical shards {', '.join(map(str, r['removed_shards']))}")


def _print_status(status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    click.echo(f"reshard {status['id']} of {status['keyspace']} to {status['target']} "
               f"physical shards: {status['state']}")
    click.echo(f"  moves: {status['moves_done']} done, {status['moves_aborted']} aborted, "
               f"{status['moves_total']} planned; phases now: "
               + (", ".join(f"{k} {v}" for k, v in sorted(status["phases"].items())) or "-"))
    for stuck in status["stuck"]:
        click.echo(f"  move {stuck['move']} stuck in {stuck['phase']}: {stuck['error']}")


def _print_plan(plan: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(plan, indent=2))
        return
    click.echo(f"{plan['keyspace']}: physical shards {plan['from']} -> {plan['to']} "
               f"({plan['new_shards']} new, removing {plan['removed'] or 'none'}); "
               f"{len(plan['moves'])} logical shards move")
    for ls, src, dst in plan["moves"]:
        click.echo(f"  logical shard {ls}: {src} -> {dst}")


def register(cli: click.Group) -> None:
    cli.add_command(reshard)
    cli.add_command(reshard_worker)

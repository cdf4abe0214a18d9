"""``raftkv bench``: YCSB-style workloads against raftkv and etcd, side by side.

For each target, in the order given: start a fresh 3-replica cluster on this
machine (raftkv: 3 nodes in 3 data centers plus the 3 shard manager replicas,
once per physical-shard count; etcd: 3 members on 127.0.0.1), load
``records`` keys, run every workload at every client count, stop the cluster
(also on an error or Ctrl-C). Each point runs in a fresh load generator
process (`raftkv_cli.loadgen`), with the same operation sequence (same
seeds) for both targets, so its CPU use is its own and is reported.

Prints a line per point and, when both targets ran, the raftkv/etcd ratios;
writes the JSON report and the plots when asked. etcd that cannot be
installed or started is skipped with one line, and raftkv still runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import click

from raftkv.localcluster import LocalCluster
from raftkv_cli.common import open_cluster
from raftkv_cli.workload import code_version
from raftkv_cli.ycsb import WORKLOADS, ratios

SEED: Final = 1
LOAD_CLIENTS: Final = 64
# A point's process: start-up, connecting and the warm-up before the
# measured window, the window, and the last requests after it.
LOADGEN_OVERHEAD_S: Final = 60.0
LOAD_TIMEOUT_S: Final = 600.0
LOADGEN_SATURATED_PCT: Final = 90.0

RAFTKV_SETUP: Final = {
    "nodes": "3 node processes in 3 simulated data centers, plus 3 shard manager replicas",
    "replicas": 3,
    "writes": "durable: fdatasync on a majority before the ack",
    "reads": "strong (linearizable): served by the leader after a read-index round",
    "client": "the SDK (trio), one AsyncClient shared by the client loops, "
              "requests sent to each shard's leader",
}
ETCD_ENDPOINTS: Final = {
    "leader": "the leader only, found with Maintenance/Status after the start (raftkv's SDK "
              "too sends each request to its shard's leader)",
    "all": "all 3 members, one gRPC channel each, requests round-robin over them (as "
           "clientv3's default balancer); followers forward puts and ask the leader for "
           "a read index",
}
ETCD_SETUP: Final = {
    "members": 3,
    "writes": "durable: etcd's default fsync of its WAL on a majority before the ack",
    "reads": "linearizable Range (serializable=false: ReadIndex)",
    "api": "native gRPC (etcdserverpb.KV/Put and KV/Range), grpcio's asyncio API",
    "flags": "heartbeat 50 ms, election timeout 500 ms, pre-vote; defaults otherwise",
}


@dataclass(frozen=True)
class Options:
    targets: list[str]
    workloads: list[str]
    clients: list[int]
    duration_s: float
    distribution: str
    records: int
    value_bytes: int
    physical_shards: list[int]
    etcd_endpoints: str = "leader"
    seed: int = SEED
    load_clients: int = LOAD_CLIENTS


class BenchError(Exception):
    """A load generator failed (its message holds the last line it wrote)."""


def run_bench(cluster_dir: Path, options: Options, json_path: Path | None,
              plots_dir: Path | None) -> int:
    """Run every target; 0 when every point ran without client errors, 1 otherwise."""
    report: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "loadavg_at_start": os.getloadavg()},
        "code": code_version(),
        "options": {**asdict(options),
                    "workload_mix": {w: WORKLOADS[w].description for w in options.workloads},
                    "loadgen": "one process per point; CPU from getrusage over the window"},
        "results": [],
        "skipped": {},
    }
    failure: str | None = None
    try:
        for target in options.targets:
            if target == "raftkv":
                report["raftkv"] = RAFTKV_SETUP
                for shards in options.physical_shards:
                    report["results"] += _bench_raftkv(Path(cluster_dir) / "bench", options,
                                                       shards)
            else:
                report["results"] += _bench_etcd(Path(cluster_dir) / "bench-etcd", options,
                                                 report)
    except BenchError as exc:
        failure = str(exc)
        click.echo(f"raftkv bench: stopped: {failure}", err=True)
    report["ratios"] = ratios(report["results"])
    if failure is not None:
        report["failure"] = failure
    _echo_ratios(report["ratios"])
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(_pairs_on_one_line(json.dumps(report, indent=2)) + "\n")
        click.echo(f"wrote {json_path}")
    if plots_dir is not None and report["results"]:
        from raftkv_cli.bench_plot import write_plots

        for path in write_plots(report, plots_dir):
            click.echo(f"wrote {path}")
    errors = sum(r["errors"] for r in report["results"])
    return 1 if failure is not None or errors else 0


_PAIR: Final = re.compile(r"\[\s+(-?[0-9.e+-]+),\s+(-?[0-9.e+-]+)\s+\]")


def _pairs_on_one_line(text: str) -> str:
    """Indented JSON with each ``[number, number]`` (histogram buckets) on one line."""
    return _PAIR.sub(r"[\1, \2]", text)


def wait_balanced(cluster: LocalCluster, timeout_s: float = 20.0) -> dict[str, int]:
    """Wait until no node leads more than its share of shards (rounded up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        leaders = cluster.leaders()
        counts = {n: list(leaders.values()).count(n) for n in cluster.node_ids}
        share = -(-len(leaders) // len(cluster.node_ids))
        if max(counts.values()) <= share or time.monotonic() > deadline:
            return counts
        time.sleep(0.5)


def _bench_raftkv(directory: Path, options: Options, shards: int) -> list[dict[str, Any]]:
    if directory.exists():
        if (directory / "cluster.json").exists():
            open_cluster(directory).stop()
        shutil.rmtree(directory)
    cluster = LocalCluster.create(directory, physical_shards=shards)
    try:
        cluster.start()
        leaders = wait_balanced(cluster)
        endpoints = cluster.client_addresses()
        loaded = _load("raftkv", endpoints, options)
        click.echo(f"raftkv: 3 nodes (dc1..dc3), {shards} physical shard(s), leaders per "
                   f"node {leaders}; {options.records} keys loaded in {loaded['elapsed_s']} s")
        return _run_points("raftkv", endpoints, options, shards)
    finally:
        cluster.stop()


def _bench_etcd(directory: Path, options: Options, report: dict[str, Any]
                ) -> list[dict[str, Any]]:
    from jepsen_lite.etcd import EtcdCluster, EtcdError, ensure_etcd, find_etcd
    from raftkv_cli.etcd_grpc import endpoint_of, find_leader

    try:
        if find_etcd() is None:
            click.echo("etcd: not installed; installing Debian's etcd-server (apt-get)")
        binary = ensure_etcd()
    except EtcdError as exc:
        return _skip_etcd(report, str(exc))
    if directory.exists():
        shutil.rmtree(directory)
    cluster = EtcdCluster(directory, size=3, binary=binary)
    try:
        try:
            cluster.start(timeout_s=30.0)
            members = [endpoint_of(url) for url in cluster.client_urls]
            leader = asyncio.run(find_leader(members))
        except (EtcdError, TimeoutError) as exc:
            return _skip_etcd(report, f"{exc}".splitlines()[0])
        endpoints = [leader.endpoint] if options.etcd_endpoints == "leader" else members
        report["etcd"] = {"version": leader.version,
                          "endpoints": ETCD_ENDPOINTS[options.etcd_endpoints], **ETCD_SETUP}
        loaded = _load("etcd", endpoints, options)
        click.echo(f"etcd {leader.version}: 3 members on 127.0.0.1, requests to "
                   f"{'the leader' if len(endpoints) == 1 else 'all, round-robin'}; "
                   f"{options.records} keys loaded in {loaded['elapsed_s']} s")
        return _run_points("etcd", endpoints, options, None)
    finally:
        cluster.stop()


def _skip_etcd(report: dict[str, Any], reason: str) -> list[dict[str, Any]]:
    click.echo(f"etcd: skipped: {reason}")
    report["skipped"]["etcd"] = reason
    return []


def _load(target: str, endpoints: list[str], options: Options) -> dict[str, Any]:
    result = run_loadgen({
        "target": target, "endpoints": endpoints, "mode": "load",
        "records": options.records, "value_bytes": options.value_bytes,
        "clients": min(options.load_clients, options.records), "seed": options.seed,
    }, LOAD_TIMEOUT_S)
    if result["errors"]:
        raise BenchError(f"{target}: loading {options.records} keys: {result['errors']} "
                         f"writes failed ({result['error_kinds']})")
    return result


def _run_points(target: str, endpoints: list[str], options: Options,
                shards: int | None) -> list[dict[str, Any]]:
    results = []
    for workload in options.workloads:
        for clients in options.clients:
            spec = {
                "target": target, "endpoints": endpoints, "mode": "run",
                "workload": workload, "clients": clients, "duration_s": options.duration_s,
                "distribution": options.distribution, "records": options.records,
                "value_bytes": options.value_bytes, "seed": options.seed,
            }
            measured = run_loadgen(spec, options.duration_s + LOADGEN_OVERHEAD_S)
            result = {
                "target": target, "workload": workload, "clients": clients,
                "physical_shards": shards, "distribution": options.distribution,
                "value_bytes": options.value_bytes, **measured,
            }
            results.append(result)
            _echo_point(result)
    return results


def run_loadgen(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run one load generator process on ``spec``; its JSON result."""
    try:
        done = subprocess.run([sys.executable, "-m", "raftkv_cli.loadgen"],
                              input=json.dumps(spec), capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{spec['target']}: the load generator ran over {timeout_s:.0f} s "
                         f"({_describe(spec)})") from exc
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"{spec['target']}: the load generator exited with "
                         f"{done.returncode} ({_describe(spec)}): {last}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _describe(spec: dict[str, Any]) -> str:
    if spec["mode"] == "load":
        return f"loading {spec['records']} keys"
    return f"workload {spec['workload']}, {spec['clients']} clients"


def _echo_point(r: dict[str, Any]) -> None:
    shards = "-" if r["physical_shards"] is None else r["physical_shards"]
    line = (f"{r['target']:<6} shards {shards:>2}  {r['workload']:<5} {r['clients']:>4} clients "
            f"{r['ops_per_s']:>9.1f} ops/s  p50 {_ms(r['p50_ms'])}  p99 {_ms(r['p99_ms'])}  "
            f"errors {r['errors']}  loadgen cpu {r['loadgen_cpu_pct']:.0f}%")
    if r["loadgen_cpu_ms_per_op"] is not None:
        line += f", {r['loadgen_cpu_ms_per_op']:.3f} ms/op"
    if r["loadgen_cpu_pct"] >= LOADGEN_SATURATED_PCT:
        line += "  (load generator near one core: it may be the limit here)"
    click.echo(line)


def _ms(value: float | None) -> str:
    return "      -" if value is None else f"{value:>7.2f} ms"


def _echo_ratios(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    click.echo("raftkv / etcd, same run (ops/s above 1: raftkv faster; "
               "latency below 1: raftkv faster)")
    click.echo(f"{'workload':<8} {'clients':>7} {'shards':>6} {'ops/s':>7} {'p50':>7} {'p99':>7}")
    for row in rows:
        cells = [_times(row[k]) for k in ("ops_per_s", "p50_ms", "p99_ms")]
        click.echo(f"{row['workload']:<8} {row['clients']:>7} {row['physical_shards']:>6} "
                   f"{cells[0]:>7} {cells[1]:>7} {cells[2]:>7}")


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"

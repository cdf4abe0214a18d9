"""``raftkv bench``: puts and strong gets at several client counts, against
one physical shard and against several.

For each physical-shard count, starts a fresh local cluster under the given
directory (3 nodes, each in its own data center, plus the 3 shard manager
replicas), waits until leadership is balanced, runs each workload for
``duration_s`` per client count, prints a table and writes JSON. The load
generator's CPU use is reported so a saturated generator is visible.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import click
import trio

from raftkv.client import open_client
from raftkv.localcluster import LocalCluster
from raftkv_cli.common import open_cluster
from raftkv_cli.workload import percentile, run_clients


async def _measure(addresses: list[str], counts: list[int], duration_s: float,
                   value_bytes: int, physical_shards: int) -> list[dict[str, Any]]:
    value = b"v" * value_bytes
    results = []
    async with open_client(addresses, request_timeout_s=10.0) as client:
        await client.put("bench-warmup", value)

        async def put(c: Any, w: int, n: int) -> None:
            await c.put(f"bench-{w}-{n % 1000}", value)

        async def get(c: Any, w: int, n: int) -> None:
            await c.get(f"bench-{w}-{n % 1000}")

        for clients in counts:
            for name, op in (("put", put), ("get", get)):
                recorder, elapsed_s, cpu_used_s = await run_clients(client, clients, duration_s, op)
                lat = recorder.latencies_s
                results.append({
                    "workload": name, "physical_shards": physical_shards,
                    "clients": clients, "ops": len(lat),
                    "ops_per_s": round(len(lat) / elapsed_s, 1),
                    "p50_ms": round(percentile(lat, 0.50) * 1000, 3),
                    "p99_ms": round(percentile(lat, 0.99) * 1000, 3),
                    "errors": sum(recorder.errors.values()),
                    "loadgen_cpu_pct": round(100 * cpu_used_s / elapsed_s, 1),
                })
                r = results[-1]
                click.echo(f"{name:<4} {physical_shards:>2} shards {clients:>4} clients "
                           f"{r['ops_per_s']:>10.1f} ops/s  "
                           f"p50 {r['p50_ms']:>7.2f} ms  p99 {r['p99_ms']:>7.2f} ms  "
                           f"errors {r['errors']}  loadgen cpu {r['loadgen_cpu_pct']}%")
    return results


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


def run_bench(cluster_dir: Path, counts: list[int], duration_s: float, value_bytes: int,
              json_path: Path | None, physical_shards: list[int]) -> int:
    directory = Path(cluster_dir) / "bench"
    results: list[dict[str, Any]] = []
    for shards in physical_shards:
        if directory.exists():
            old = open_cluster(directory) if (directory / "cluster.json").exists() else None
            if old is not None:
                old.stop()
            shutil.rmtree(directory)
        cluster = LocalCluster.create(directory, physical_shards=shards)
        try:
            cluster.start()
            leaders = wait_balanced(cluster)
            click.echo(f"raftkv bench: 3 nodes (dc1..dc3), {shards} physical shard(s), "
                       f"leaders per node {leaders}, {value_bytes}-byte values, "
                       f"{duration_s} s per point")
            results += trio.run(_measure, cluster.client_addresses(), counts, duration_s,
                                value_bytes, shards)
        finally:
            cluster.stop()
    report = {
        "target": "raftkv", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "duration_s": duration_s, "value_bytes": value_bytes, "results": results,
    }
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_path}")
    return 0

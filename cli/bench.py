"""``raftkv bench``: puts and strong gets at several client counts.

Starts a fresh 3-node local cluster (each node in its own data center) under
the given directory, runs each workload for ``duration_s`` per client count,
prints a table and writes JSON. The load generator's CPU use is reported so a
saturated generator is visible.
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
from raftkv_cli.workload import percentile, run_clients


async def _measure(addresses: list[str], counts: list[int], duration_s: float,
                   value_bytes: int) -> list[dict[str, Any]]:
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
                    "workload": name, "clients": clients, "ops": len(lat),
                    "ops_per_s": round(len(lat) / elapsed_s, 1),
                    "p50_ms": round(percentile(lat, 0.50) * 1000, 3),
                    "p99_ms": round(percentile(lat, 0.99) * 1000, 3),
                    "errors": sum(recorder.errors.values()),
                    "loadgen_cpu_pct": round(100 * cpu_used_s / elapsed_s, 1),
                })
                r = results[-1]
                click.echo(f"{name:<4} {clients:>4} clients {r['ops_per_s']:>10.1f} ops/s  "
                           f"p50 {r['p50_ms']:>7.2f} ms  p99 {r['p99_ms']:>7.2f} ms  "
                           f"errors {r['errors']}  loadgen cpu {r['loadgen_cpu_pct']}%")
    return results


def run_bench(cluster_dir: Path, counts: list[int], duration_s: float, value_bytes: int,
              json_path: Path | None) -> int:
    directory = Path(cluster_dir) / "bench"
    if directory.exists():
        old = LocalCluster(directory) if (directory / "cluster.json").exists() else None
        if old is not None:
            old.stop()
        shutil.rmtree(directory)
    cluster = LocalCluster.create(directory)
    try:
        cluster.start()
        click.echo(f"raftkv bench: 3 nodes (dc1..dc3), 1 physical shard, {value_bytes}-byte "
                   f"values, {duration_s} s per point")
        results = trio.run(_measure, cluster.client_addresses(), counts, duration_s, value_bytes)
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

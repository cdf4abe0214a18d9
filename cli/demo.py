"""``raftkv demo``: the main job. A fresh 3-data-center cluster, a concurrent
workload of puts and compare-and-set increments, a kill -9 of the leader in
the middle of it, a restart, and a check that every acknowledged write is there.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click
import trio

from raftkv.client import AsyncClient, open_client
from raftkv.config import ConfigError
from raftkv.errors import PreconditionFailed, RaftKVError
from raftkv.localcluster import LocalCluster, kill_processes_of
from raftkv_cli.status import cluster_status, render_status
from raftkv_cli.workload import percentile

MARKER = ".raftkv-demo"


def stop_demo_cluster(directory: Path) -> None:
    """Stop the previous demo's cluster: by its config, or by its pid files when
    this version cannot read the config (a demo made by an older version)."""
    if not (directory / "cluster.json").exists():
        return
    try:
        cluster = LocalCluster(directory)
    except ConfigError:
        kill_processes_of(directory)
        return
    cluster.stop()


def _fresh_directory(directory: Path) -> None:
    if directory.exists():
        if not (directory / MARKER).exists():
            raise click.UsageError(f"{directory} exists and is not a demo directory; "
                                   "give another --dir")
        stop_demo_cluster(directory)
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / MARKER).write_text("created by raftkv demo; deleted by the next demo\n")


NODES_PER_DC = 2
PHYSICAL_SHARDS = 8


async def _kill_busiest_dc(cluster: LocalCluster, acked: dict[str, bytes], after_acks: int,
                           killed: list[str]) -> None:
    """kill -9 every node of the data center whose nodes lead the most shards."""
    while len(acked) < after_acks:
        await trio.sleep(0.01)
    leaders = await trio.to_thread.run_sync(cluster.leaders)
    dc_of = {n.id: n.dc for n in cluster.config.nodes}
    led = [dc_of[n] for n in leaders.values()]
    dc = max(sorted(set(led)), key=led.count)
    victims = [n.id for n in cluster.config.nodes if n.dc == dc]
    click.echo(f"  kill -9 every node of {dc} ({', '.join(victims)}, leading "
               f"{led.count(dc)} of {len(leaders)} physical shards) after {len(acked)} "
               "acknowledged writes")
    for node_id in victims:
        await trio.to_thread.run_sync(cluster.kill_node, node_id)
        killed.append(node_id)


async def _workload(cluster: LocalCluster, keys: int, clients: int) -> bool:
    acked: dict[str, bytes] = {}
    increments = 0
    latencies: list[float] = []
    errors: dict[str, int] = {}
    killed: list[str] = []

    async def writer(client: AsyncClient, w: int) -> None:
        nonlocal increments
        for i in range(w, keys, clients):
            key, value = f"demo-{i}", f"value-{i}-{time.time_ns()}".encode()
            started = time.perf_counter()
            try:
                await client.put(key, value)
            except RaftKVError as exc:
                errors[exc.code] = errors.get(exc.code, 0) + 1
                continue
            latencies.append(time.perf_counter() - started)
            acked[key] = value
            if i % 10 == 0:
                while True:
                    current = await client.get("demo-counter")
                    new = str(int(current or b"0") + 1).encode()
                    try:
                        await client.cas("demo-counter", current, new)
                        increments += 1
                        break
                    except PreconditionFailed:
                        continue

    started = time.perf_counter()
    async with open_client(cluster.client_addresses()) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_kill_busiest_dc, cluster, acked, keys // 3, killed)
            for w in range(clients):
                nursery.start_soon(writer, client, w)
        elapsed = time.perf_counter() - started
        click.echo(f"  {len(acked)} puts and {increments} cas increments acknowledged in "
                   f"{elapsed:.1f} s by {clients} concurrent clients; put latency p50 "
                   f"{percentile(latencies, 0.5) * 1000:.1f} ms, p99 "
                   f"{percentile(latencies, 0.99) * 1000:.1f} ms; errors {errors or 'none'}")
        for node_id in killed:
            await trio.to_thread.run_sync(cluster.start_node, node_id)
            click.echo(f"  restarted {node_id}")
        lost = 0
        for key, value in acked.items():
            if await client.get(key) != value:
                lost += 1
        counter = int(await client.get("demo-counter") or b"0")
    ok = lost == 0 and counter == increments
    click.echo(f"  verified with linearizable reads: {len(acked) - lost}/{len(acked)} "
               f"acknowledged writes present, counter {counter} == {increments} increments: "
               f"{'OK' if ok else 'FAILED'}")
    return ok


def run_demo(directory: Path | None, keys: int, clients: int, keep: bool) -> int:
    directory = Path(directory or Path.home() / ".raftkv" / "demo")
    _fresh_directory(directory)
    click.echo(f"1. starting 3 data centers x {NODES_PER_DC} nodes, a 3-replica shard manager "
               f"and {PHYSICAL_SHARDS} physical shards at {directory}")
    cluster = LocalCluster.create(directory, dcs=3, nodes_per_dc=NODES_PER_DC,
                                  physical_shards=PHYSICAL_SHARDS)
    try:
        started = time.perf_counter()
        cluster.start()
        leaders = cluster.leaders()
        click.echo(f"   every shard has a leader after {time.perf_counter() - started:.1f} s: "
                   + ", ".join(f"{s}:{n}" for s, n in sorted(leaders.items())))
        click.echo(f"2. workload: {keys} keys from {clients} clients")
        ok = trio.run(_workload, cluster, keys, clients)
        cluster.wait_ready()
        click.echo("3. status")
        render_status(cluster_status(cluster))
    finally:
        if not keep:
            click.echo("4. stopping the cluster")
            cluster.stop()
    return 0 if ok else 1

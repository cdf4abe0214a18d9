"""``raftkv keyspace``, ``shards``, ``import``, ``export``, ``scan`` and ``fault``."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import click
import trio

from raftkv.client.client import open_client
from raftkv.errors import RaftKVError
from raftkv.localcluster import ClusterError, LocalCluster
from raftkv.protocol.messages import PutOp
from raftkv_cli.common import (
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    cluster_dir_option,
    fail,
    keyspace_option,
    open_cluster,
    run_trio,
)

IMPORT_BATCH_KEYS = 200
IMPORT_CONCURRENCY = 32
IMPORT_BATCH_BYTES = 1 << 20


def manager_call(cluster: LocalCluster, msg: dict[str, Any]) -> Any:
    try:
        return cluster.manager(msg)
    except RaftKVError as exc:
        code = EXIT_USAGE if exc.code == "BAD_REQUEST" else EXIT_UNAVAILABLE
        fail(f"{exc.code}: {exc.message}", code)
    except ClusterError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)


def _text(data: bytes) -> dict[str, str]:
    """A key or value for JSON: text if it is UTF-8, else base64 (``*_b64``)."""
    try:
        return {"": data.decode()}
    except UnicodeDecodeError:
        return {"_b64": base64.b64encode(data).decode()}


def _line(key: bytes, value: bytes) -> str:
    out: dict[str, str] = {}
    for name, data in (("key", key), ("value", value)):
        for suffix, text in _text(data).items():
            out[name + suffix] = text
    return json.dumps(out, ensure_ascii=False)


def _field(record: dict[str, Any], name: str, line_no: int) -> bytes:
    if isinstance(record.get(name), str):
        return str(record[name]).encode()
    if isinstance(record.get(name + "_b64"), str):
        try:
            return base64.b64decode(record[name + "_b64"], validate=True)
        except ValueError:
            pass
    fail(f"line {line_no}: needs \"{name}\" as text (or \"{name}_b64\" as base64)", EXIT_USAGE)


@click.group()
def keyspace() -> None:
    """Create, list and drop keyspaces."""

@keyspace.command("create")
@cluster_dir_option
@click.argument("name")
@click.option("--logical-shards", type=click.IntRange(1, 65536), default=None,
              help="Power of two (default: the cluster's, 256).")
@click.option("--replication-factor", type=click.IntRange(1, 9), default=None)
@click.option("--physical-shards", type=click.IntRange(1, 4096), default=None)
@click.option("--timeout-s", type=float, default=30.0, show_default=True)
def keyspace_create(cluster_dir: Path, name: str, logical_shards: int | None,
                    replication_factor: int | None, physical_shards: int | None,
                    timeout_s: float) -> None:
    """Create keyspace NAME on new physical shards; wait until it serves."""
    cluster = open_cluster(cluster_dir)
    msg: dict[str, Any] = {"op": "ks_create", "name": name}
    for field, value in (("logical_shards", logical_shards),
                         ("replication_factor", replication_factor),
                         ("physical_shards", physical_shards)):
        if value is not None:
            msg[field] = value
    created = manager_call(cluster, msg)
    deadline = time.monotonic() + timeout_s
    while True:
        listed = {k["name"]: k for k in manager_call(cluster, {"op": "ks_list"})}
        if listed.get(name, {}).get("state") == "active":
            break
        if time.monotonic() > deadline:
            fail(f"keyspace {name!r} was created but is not serving after {timeout_s} s",
                 EXIT_UNAVAILABLE)
        time.sleep(0.1)
    click.echo(f"keyspace {name} created: {created['logical_shards']} logical shards on "
               f"physical shards {', '.join(map(str, created['physical_shards']))} "
               f"(replication factor {created['replication_factor']})")

@keyspace.command("list")
@cluster_dir_option
@click.option("--json", "as_json", is_flag=True)
def keyspace_list(cluster_dir: Path, as_json: bool) -> None:
    """List keyspaces."""
    listed = manager_call(open_cluster(cluster_dir), {"op": "ks_list"})
    if as_json:
        click.echo(json.dumps(listed, indent=2))
        return
    click.echo(f"{'KEYSPACE':<20} {'ID':>4} {'STATE':<9} {'LOGICAL':>8} {'RF':>3}  PHYSICAL")
    for k in listed:
        click.echo(f"{k['name']:<20} {k['id']:>4} {k['state']:<9} {k['logical_shards']:>8} "
                   f"{k['replication_factor']:>3}  "
                   f"{','.join(map(str, k['physical_shards']))}")

@keyspace.command("drop")
@cluster_dir_option
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def keyspace_drop(cluster_dir: Path, name: str, yes: bool) -> None:
    """Drop keyspace NAME and delete all its data."""
    if not yes:
        click.confirm(f"Delete keyspace {name!r} and all its data?", abort=True)
    manager_call(open_cluster(cluster_dir), {"op": "ks_drop", "name": name})
    click.echo(f"keyspace {name} dropped; its data is being deleted")

@click.command()
@cluster_dir_option
@keyspace_option
@click.option("--json", "as_json", is_flag=True)
def shards(cluster_dir: Path, keyspace: str, as_json: bool) -> None:
    """Logical shards of a keyspace and the physical shard serving each."""
    view = manager_call(open_cluster(cluster_dir), {"op": "map"})
    ks = view["keyspaces"].get(keyspace)
    if ks is None:
        fail(f"no keyspace {keyspace!r}", EXIT_USAGE)
    if as_json:
        click.echo(json.dumps({"keyspace": keyspace, "version": view["version"],
                               "logical_shards": ks["map"]}, indent=2))
        return
    click.echo(f"keyspace {keyspace}, map version {view['version']}")
    click.echo(f"{'LOGICAL':<12} {'PHYSICAL':>8}  REPLICAS")
    start = 0
    for ls in range(1, len(ks["map"]) + 1):
        if ls == len(ks["map"]) or ks["map"][ls] != ks["map"][start]:
            shard = ks["map"][start]
            span = f"{start}" if ls - 1 == start else f"{start}-{ls - 1}"
            replicas = ",".join(r["node"] for r in view["shards"][str(shard)])
            click.echo(f"{span:<12} {shard:>8}  {replicas}")
            start = ls

@click.command("import")
@cluster_dir_option
@keyspace_option
@click.argument("file", type=click.File("r"))
def import_(cluster_dir: Path, keyspace: str, file: Any) -> None:
    """Load JSON lines {"key": ..., "value": ...} (or key_b64 / value_b64)."""
    cluster = open_cluster(cluster_dir)
    pairs = []
    for line_no, line in enumerate(file, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            fail(f"line {line_no}: not JSON: {exc}", EXIT_USAGE)
        if not isinstance(record, dict):
            fail(f"line {line_no}: not a JSON object", EXIT_USAGE)
        pairs.append((_field(record, "key", line_no), _field(record, "value", line_no)))
    started = time.monotonic()
    try:
        run_trio(_import, cluster.client_addresses(), keyspace, pairs)
    except RaftKVError as exc:
        fail(f"{exc.code}: {exc.message} (some keys may not be imported)", EXIT_UNAVAILABLE)
    elapsed = time.monotonic() - started
    click.echo(f"imported {len(pairs)} keys in {elapsed:.1f} s "
               f"({len(pairs) / max(elapsed, 1e-9):,.0f} keys/s)")

@click.command()
@cluster_dir_option
@keyspace_option
@click.option("--output", "-o", type=click.File("w"), default="-")
def export(cluster_dir: Path, keyspace: str, output: Any) -> None:
    """Write every key as JSON lines, read with strong (linearizable) reads."""
    cluster = open_cluster(cluster_dir)

    async def run() -> int:
        count = 0
        async with open_client(cluster.client_addresses(), keyspace=keyspace,
                               watch_map=False) as kv:
            async for page in kv.export():
                for key, value in page:
                    output.write(_line(key, value) + "\n")
                count += len(page)
        return count

    try:
        count = run_trio(run)
    except RaftKVError as exc:
        fail(f"{exc.code}: {exc.message}", EXIT_UNAVAILABLE)
    click.echo(f"exported {count} keys", err=True)

@click.command()
@cluster_dir_option
@keyspace_option
@click.option("--prefix", required=True, help="Key prefix with a hash tag: {user42}:")
@click.option("--limit", type=click.IntRange(1), default=None)
def scan(cluster_dir: Path, keyspace: str, prefix: str, limit: int | None) -> None:
    """Keys starting with PREFIX (within one hash tag), as JSON lines."""
    from raftkv_cli.common import with_client

    pairs = with_client(cluster_dir, lambda kv: kv.scan(prefix, limit=limit), keyspace)
    for key, value in pairs:
        click.echo(_line(key, value))

@click.command()
@cluster_dir_option
@click.argument("action", type=click.Choice(["cut-node", "cut-dc", "cut-pair", "partition",
                                             "latency", "heal", "show"]))
@click.argument("targets", nargs=-1)
def fault(cluster_dir: Path, action: str, targets: tuple[str, ...]) -> None:
    """Inject network faults between nodes and shard manager replicas.

    \b
    cut-node N...      cut N from every other process
    cut-dc DC...       cut the processes of DC from every other
    cut-pair A B       cut the link between A and B
    partition A,B C,D  split into the given groups (everything unlisted is alone)
    latency MS         one-way latency between data centers
    heal               remove every cut (latency stays)
    show               print the fault spec
    """
    cluster = open_cluster(cluster_dir)
    spec = cluster.fault_spec()
    everyone = cluster.config.process_ids
    dcs = {p: cluster.config.dc_of(p) for p in everyone}
    try:
        if action == "cut-node":
            _known(targets, everyone)
            for target in targets:
                spec = spec.isolate([target], everyone)
        elif action == "cut-dc":
            _known(targets, set(dcs.values()))
            for dc in targets:
                spec = spec.isolate([p for p in everyone if dcs[p] == dc], everyone)
        elif action == "cut-pair":
            if len(targets) != 2:
                raise click.UsageError("cut-pair needs two ids")
            _known(targets, everyone)
            spec = spec.cut_pair(*targets)
        elif action == "partition":
            groups = [g.split(",") for g in targets]
            _known([p for g in groups for p in g], everyone)
            for group in groups:
                spec = spec.isolate(group, everyone)
        elif action == "latency":
            if len(targets) != 1:
                raise click.UsageError("latency needs one number of milliseconds")
            spec = spec.with_latency(float(targets[0]))
        elif action == "heal":
            spec = spec.heal()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if action != "show":
        unreachable = cluster.set_fault_spec(spec)
        if unreachable:
            click.echo(f"not running (they read the spec when they start): "
                       f"{', '.join(unreachable)}", err=True)
    click.echo(json.dumps(spec.to_json()))



def register(cli: click.Group) -> None:
    for command in (keyspace, shards, import_, export, scan, fault):
        cli.add_command(command)

def _known(ids: Any, known: Any) -> None:
    unknown = sorted(set(ids) - set(known))
    if unknown:
        raise click.UsageError(f"unknown: {', '.join(unknown)} (known: "
                               f"{', '.join(sorted(known))})")


async def _import(managers: list[str], keyspace: str, pairs: list[tuple[bytes, bytes]]) -> None:
    """Puts grouped by logical shard into batches, many batches in flight."""
    async with open_client(managers, keyspace=keyspace, watch_map=False) as kv:
        smap = await kv.shard_map()
        by_shard: dict[int, list[tuple[bytes, bytes]]] = {}
        for key, value in pairs:
            by_shard.setdefault(smap.logical_shard(keyspace, key), []).append((key, value))
        batches: list[list[tuple[bytes, bytes]]] = []
        for group in by_shard.values():
            batch: list[tuple[bytes, bytes]] = []
            size = 0
            for key, value in group:
                if batch and (len(batch) >= IMPORT_BATCH_KEYS
                              or size + len(key) + len(value) > IMPORT_BATCH_BYTES):
                    batches.append(batch)
                    batch, size = [], 0
                batch.append((key, value))
                size += len(key) + len(value)
            batches.append(batch)
        limiter = trio.CapacityLimiter(IMPORT_CONCURRENCY)

        async def send(batch: list[tuple[bytes, bytes]]) -> None:
            async with limiter:
                await kv.batch([PutOp(k, v) for k, v in batch])

        async with trio.open_nursery() as nursery:
            for batch in batches:
                nursery.start_soon(send, batch)

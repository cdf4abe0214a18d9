"""The ``raftkv`` command.

Exit codes: 0 ok; 1 key not found or precondition failed; 2 usage error;
3 cluster unavailable. Every error is one line on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from raftkv.localcluster import ClusterError, LocalCluster
from raftkv_cli.admin import register as register_admin
from raftkv_cli.common import (
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    cluster_dir_option,
    decode_value,
    fail,
    keyspace_option,
    open_cluster,
    value_options,
    with_client,
)
from raftkv_cli.reshard import register as register_reshard
from shardmgr.reshard import COPY_KEYS_PER_S_DEFAULT, PER_NODE_MAX_DEFAULT


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """raftkv: a consistency-first distributed key/value store."""


@cli.command()
@cluster_dir_option
@click.option("--dcs", type=click.IntRange(1, 9), default=3, show_default=True,
              help="Simulated data centers.")
@click.option("--nodes-per-dc", type=click.IntRange(1, 16), default=1, show_default=True)
@click.option("--physical-shards", type=click.IntRange(1, 4096), default=1, show_default=True,
              help="Raft groups of keyspace 'default'.")
@click.option("--logical-shards", type=click.IntRange(1, 65536), default=256,
              show_default=True, help="Logical shards of keyspace 'default' (power of two).")
@click.option("--replication-factor", type=click.IntRange(1, 9), default=3, show_default=True)
@click.option("--inter-dc-latency-ms", type=click.FloatRange(0, 10_000), default=0.0,
              show_default=True, help="One-way latency added between data centers.")
@click.option("--hosts", default="127.0.0.1", show_default=True,
              help="Comma-separated local addresses to spread processes over.")
@click.option("--timeout-s", type=float, default=60.0, show_default=True)
def up(cluster_dir: Path, dcs: int, nodes_per_dc: int, physical_shards: int,
       logical_shards: int, replication_factor: int, inter_dc_latency_ms: float, hosts: str,
       timeout_s: float) -> None:
    """Start a local cluster in the background (restart it if DIR has one).

    Creates DIR with 3 shard manager replicas and DCS x NODES-PER-DC nodes on
    first use; the layout options apply only then. Returns once keyspace
    'default' exists and every physical shard has a leader.
    """
    if logical_shards & (logical_shards - 1):
        raise click.BadParameter("must be a power of two", param_hint="--logical-shards")
    if physical_shards > logical_shards:
        raise click.BadParameter("must not exceed --logical-shards",
                                 param_hint="--physical-shards")
    try:
        cluster = LocalCluster.open_or_create(
            cluster_dir, dcs=dcs, nodes_per_dc=nodes_per_dc, physical_shards=physical_shards,
            logical_shards=logical_shards, replication_factor=replication_factor,
            inter_dc_latency_ms=inter_dc_latency_ms,
            hosts=[h.strip() for h in hosts.split(",") if h.strip()])
        cluster.start(timeout_s)
    except ClusterError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    leaders = cluster.leaders()
    dc_count = len({n.dc for n in cluster.config.nodes})
    click.echo(f"cluster up at {cluster.directory}: {len(cluster.node_ids)} nodes in "
               f"{dc_count} data centers, {len(leaders)} physical shards with leaders")


@cli.command()
@cluster_dir_option
def down(cluster_dir: Path) -> None:
    """Stop the local cluster's node processes (data is kept)."""
    cluster = open_cluster(cluster_dir)
    cluster.stop()
    click.echo(f"cluster at {cluster.directory} stopped")


@cli.command()
@click.option("--cluster", "cluster_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--id", "node_id", required=True, help="Node id from cluster.json.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Data directory (default: CLUSTER/ID).")
@click.option("--log-level", default="WARNING", show_default=True)
def node(cluster_dir: Path, node_id: str, data_dir: Path | None, log_level: str) -> None:
    """Run one node process in the foreground (``up`` starts these for you)."""
    import logging

    from raftkv.server.node import run_node

    logging.basicConfig(level=log_level.upper(),
                        format=f"%(asctime)s {node_id} %(levelname)s %(name)s: %(message)s")
    run_node(cluster_dir, node_id, data_dir)


@cli.command()
@click.option("--cluster", "cluster_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--id", "manager_id", required=True, help="Shard manager id from cluster.json.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Data directory (default: CLUSTER/ID).")
@click.option("--log-level", default="WARNING", show_default=True)
def shardmgr(cluster_dir: Path, manager_id: str, data_dir: Path | None, log_level: str) -> None:
    """Run one shard manager replica in the foreground (``up`` starts these)."""
    import logging

    from shardmgr.service import run_manager

    logging.basicConfig(level=log_level.upper(),
                        format=f"%(asctime)s {manager_id} %(levelname)s %(name)s: %(message)s")
    run_manager(cluster_dir, manager_id, data_dir)


@cli.command()
@cluster_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable).")
def status(cluster_dir: Path, as_json: bool) -> None:
    """Nodes and physical shards of the cluster."""
    from raftkv_cli.status import cluster_status, render_status

    cluster = open_cluster(cluster_dir)
    report = cluster_status(cluster)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        render_status(report)
    if not any(n["alive"] for n in report["nodes"]):
        sys.exit(EXIT_UNAVAILABLE)


@cli.command()
@cluster_dir_option
@click.argument("key")
@click.argument("value", required=False)
@click.option("--file", "value_file", type=click.File("rb"), help="Read the value from a file.")
@value_options
@keyspace_option
def put(cluster_dir: Path, key: str, value: str | None, value_file: Any, as_hex: bool,
        keyspace: str) -> None:
    """Set KEY to VALUE."""
    if (value is None) == (value_file is None):
        raise click.UsageError("give exactly one of VALUE or --file")
    data = value_file.read() if value_file is not None else decode_value(value or "", as_hex)
    result = with_client(cluster_dir, lambda kv: kv.put(key, data), keyspace)
    click.echo(f"OK index={result.index}")


@cli.command()
@cluster_dir_option
@click.argument("key")
@value_options
@click.option("--eventual", is_flag=True, help="Read any replica (may be stale).")
@keyspace_option
def get(cluster_dir: Path, key: str, as_hex: bool, eventual: bool, keyspace: str) -> None:
    """Print the value of KEY (exit 1 if absent)."""
    value = with_client(
        cluster_dir, lambda kv: kv.get(key, consistency="eventual" if eventual else "strong"),
        keyspace)
    if value is None:
        fail(f"key {key!r} not found", EXIT_NOT_FOUND)
    if as_hex:
        click.echo(value.hex())
    else:
        sys.stdout.buffer.write(value + b"\n")


@cli.command()
@cluster_dir_option
@click.argument("key")
@keyspace_option
def delete(cluster_dir: Path, key: str, keyspace: str) -> None:
    """Delete KEY (exit 1 if it did not exist)."""
    existed = with_client(cluster_dir, lambda kv: kv.delete(key), keyspace)
    if not existed:
        fail(f"key {key!r} not found", EXIT_NOT_FOUND)
    click.echo("OK")


@cli.command()
@cluster_dir_option
@click.argument("key")
@click.option("--expect", help="Current value required.")
@click.option("--expect-file", type=click.File("rb"), help="Read the required value from a file.")
@click.option("--expect-absent", is_flag=True, help="Require the key to be absent.")
@click.option("--value", "new_value", help="New value.")
@click.option("--value-file", type=click.File("rb"), help="Read the new value from a file.")
@value_options
@keyspace_option
def cas(cluster_dir: Path, key: str, expect: str | None, expect_file: Any, expect_absent: bool,
        new_value: str | None, value_file: Any, as_hex: bool, keyspace: str) -> None:
    """Set KEY to the new value only if it holds the expected one (or is absent)."""
    if sum((expect is not None, expect_file is not None, expect_absent)) != 1:
        raise click.UsageError("give exactly one of --expect, --expect-file or --expect-absent")
    if (new_value is None) == (value_file is None):
        raise click.UsageError("give exactly one of --value or --value-file")
    expected = (None if expect_absent else expect_file.read() if expect_file is not None
                else decode_value(expect or "", as_hex))
    data = value_file.read() if value_file is not None else decode_value(new_value or "", as_hex)
    result = with_client(cluster_dir, lambda kv: kv.cas(key, expected, data), keyspace)
    click.echo(f"OK index={result.index}")


@cli.command()
@click.option("--dir", "cluster_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Demo directory, wiped first (default ~/.raftkv/demo).")
@click.option("--keys", type=click.IntRange(1), default=2000, show_default=True)
@click.option("--clients", type=click.IntRange(1), default=16, show_default=True)
@click.option("--keep", is_flag=True, help="Leave the cluster running afterwards.")
def demo(cluster_dir: Path | None, keys: int, clients: int, keep: bool) -> None:
    """Start a fresh local cluster, run a workload, kill the leader, verify, stop."""
    from raftkv_cli.demo import run_demo

    code = run_demo(cluster_dir, keys=keys, clients=clients, keep=keep)
    sys.exit(code)


@cli.group(invoke_without_command=True)
@cluster_dir_option
@click.option("--target", "targets", default="raftkv,etcd", show_default=True,
              help="Comma-separated systems to measure, one after the other: raftkv, etcd.")
@click.option("--workload", "workloads", default="A,B,C,write", show_default=True,
              help="Comma-separated YCSB-style workloads: A (50% reads, 50% updates), "
              "B (95% reads), C (reads only), write (updates only).")
@click.option("--clients", "client_counts", default="1,16,64,128", show_default=True,
              help="Comma-separated client counts (concurrent loops, one request each).")
@click.option("--duration-s", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Measured seconds per point (workload x clients).")
@click.option("--distribution", default="zipfian", show_default=True,
              help="Key popularity: zipfian (YCSB's scrambled zipfian) or uniform.")
@click.option("--records", type=click.IntRange(1, 100_000_000), default=10_000,
              show_default=True, help="Keys written before measuring; operations use these.")
@click.option("--value-bytes", type=click.IntRange(1, 1 << 20), default=100, show_default=True)
@click.option("--physical-shards", "shard_counts", default="1", show_default=True,
              help="raftkv only: comma-separated physical shard counts, a fresh cluster each.")
@click.option("--etcd-endpoints", default="leader", show_default=True,
              help="etcd only: send requests to the leader (as raftkv's SDK does), or to "
              "all members round-robin (clientv3's default): leader or all.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the report as JSON here (e.g. under bench/results/).")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Write throughput.png and latency-cdf.png here.")
@click.pass_context
def bench(ctx: click.Context, cluster_dir: Path, targets: str, workloads: str,
          client_counts: str, duration_s: float, distribution: str, records: int,
          value_bytes: int, shard_counts: str, etcd_endpoints: str, json_path: Path | None,
          plots_dir: Path | None) -> None:
    """Benchmarks against fresh local clusters.

    Without a command: YCSB-style workloads against raftkv and a 3-member etcd
    (installed when missing, or skipped with one line), one after the other,
    each point in its own load generator process (the options below belong to
    this one). Exit 0, or 1 if a point saw errors. ``raftkv bench reshard
    --help``: the resharding benchmark; ``raftkv bench plot``: the plots of a
    report.
    """
    if ctx.invoked_subcommand is not None:
        given = [p.opts[0] for p in ctx.command.params if ctx.get_parameter_source(p.name or "")
                 is click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"{', '.join(given)} belong(s) to the YCSB benchmark; "
                                   f"give options after {ctx.invoked_subcommand!r}")
        return
    from raftkv_cli.bench import ETCD_ENDPOINTS, Options, run_bench
    from raftkv_cli.ycsb import DISTRIBUTIONS, TARGETS, WORKLOADS, parse_counts, parse_names

    try:
        options = Options(
            targets=parse_names(targets, TARGETS, "target"),
            workloads=parse_names(workloads, list(WORKLOADS), "workload"),
            clients=parse_counts(client_counts, "--clients"),
            duration_s=duration_s,
            distribution=parse_names(distribution, DISTRIBUTIONS, "distribution", one=True)[0],
            records=records, value_bytes=value_bytes,
            physical_shards=parse_counts(shard_counts, "--physical-shards"),
            etcd_endpoints=parse_names(etcd_endpoints, list(ETCD_ENDPOINTS), "--etcd-endpoints",
                                       one=True)[0])
    except ValueError as exc:
        fail(f"bench: {exc}", EXIT_USAGE)
    try:
        code = run_bench(cluster_dir, options, json_path, plots_dir)
    except ClusterError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    sys.exit(code)


@bench.command("plot")
@click.argument("report", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Directory for throughput.png and latency-cdf.png.")
def bench_plot(report: Path, out_dir: Path) -> None:
    """Plot a ``raftkv bench --json`` REPORT: throughput against clients, and
    the latency distribution at the highest client count, per workload."""
    from raftkv_cli.bench_plot import write_plots

    try:
        data = json.loads(report.read_text())
        if not data.get("results"):
            fail(f"{report}: no results to plot", EXIT_USAGE)
        paths = write_plots(data, out_dir)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        fail(f"{report}: not a raftkv bench report ({type(exc).__name__}: {exc})", EXIT_USAGE)
    for path in paths:
        click.echo(f"wrote {path}")


@bench.command("reshard")
@click.option("--keys", type=click.IntRange(1, 10_000_000), default=200_000, show_default=True,
              help="Keys loaded before the reshard.")
@click.option("--from", "from_shards", type=click.IntRange(1, 4096), default=2,
              show_default=True, help="Physical shards the keyspace starts on.")
@click.option("--to", "to_shards", type=click.IntRange(1, 4096), default=8, show_default=True,
              help="Physical shards to reshard to.")
@click.option("--value-bytes", type=click.IntRange(24, 1 << 20), default=100,
              show_default=True)
@click.option("--clients", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="Background client loops (puts and strong gets of the loaded keys).")
@click.option("--ops-per-s", type=click.FloatRange(0), default=400.0, show_default=True,
              help="Background operations per second in total (0: unpaced).")
@click.option("--workers", type=click.IntRange(0, 64), default=2, show_default=True,
              help="Resharding worker processes (0: workers started elsewhere, "
              "raftkv reshard-worker --dir DIR).")
@click.option("--max-moves-per-node", type=click.IntRange(1, 64),
              default=PER_NODE_MAX_DEFAULT, show_default=True,
              help="Moves at once touching any one node.")
@click.option("--max-keys-per-s", type=click.FloatRange(min=0),
              default=COPY_KEYS_PER_S_DEFAULT, show_default=True,
              help="Keys each worker copies per second at most (0: no limit).")
@click.option("--duration-before-s", type=click.FloatRange(0.5), default=5.0,
              show_default=True, help="Background measurement before the reshard.")
@click.option("--duration-after-s", type=click.FloatRange(0), default=5.0,
              show_default=True, help="Background measurement after the reshard (the new "
              "layout's own cost).")
@click.option("--dcs", type=click.IntRange(1, 9), default=3, show_default=True,
              help="Simulated data centers.")
@click.option("--nodes-per-dc", type=click.IntRange(1, 16), default=1, show_default=True,
              help="More node processes only add overhead on a 2-core machine.")
@click.option("--logical-shards", type=click.IntRange(1, 65536), default=256,
              show_default=True, help="Logical shards of the keyspace (power of two).")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Cluster directory, wiped first and kept afterwards "
              "(default: a temporary one, deleted after a successful run).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the report as JSON here (for example under "
              "bench/results/).")
@click.option("--timeout-s", type=click.FloatRange(1), default=600.0, show_default=True,
              help="Give up on a reshard still running after this long.")
def bench_reshard(keys: int, from_shards: int, to_shards: int, value_bytes: int,
                  clients: int, ops_per_s: float, workers: int, max_moves_per_node: int,
                  max_keys_per_s: float | None, duration_before_s: float,
                  duration_after_s: float, dcs: int, nodes_per_dc: int,
                  logical_shards: int, directory: Path | None, json_path: Path | None,
                  timeout_s: float) -> None:
    """Load KEYS keys into FROM physical shards, reshard to TO under a steady
    background load of reads and writes, then verify every key.

    Reports the reshard's duration, what moved, each logical shard's
    unavailability, background p99 latency before and during, client errors,
    and whether every key holds its last acknowledged value; prints issue 5's
    targets as met or missed. Exit 0 when every key verified with no client
    error (a missed target is only reported), 1 otherwise, 3 if the cluster
    could not start.
    """
    from raftkv_cli.bench_reshard import Options, run_reshard_bench

    if logical_shards & (logical_shards - 1):
        raise click.BadParameter("must be a power of two", param_hint="--logical-shards")
    for name, shards in (("--from", from_shards), ("--to", to_shards)):
        if shards > logical_shards:
            raise click.BadParameter("must not exceed --logical-shards", param_hint=name)
    if dcs * nodes_per_dc < 3:
        raise click.BadParameter("needs at least 3 nodes (replication factor 3)",
                                 param_hint="--dcs/--nodes-per-dc")
    options = Options(keys=keys, from_shards=from_shards, to_shards=to_shards,
                      value_bytes=value_bytes, clients=clients, ops_per_s=ops_per_s,
                      workers=workers, max_moves_per_node=max_moves_per_node,
                      max_keys_per_s=max_keys_per_s, duration_before_s=duration_before_s,
                      duration_after_s=duration_after_s,
                      dcs=dcs, nodes_per_dc=nodes_per_dc,
                      logical_shards=logical_shards, timeout_s=timeout_s)
    try:
        code = run_reshard_bench(directory, options, json_path)
    except ClusterError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    sys.exit(code)


@bench.command("ceilings")
@click.option("--duration-s", type=click.FloatRange(min=0.05), default=5.0, show_default=True,
              help="Length of each measurement.")
@click.option("--value-bytes", type=click.IntRange(1, 1 << 20), default=100, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the results as JSON here.")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Put the databases and journals under here (the disk "
              "measured); default: the system's temporary directory. Deleted afterwards.")
def bench_ceilings(duration_s: float, value_bytes: int, json_path: Path | None,
                   directory: Path | None) -> None:
    """What raftkv's components do alone on this machine: LevelDB writes
    (plyvel), and one Raft group's commits (3 replica processes with the
    project's journal, transport and settings) with a no-op apply and with
    raftkv's apply.

    Exit 0, or 1 if a measurement saw errors, 3 if the group could not start.
    """
    from raftkv_cli.bench_ceilings import run_ceilings

    try:
        code = run_ceilings(duration_s, value_bytes, json_path, directory)
    except ClusterError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    sys.exit(code)


register_admin(cli)
register_reshard(cli)


def main() -> None:
    cli(prog_name="raftkv")


if __name__ == "__main__":
    main()

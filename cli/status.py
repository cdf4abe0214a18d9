"""``raftkv status``: the shard manager's view joined with what every node
reports, as a stable JSON document.

JSON schema (``raftkv status --json``); fields only ever get added::

    {
      "cluster_dir": str,
      "map_version": int | null,
      "manager": {"leader": id | null,
                  "replicas": [{"id", "dc", "alive": bool, "role", "term",
                                "applied_index"}]},
      "dcs": [{"id": str, "nodes": [id], "managers": [id]}],
      "nodes":  [{"id", "dc", "pid": int | null, "client_address",
                  "alive": bool,            # answered a status request
                  "heartbeating": bool,     # the manager's leader sees it alive
                  "replicas": int, "leaders": int}],
      "keyspaces": [{"name", "id", "state", "logical_shards",
                     "replication_factor", "physical_shards": [int]}],
      "shards": [{"id": int, "keyspace": str, "replicas": [node id],
                  "leader": node id | null, "term": int | null,
                  "applied_index": int | null, "commit_index": int | null,
                  "keys": int | null, "disk_bytes": int | null,
                  "logical_shards": int}]
    }

A shard's term, indexes, key count and size are those its leader reports
(null while no leader answers). ``disk_bytes`` is the leader replica's
journal, snapshot and LevelDB files.
"""

from __future__ import annotations

from typing import Any

import click

from raftkv.errors import RaftKVError
from raftkv.localcluster import ClusterError, LocalCluster


def cluster_status(cluster: LocalCluster) -> dict[str, Any]:
    statuses = cluster.statuses()
    try:
        view: dict[str, Any] | None = cluster.manager({"op": "cluster"}, timeout_s=3.0)
    except (ClusterError, RaftKVError):  # no shard manager answers: nodes only
        view = None
    state = (view or {}).get("state", {})
    heartbeats = (view or {}).get("nodes", {})
    managers = []
    for m in cluster.config.managers:
        s = statuses.get(m.id) or {}
        managers.append({"id": m.id, "dc": m.dc, "alive": bool(s), "role": s.get("role"),
                         "term": s.get("term"), "applied_index": s.get("applied_index")})
    leader_reports: dict[int, tuple[str, dict[str, Any]]] = {}
    hosted: dict[str, list[dict[str, Any]]] = {}
    for n in cluster.config.nodes:
        for s in (statuses.get(n.id) or {}).get("shards", []):
            hosted.setdefault(n.id, []).append(s)
            if s["role"] == "leader" and (s["id"] not in leader_reports
                                          or s["term"] > leader_reports[s["id"]][1]["term"]):
                leader_reports[s["id"]] = (n.id, s)
    nodes = []
    for n in cluster.config.nodes:
        reported = statuses.get(n.id)
        mine = hosted.get(n.id, [])
        nodes.append({
            "id": n.id, "dc": n.dc, "pid": (reported or {}).get("pid", cluster.pid(n.id)),
            "client_address": n.client_address, "alive": reported is not None,
            "heartbeating": bool(heartbeats.get(n.id, {}).get("alive")),
            "replicas": len(mine),
            "leaders": sum(1 for r in mine if leader_reports.get(r["id"], ("",))[0] == n.id),
        })
    keyspaces = [
        {"name": k["name"], "id": k["id"], "state": k["state"],
         "logical_shards": k["logical_shards"], "replication_factor": k["replication_factor"],
         "physical_shards": sorted(set(k["logical_map"]))}
        for k in state.get("keyspaces", [])
    ]
    logical_counts: dict[int, int] = {}
    for k in state.get("keyspaces", []):
        for p in k["logical_map"]:
            logical_counts[p] = logical_counts.get(p, 0) + 1
    shards = []
    for shard in state.get("shards", []):
        leader, info = leader_reports.get(shard["id"], (None, {}))
        shards.append({
            "id": shard["id"], "keyspace": shard["keyspace"],
            "replicas": [r["node"] for r in shard["replicas"]],
            "leader": leader, "term": info.get("term"),
            "applied_index": info.get("applied_index"), "commit_index": info.get("commit_index"),
            "keys": info.get("keys"), "disk_bytes": info.get("disk_bytes"),
            "logical_shards": logical_counts.get(shard["id"], 0),
        })
    dc_ids = sorted({n.dc for n in cluster.config.nodes} | {m.dc for m in cluster.config.managers})
    dcs = [{"id": dc, "nodes": [n.id for n in cluster.config.nodes if n.dc == dc],
            "managers": [m.id for m in cluster.config.managers if m.dc == dc]} for dc in dc_ids]
    return {
        "cluster_dir": str(cluster.directory),
        "map_version": state.get("version"),
        "manager": {"leader": (view or {}).get("manager_leader"), "replicas": managers},
        "dcs": dcs, "nodes": nodes, "keyspaces": keyspaces, "shards": shards,
    }


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def render_status(report: dict[str, Any]) -> None:
    click.echo(f"cluster {report['cluster_dir']}  map version {report['map_version']}  "
               f"shard manager leader {report['manager']['leader'] or '-'}")
    for dc in report["dcs"]:
        click.echo(f"  {dc['id']}: nodes {','.join(dc['nodes']) or '-'}; "
                   f"shard manager {','.join(dc['managers']) or '-'}")
    click.echo(f"{'NODE':<6} {'DC':<5} {'PID':>8}  {'ADDRESS':<22} {'ALIVE':<6} "
               f"{'REPLICAS':>8} {'LEADERS':>7}")
    for n in report["nodes"]:
        click.echo(f"{n['id']:<6} {n['dc']:<5} {n['pid'] or '-':>8}  {n['client_address']:<22} "
                   f"{'yes' if n['alive'] else 'NO':<6} {n['replicas']:>8} {n['leaders']:>7}")
    click.echo(f"{'SHARD':<6} {'KEYSPACE':<12} {'LEADER':<7} {'TERM':>5} {'APPLIED':>9} "
               f"{'KEYS':>9} {'SIZE':>10} {'LOGICAL':>7}  REPLICAS")
    for s in report["shards"]:
        click.echo(f"{s['id']:<6} {s['keyspace']:<12} {s['leader'] or '-':<7} "
                   f"{s['term'] if s['term'] is not None else '-':>5} "
                   f"{s['applied_index'] if s['applied_index'] is not None else '-':>9} "
                   f"{s['keys'] if s['keys'] is not None else '-':>9} "
                   f"{_size(s['disk_bytes']):>10} {s['logical_shards']:>7}  "
                   f"{','.join(s['replicas'])}")

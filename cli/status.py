"""``raftkv status``: what the cluster's nodes report, as a stable JSON document.

JSON schema (``raftkv status --json``)::

    {
      "cluster_dir": str,
      "nodes":  [{"id": str, "dc": str, "pid": int | null, "client_address": str,
                  "alive": bool}],
      "shards": [{"id": int, "replicas": [node id, ...], "leader": node id | null,
                  "term": int | null, "applied_index": int | null,
                  "commit_index": int | null}]
    }

``alive`` means the node answered a status request. A shard's ``term`` and
indexes are those its leader reports (null while no leader is known).
"""

from __future__ import annotations

from typing import Any

import click

from raftkv.localcluster import LocalCluster


def cluster_status(cluster: LocalCluster) -> dict[str, Any]:
    statuses = cluster.statuses()
    nodes = [
        {"id": n.id, "dc": n.dc, "pid": (statuses[n.id] or {}).get("pid", cluster.pid(n.id)),
         "client_address": n.client_address, "alive": statuses[n.id] is not None}
        for n in cluster.config.nodes
    ]
    shards = []
    for shard in cluster.config.shards:
        leader: str | None = None
        info: dict[str, Any] = {}
        for node_id, status in statuses.items():
            for s in (status or {}).get("shards", []):
                if s["id"] == shard.id and s["role"] == "leader" and (
                        not info or s["term"] > info["term"]):
                    leader, info = node_id, s
        shards.append({
            "id": shard.id,
            "replicas": [r.node for r in shard.replicas],
            "leader": leader,
            "term": info.get("term"),
            "applied_index": info.get("applied_index"),
            "commit_index": info.get("commit_index"),
        })
    return {"cluster_dir": str(cluster.directory), "nodes": nodes, "shards": shards}


def render_status(report: dict[str, Any]) -> None:
    click.echo(f"cluster {report['cluster_dir']}")
    click.echo(f"{'NODE':<6} {'DC':<5} {'PID':>8}  {'ADDRESS':<22} ALIVE")
    for n in report["nodes"]:
        click.echo(f"{n['id']:<6} {n['dc']:<5} {n['pid'] or '-':>8}  {n['client_address']:<22} "
                   f"{'yes' if n['alive'] else 'NO'}")
    click.echo(f"{'SHARD':<6} {'LEADER':<7} {'TERM':>5} {'APPLIED':>9}  REPLICAS")
    for s in report["shards"]:
        click.echo(f"{s['id']:<6} {s['leader'] or '-':<7} {s['term'] or '-':>5} "
                   f"{s['applied_index'] or '-':>9}  {','.join(s['replicas'])}")

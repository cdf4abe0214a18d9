"""The shard map as a client sees it: pure routing, no I/O.

The document comes from the shard manager (``ClusterState.client_map``):
``{"version", "keyspaces": {name: {"id", "logical_shards", "map", ...}},
"shards": {"<id>": [{"node", "address", "raft_address"}, ...]}}``. A stale map
is harmless: every group checks ownership when it applies an op, and answers
WRONG_SHARD to a client that routed by an old map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raftkv.errors import UnknownKeyspace
from raftkv.sharding import logical_shard


@dataclass(frozen=True)
class Route:
    keyspace: str
    logical_shard: int
    shard: int
    replicas: tuple[str, ...]
    """Client addresses of the nodes hosting the shard."""


class ShardMap:
    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.version: int = int(document["version"])
        self.keyspaces: dict[str, dict[str, Any]] = dict(document["keyspaces"])
        self._routes: dict[tuple[str, int], Route] = {}
        self._replicas = {
            int(shard_id): tuple(r["address"] for r in replicas)
            for shard_id, replicas in document["shards"].items()
        }

    def keyspace(self, name: str) -> dict[str, Any]:
        ks = self.keyspaces.get(name)
        if ks is None:
            raise UnknownKeyspace(f"no keyspace {name!r} in shard map version {self.version}")
        return ks

    def logical_shard(self, keyspace: str, key: bytes) -> int:
        return logical_shard(keyspace, key, int(self.keyspace(keyspace)["logical_shards"]))

    def route(self, keyspace: str, key: bytes) -> Route:
        return self.route_logical(keyspace, self.logical_shard(keyspace, key))

    def route_logical(self, keyspace: str, ls: int) -> Route:
        route = self._routes.get((keyspace, ls))
        if route is None:
            shard = int(self.keyspace(keyspace)["map"][ls])
            route = self._routes[(keyspace, ls)] = Route(keyspace, ls, shard,
                                                         self._replicas.get(shard, ()))
        return route

    def replicas(self, shard: int) -> tuple[str, ...]:
        return self._replicas.get(shard, ())

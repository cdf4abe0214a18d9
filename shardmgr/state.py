"""The shard manager's state and every change to it: pure functions, no I/O.

The state is one versioned document (``ClusterState``): the registered nodes,
the keyspaces with their logical-to-physical map, and the physical shards with
their replica sets. The manager's Raft group stores it under one key and
changes it only by compare-and-set on ``version`` (``shardmgr.machine``), so
the manager's leader computes a new state with the functions here, from its
view of which nodes are alive, and a stale leader's proposal is refused at
apply time. Each change bumps ``version``, which is also the shard map's
version that clients cache.

Keyspaces own their physical shards (a group serves one keyspace, with that
keyspace's replication factor). Logical shard ``ls`` of a keyspace with ``L``
logical shards over ``P`` physical shards starts on the ``ls * P // L``-th of
them: contiguous ranges, so a split later moves whole ranges.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from shardmgr.moves import RESHARD_LIVE, Move, Reshard
from shardmgr.placement import (
    DataCenterId,
    Node,
    NodeId,
    PhysicalShardId,
    Shard,
    plan_placement,
)

LOGICAL_SHARDS_MAX = 65536
PHYSICAL_SHARDS_PER_KEYSPACE_MAX = 4096
KEYSPACE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
PORT_MAX = 65535

KEYSPACE_CREATING = "creating"  # groups are being told which logical shards they own
KEYSPACE_ACTIVE = "active"
KEYSPACE_DROPPING = "dropping"  # gone from the client map; groups are deleting its data


class StateError(ValueError):
    """A change the state does not allow (bad arguments, unknown or existing
    names, too few nodes); the message says which. Nothing was changed."""


@dataclass(frozen=True)
class NodeInfo:
    """A storage node as registered: where it serves and which Raft ports it lends."""

    id: str
    dc: str
    host: str
    client_port: int
    raft_port_min: int
    raft_port_max: int
    capacity: int = 1

    @property
    def client_address(self) -> str:
        return f"{self.host}:{self.client_port}"


@dataclass(frozen=True)
class ReplicaInfo:
    node: str
    raft_port: int


@dataclass(frozen=True)
class ShardInfo:
    """A physical shard (Raft group) of one keyspace."""

    id: int
    keyspace: str
    replicas: tuple[ReplicaInfo, ...]
    owned: bool = False
    """The group has applied its ``own`` command (it serves its logical shards)."""
    created_version: int = 0


@dataclass(frozen=True)
class KeyspaceInfo:
    name: str
    id: int
    logical_shards: int
    replication_factor: int
    state: str
    logical_map: tuple[int, ...]
    """Physical shard id of each logical shard."""

    def logical_shards_of(self, shard_id: int) -> tuple[int, ...]:
        return tuple(ls for ls, p in enumerate(self.logical_map) if p == shard_id)

    @property
    def shard_ids(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.logical_map)))


@dataclass(frozen=True)
class AssignedReplica:
    """What a node must host for one shard."""

    shard: int
    keyspace: str
    raft_port: int
    peers: tuple[str, ...]
    """Raft addresses of the other replicas."""
    created_version: int
    founding: bool = False
    """The group is being created (its ``own`` not applied yet): every replica
    starts empty, so the first election need not wait long
    (``Replica(founding=...)``)."""


@dataclass(frozen=True)
class ClusterState:
    version: int = 0
    nodes: Mapping[str, NodeInfo] = field(default_factory=dict)
    keyspaces: Mapping[str, KeyspaceInfo] = field(default_factory=dict)
    shards: Mapping[int, ShardInfo] = field(default_factory=dict)
    next_keyspace_id: int = 0
    next_shard_id: int = 1
    moves: Mapping[int, Move] = field(default_factory=dict)
    """The moves of running reshards, by id (``shardmgr.reshard``)."""
    reshards: Mapping[str, Reshard] = field(default_factory=dict)
    """Each keyspace's latest reshard, running or finished."""
    next_move_id: int = 1

    # -- queries ---------------------------------------------------------------

    def raft_address(self, replica: ReplicaInfo) -> str:
        return f"{self.nodes[replica.node].host}:{replica.raft_port}"

    def assignment(self, node_id: str) -> list[AssignedReplica]:
        """Every replica ``node_id`` must host, by shard id."""
        out = []
        for shard in sorted(self.shards.values(), key=lambda s: s.id):
            mine = [r for r in shard.replicas if r.node == node_id]
            if mine:
                out.append(AssignedReplica(
                    shard.id, shard.keyspace, mine[0].raft_port,
                    tuple(self.raft_address(r) for r in shard.replicas if r is not mine[0]),
                    shard.created_version, founding=not shard.owned))
        return out

    def client_map(self) -> dict[str, Any]:
        """The shard map clients cache: serving keyspaces and where their shards are."""
        keyspaces = {
            ks.name: {"id": ks.id, "logical_shards": ks.logical_shards,
                      "replication_factor": ks.replication_factor,
                      "state": ks.state, "map": list(ks.logical_map)}
            for ks in self.keyspaces.values() if ks.state != KEYSPACE_DROPPING
        }
        # Every group of a serving keyspace, also one a move fills before the
        # map names it: a client follows a moved_to hint there.
        shards = {
            str(s.id): [{"node": r.node, "address": self.nodes[r.node].client_address,
                         "raft_address": self.raft_address(r)} for r in s.replicas]
            for s in self.shards.values() if s.keyspace in keyspaces
        }
        return {"version": self.version, "keyspaces": keyspaces, "shards": shards}

    # -- codec ----------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """This state as json-like data."""
        return {**self.base_json(), "moves": [m.to_json() for _, m in sorted(self.moves.items())]}

    def base_json(self) -> dict[str, Any]:
        """Every field but the moves, as json-like data: the shard manager
        stores each move under a key of its own (``shardmgr.machine``), so
        a change writes what it changed, not every move of a reshard."""
        return {
            "version": self.version,
            "nodes": [_flat(n) for n in sorted(self.nodes.values(), key=lambda n: n.id)],
            "keyspaces": [
                {**_flat(k), "logical_map": list(k.logical_map)}
                for k in sorted(self.keyspaces.values(), key=lambda k: k.name)
            ],
            "shards": [
                {"id": s.id, "keyspace": s.keyspace, "owned": s.owned,
                 "created_version": s.created_version,
                 "replicas": [_flat(r) for r in s.replicas]}
                for s in sorted(self.shards.values(), key=lambda s: s.id)
            ],
            "next_keyspace_id": self.next_keyspace_id,
            "next_shard_id": self.next_shard_id,
            "reshards": [r.to_json() for _, r in sorted(self.reshards.items())],
            "next_move_id": self.next_move_id,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClusterState:
        """The state ``data`` encodes (``to_json``; without ``moves``, as
        ``base_json`` writes it, a state with no moves)."""
        nodes = {n["id"]: NodeInfo(**n) for n in data["nodes"]}
        keyspaces = {
            k["name"]: KeyspaceInfo(**{**k, "logical_map": tuple(k["logical_map"])})
            for k in data["keyspaces"]
        }
        shards = {
            s["id"]: ShardInfo(s["id"], s["keyspace"],
                               tuple(ReplicaInfo(**r) for r in s["replicas"]),
                               s["owned"], s["created_version"])
            for s in data["shards"]
        }
        moves = {m["id"]: Move.from_json(m) for m in data.get("moves", ())}
        reshards = {r["keyspace"]: Reshard.from_json(r) for r in data.get("reshards", ())}
        return cls(data["version"], nodes, keyspaces, shards, data["next_keyspace_id"],
                   data["next_shard_id"], moves, reshards, data.get("next_move_id", 1))


def _flat(record: NodeInfo | ReplicaInfo | KeyspaceInfo) -> dict[str, Any]:
    """A record of plain fields as a dict (``dataclasses.asdict`` deep-copies
    every value: a third of encoding the state)."""
    return {name: getattr(record, name) for name in _FIELD_NAMES[type(record)]}


_FIELD_NAMES = {cls: tuple(f.name for f in fields(cls))
                for cls in (NodeInfo, ReplicaInfo, KeyspaceInfo)}


# -- changes ---------------------------------------------------------------------

def _bump(state: ClusterState, **changes: Any) -> ClusterState:
    return replace(state, version=state.version + 1, **changes)


def register_node(state: ClusterState, node: NodeInfo) -> ClusterState:
    """Add a node, or update its address; unchanged state if nothing differs."""
    if not 1 <= node.raft_port_min <= node.raft_port_max <= PORT_MAX:
        raise StateError(f"node {node.id}: bad raft port range "
                         f"{node.raft_port_min}..{node.raft_port_max}")
    if not 1 <= node.client_port <= PORT_MAX:
        raise StateError(f"node {node.id}: bad client port {node.client_port}")
    if node.capacity < 1:
        raise StateError(f"node {node.id}: capacity must be at least 1")
    old = state.nodes.get(node.id)
    if old == node:
        return state
    if old is not None and old.dc != node.dc:
        raise StateError(f"node {node.id} is registered in {old.dc}, not {node.dc}; "
                         "a node cannot change data center")
    if old is not None and (old.host, old.raft_port_min, old.raft_port_max) != (
            node.host, node.raft_port_min, node.raft_port_max) and any(
            r.node == node.id for s in state.shards.values() for r in s.replicas):
        raise StateError(f"node {node.id} hosts replicas: its host and Raft ports cannot change")
    return _bump(state, nodes={**state.nodes, node.id: node})


def create_keyspace(state: ClusterState, name: str, *, logical_shards: int,
                    replication_factor: int, physical_shards: int,
                    alive: Iterable[str]) -> ClusterState:
    """A new keyspace on new physical shards placed over the live nodes."""
    if not KEYSPACE_NAME.fullmatch(name):
        raise StateError(f"bad keyspace name {name!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    if name in state.keyspaces:
        raise StateError(f"keyspace {name!r} already exists")
    if not (1 <= logical_shards <= LOGICAL_SHARDS_MAX
            and logical_shards & (logical_shards - 1) == 0):
        raise StateError(f"logical shards must be a power of two from 1 to "
                         f"{LOGICAL_SHARDS_MAX}, not {logical_shards}")
    if replication_factor < 1:
        raise StateError(f"replication factor must be at least 1, not {replication_factor}")
    if not 1 <= physical_shards <= min(logical_shards, PHYSICAL_SHARDS_PER_KEYSPACE_MAX):
        raise StateError(f"physical shards must be from 1 to the logical shard count "
                         f"({logical_shards}), not {physical_shards}")
    live = sorted(set(alive) & set(state.nodes))
    if len(live) < replication_factor:
        raise StateError(f"replication factor {replication_factor} needs that many live "
                         f"nodes; {len(live)} are live")
    shards, new_ids = new_shards(state, name, physical_shards, replication_factor, live)
    logical_map = tuple(new_ids[ls * physical_shards // logical_shards]
                        for ls in range(logical_shards))
    keyspace = KeyspaceInfo(name, state.next_keyspace_id, logical_shards, replication_factor,
                            KEYSPACE_CREATING, logical_map)
    return _bump(state, keyspaces={**state.keyspaces, name: keyspace}, shards=shards,
                 next_keyspace_id=state.next_keyspace_id + 1,
                 next_shard_id=state.next_shard_id + physical_shards)


def new_shards(state: ClusterState, keyspace: str, count: int, replication_factor: int,
               live: list[str]) -> tuple[dict[int, ShardInfo], list[int]]:
    """``state``'s shards plus ``count`` new ones of ``keyspace``, placed over the
    ``live`` nodes, and the new ids (from ``next_shard_id``; the caller bumps it)."""
    if count + len([s for s in state.shards.values() if s.keyspace == keyspace]) \
            > PHYSICAL_SHARDS_PER_KEYSPACE_MAX:
        raise StateError(f"a keyspace has at most {PHYSICAL_SHARDS_PER_KEYSPACE_MAX} "
                         "physical shards")
    new_ids = list(range(state.next_shard_id, state.next_shard_id + count))
    placed = _place(state, live, new_ids, replication_factor)
    shards = dict(state.shards)
    used_ports = _used_ports(state)
    for shard_id in new_ids:
        replicas = []
        for node_id in placed[shard_id]:
            port = _free_port(state.nodes[node_id], used_ports[node_id])
            used_ports[node_id].add(port)
            replicas.append(ReplicaInfo(node_id, port))
        shards[shard_id] = ShardInfo(shard_id, keyspace, tuple(replicas), False,
                                     state.version + 1)
    return shards, new_ids


def _place(state: ClusterState, live: list[str], new_ids: list[int],
           replication_factor: int) -> dict[int, tuple[str, ...]]:
    live_set = set(live)
    nodes = [Node(NodeId(n.id), DataCenterId(n.dc), n.capacity, n.id in live_set)
             for n in state.nodes.values()]
    existing = [
        Shard(PhysicalShardId(s.id), len(s.replicas), tuple(NodeId(r.node) for r in s.replicas))
        for s in state.shards.values()
    ]
    new = [Shard(PhysicalShardId(i), replication_factor) for i in new_ids]
    plan = plan_placement(nodes, existing + new, concurrent_moves_per_node_max=1 << 30)
    dc_of = {n.id: n.dc for n in state.nodes.values()}
    placed = {i: [str(n) for n in plan.target(PhysicalShardId(i)).replicas] for i in new_ids}
    # The plan balances the total per node, and may do it by moving existing
    # replicas. Existing shards stay where they are, so each such move (a to b)
    # is made by a new shard instead: one with a replica on a takes b in its
    # place, if that keeps its data centers spread as the plan had them.
    for shard in existing:
        target = {str(n) for n in plan.target(shard.id).replicas}
        current = {str(n) for n in shard.replicas}
        for a, b in zip(sorted(current - target), sorted(target - current), strict=False):
            for i in new_ids:
                members = placed[i]
                if a not in members or b in members:
                    continue
                moved = [b if n == a else n for n in members]
                if len({dc_of[n] for n in moved}) >= len({dc_of[n] for n in members}):
                    placed[i] = moved
                    break
    return {i: tuple(sorted(members)) for i, members in placed.items()}


def _used_ports(state: ClusterState) -> dict[str, set[int]]:
    used: dict[str, set[int]] = {n: set() for n in state.nodes}
    for shard in state.shards.values():
        for r in shard.replicas:
            used.setdefault(r.node, set()).add(r.raft_port)
    return used


def _free_port(node: NodeInfo, used: set[int]) -> int:
    for port in range(node.raft_port_min, node.raft_port_max + 1):
        if port not in used:
            return port
    raise StateError(f"node {node.id} has no free Raft port left in "
                     f"{node.raft_port_min}..{node.raft_port_max}")


def mark_owned(state: ClusterState, shard_id: int) -> ClusterState:
    """The group has applied its ``own`` command. The keyspace turns active
    once all its groups have."""
    shard = state.shards.get(shard_id)
    if shard is None or shard.owned:
        return state
    shards = {**state.shards, shard_id: replace(shard, owned=True)}
    keyspaces = dict(state.keyspaces)
    ks = keyspaces[shard.keyspace]
    if ks.state == KEYSPACE_CREATING and all(shards[p].owned for p in ks.shard_ids):
        keyspaces[ks.name] = replace(ks, state=KEYSPACE_ACTIVE)
    return _bump(state, shards=shards, keyspaces=keyspaces)


def drop_keyspace(state: ClusterState, name: str) -> ClusterState:
    """Take a keyspace out of the client map; its groups then delete its data."""
    ks = state.keyspaces.get(name)
    if ks is None:
        raise StateError(f"no keyspace {name!r}")
    if ks.state == KEYSPACE_DROPPING:
        return state
    reshard = state.reshards.get(name)
    if reshard is not None and reshard.state in RESHARD_LIVE:
        raise StateError(f"keyspace {name!r} is being resharded; abort that first "
                         "(raftkv reshard --abort)")
    return _bump(state, keyspaces={**state.keyspaces, name: replace(ks, state=KEYSPACE_DROPPING)})


def remove_keyspace(state: ClusterState, name: str) -> ClusterState:
    """After its groups deleted its data: forget a dropped keyspace and its shards
    (their nodes then close and delete the replicas)."""
    ks = state.keyspaces.get(name)
    if ks is None:
        return state
    if ks.state != KEYSPACE_DROPPING:
        raise StateError(f"keyspace {name!r} is not being dropped")
    keyspaces = {k: v for k, v in state.keyspaces.items() if k != name}
    shards = {i: s for i, s in state.shards.items() if s.keyspace != name}
    reshards = {k: v for k, v in state.reshards.items() if k != name}
    return _bump(state, keyspaces=keyspaces, shards=shards, reshards=reshards)

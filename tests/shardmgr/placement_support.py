"""Independent checkers and helpers for the placement tests.

Nothing here calls into ``shardmgr.placement`` beyond its public types: the
rules and the balance definition of its module docstring are re-derived here
so the tests check the documented contract rather than the implementation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from hypothesis import strategies as st

from shardmgr.placement import (
    DataCenterId,
    Move,
    Node,
    NodeId,
    PhysicalShardId,
    PlacementPlan,
    Shard,
    plan_placement,
)

# ---------------------------------------------------------------------------
# building clusters


def node(name: str, dc: str, capacity: int = 1, alive: bool = True) -> Node:
    return Node(NodeId(name), DataCenterId(dc), capacity, alive)


def shard(shard_id: int, rf: int, replicas: Iterable[str] = (), leader: str | None = None) -> Shard:
    return Shard(
        PhysicalShardId(shard_id),
        rf,
        tuple(NodeId(n) for n in replicas),
        None if leader is None else NodeId(leader),
    )


def grid(dcs: int, nodes_per_dc: int, capacity: int = 1) -> list[Node]:
    """Nodes ``n<dc><i>`` in DCs ``dc<dc>``."""
    return [node(f"n{d}{i}", f"dc{d}", capacity) for d in range(dcs) for i in range(nodes_per_dc)]


# ---------------------------------------------------------------------------
# applying plans


def apply_targets(shards: Sequence[Shard], plan: PlacementPlan) -> list[Shard]:
    """The cluster after every target is reached and every preferred leader leads."""
    return [
        replace(s, replicas=plan.target(s.id).replicas, leader=plan.target(s.id).leader)
        for s in shards
    ]


def apply_moves(shards: Sequence[Shard], plan: PlacementPlan) -> list[Shard]:
    """The cluster after this plan's moves (not the deferred ones) finish."""
    out = []
    for s in shards:
        members = list(dict.fromkeys(s.replicas))
        for move in plan.moves:
            if move.shard != s.id:
                continue
            if move.add is not None:
                assert move.add not in members
                members.append(move.add)
            if move.remove is not None:
                members.remove(move.remove)
        leader = s.leader if s.leader in members else None
        preferred = plan.target(s.id).leader
        if preferred in members:
            leader = preferred
        out.append(replace(s, replicas=tuple(members), leader=leader))
    return out


def run_until_converged(
    nodes: Sequence[Node], shards: Sequence[Shard], moves_max: int, rounds_max: int
) -> tuple[list[Shard], list[PlacementPlan]]:
    """Plan, apply the started moves, repeat; every plan of the run is returned.

    Leader transfers are not moves: the last plan's preferred leaders are put
    in place in the returned layout.
    """
    current = list(shards)
    plans = []
    for _ in range(rounds_max):
        plan = plan_placement(nodes, current, concurrent_moves_per_node_max=moves_max)
        plans.append(plan)
        if plan.converged:
            return apply_targets(current, plan), plans
        assert plan.moves, "moves deferred with every budget free"
        current = apply_moves(current, plan)
    raise AssertionError(f"not converged after {rounds_max} rounds")


# ---------------------------------------------------------------------------
# the documented rules and balance definition, re-derived


def live_nodes(nodes: Iterable[Node]) -> dict[NodeId, Node]:
    return {n.id: n for n in nodes if n.alive}


def per_dc_max(nodes: Iterable[Node], wanted: int) -> int:
    live_per_dc = Counter(n.dc for n in nodes if n.alive)
    k = 0
    while sum(min(c, k) for c in live_per_dc.values()) < wanted:
        k += 1
    return k


def follows_rules(nodes: Sequence[Node], members: Iterable[NodeId], rf: int) -> bool:
    """Size and spread rules of the module docstring for one replica set."""
    live = live_nodes(nodes)
    members = list(members)
    wanted = min(rf, len(live))
    if len(set(members)) != len(members) or len(members) != wanted:
        return False
    if any(m not in live for m in members):
        return False
    live_dcs = {n.dc for n in live.values()}
    per_dc = Counter(live[m].dc for m in members)
    return len(per_dc) == min(wanted, len(live_dcs)) and max(
        per_dc.values(), default=0
    ) <= per_dc_max(nodes, wanted)


def improving(count_a: int, cap_a: int, count_b: int, cap_b: int) -> bool:
    """Moving one unit from a to b lowers sum(count**2 / cap)."""
    return (2 * count_a - 1) * cap_b > (2 * count_b + 1) * cap_a


def replica_counts(
    nodes: Sequence[Node], layout: Mapping[PhysicalShardId, Sequence[NodeId]]
) -> Counter[NodeId]:
    counts: Counter[NodeId] = Counter({n: 0 for n in live_nodes(nodes)})
    for members in layout.values():
        counts.update(members)
    return counts


def improving_relocation(
    nodes: Sequence[Node],
    rf: Mapping[PhysicalShardId, int],
    layout: Mapping[PhysicalShardId, Sequence[NodeId]],
) -> tuple[PhysicalShardId, NodeId, NodeId] | None:
    """A legal, improving single-replica relocation, if the layout has one."""
    live = live_nodes(nodes)
    counts = replica_counts(nodes, layout)
    for shard_id, members in layout.items():
        for a in members:
            for b in live:
                if b in members:
                    continue
                if not improving(counts[a], live[a].capacity, counts[b], live[b].capacity):
                    continue
                moved = [b if m == a else m for m in members]
                if follows_rules(nodes, moved, rf[shard_id]):
                    return shard_id, a, b
    return None


def leader_counts(
    nodes: Sequence[Node], leaders: Mapping[PhysicalShardId, NodeId | None]
) -> Counter[NodeId]:
    counts: Counter[NodeId] = Counter({n: 0 for n in live_nodes(nodes)})
    counts.update(leader for leader in leaders.values() if leader is not None)
    return counts


def improving_leader_chain(
    nodes: Sequence[Node],
    layout: Mapping[PhysicalShardId, Sequence[NodeId]],
    leaders: Mapping[PhysicalShardId, NodeId | None],
) -> tuple[NodeId, NodeId] | None:
    """(a, c) if some chain of leader transfers from a to c is improving."""
    live = live_nodes(nodes)
    counts = leader_counts(nodes, leaders)
    for a in live:
        reached = {a}
        stack = [a]
        while stack:
            x = stack.pop()
            for shard_id, leader in leaders.items():
                if leader == x:
                    for y in layout[shard_id]:
                        if y not in reached:
                            reached.add(y)
                            stack.append(y)
        for c in reached - {a}:
            if improving(counts[a], live[a].capacity, counts[c], live[c].capacity):
                return a, c
    return None


def moves_per_node(moves: Iterable[Move], nodes: Sequence[Node]) -> Counter[NodeId]:
    live = live_nodes(nodes)
    counts: Counter[NodeId] = Counter()
    for move in moves:
        counts.update(n for n in (move.add, move.remove) if n is not None and n in live)
    return counts


# ---------------------------------------------------------------------------
# hypothesis strategies

ALIVE = st.sampled_from([True, True, True, True, False])


@st.composite
def clusters(
    draw: st.DrawFn,
    *,
    dcs_max: int = 4,
    nodes_max: int = 12,
    shards_max: int = 40,
    rf_max: int = 3,
    capacity_max: int = 4,
    dead: bool = True,
) -> tuple[list[Node], list[Shard]]:
    """1-4 DCs, 1-12 nodes (capacities, some dead), 1-40 shards in random layouts.

    Current replica sets are random sets of known node ids (live or dead), now
    and then with a node id the cluster does not know.
    """
    dc_count = draw(st.integers(1, dcs_max))
    node_count = draw(st.integers(1, nodes_max))
    nodes = [
        node(
            f"n{i:02d}",
            f"dc{draw(st.integers(0, dc_count - 1))}",
            draw(st.integers(1, capacity_max)),
            draw(ALIVE) if dead else True,
        )
        for i in range(node_count)
    ]
    names = [str(n.id) for n in nodes] + ["ghost"]
    shard_ids = draw(st.lists(st.integers(0, 999), min_size=1, max_size=shards_max, unique=True))
    shards = []
    for shard_id in shard_ids:
        replicas = draw(st.lists(st.sampled_from(names), max_size=4, unique=True))
        leader = draw(
            st.one_of(
                st.none(),
                st.sampled_from(names),
                *([st.sampled_from(replicas)] if replicas else []),
            )
        )
        shards.append(shard(shard_id, draw(st.integers(1, rf_max)), replicas, leader))
    return nodes, shards

"""Hypothesis properties of plan_placement over random clusters.

Clusters: 1-4 DCs, 1-12 nodes with capacities 1-4 (some dead), 1-40 shards
with RF 1-3 (1-5 for the size and spread rules), random current layouts
(empty, beyond RF, on dead or unknown nodes). Each property is one invariant
of the module docstring; the checkers are in placement_support.py.
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from shardmgr.placement import (
    Move,
    MoveReason,
    Node,
    NodeId,
    PhysicalShardId,
    PlacementPlan,
    Shard,
    plan_placement,
)
from tests.shardmgr.placement_support import (
    apply_targets,
    clusters,
    follows_rules,
    improving_leader_chain,
    improving_relocation,
    live_nodes,
    moves_per_node,
    replica_counts,
    run_until_converged,
)

MOVES_MAX = st.integers(1, 2)
PROPERTY = settings(max_examples=150, deadline=None)


@st.composite
def in_progress_for(draw: st.DrawFn, nodes: list[Node]) -> dict[NodeId, int]:
    return {n.id: draw(st.integers(0, 2)) for n in nodes if draw(st.booleans())}


# 1. size ---------------------------------------------------------------------


@PROPERTY
@given(st.one_of(clusters(), clusters(rf_max=5)), MOVES_MAX)
def test_targets_have_min_rf_live_distinct_nodes(
    cluster: tuple[list[Node], list[Shard]], moves_max: int
) -> None:
    nodes, shards = cluster
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=moves_max)
    live = live_nodes(nodes)
    assert [t.shard for t in plan.targets] == sorted(s.id for s in shards)
    for s in shards:
        target = plan.target(s.id)
        assert len(target.replicas) == min(s.replication_factor, len(live))
        assert len(set(target.replicas)) == len(target.replicas)
        assert all(n in live for n in target.replicas)
        assert list(target.replicas) == sorted(target.replicas)
        assert target.under_replicated == (len(live) < s.replication_factor)


# 2. spread -------------------------------------------------------------------


@PROPERTY
@given(st.one_of(clusters(), clusters(rf_max=5)), MOVES_MAX)
def test_replicas_spread_over_dcs(cluster: tuple[list[Node], list[Shard]], moves_max: int) -> None:
    nodes, shards = cluster
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=moves_max)
    live = live_nodes(nodes)
    live_dcs = {n.dc for n in live.values()}
    for s in shards:
        replicas = plan.target(s.id).replicas
        dcs = [live[n].dc for n in replicas]
        if len(live_dcs) >= s.replication_factor:
            assert len(set(dcs)) == len(dcs), f"shard {s.id}: two replicas share a DC"
        else:
            assert len(set(dcs)) == min(len(replicas), len(live_dcs))
        assert follows_rules(nodes, replicas, s.replication_factor)


# 3. balance ------------------------------------------------------------------


@PROPERTY
@given(clusters(), MOVES_MAX)
def test_targets_are_balanced(cluster: tuple[list[Node], list[Shard]], moves_max: int) -> None:
    nodes, shards = cluster
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=moves_max)
    layout = {t.shard: t.replicas for t in plan.targets}
    leaders = {t.shard: t.leader for t in plan.targets}
    rf = {s.id: s.replication_factor for s in shards}
    assert improving_relocation(nodes, rf, layout) is None
    for t in plan.targets:
        assert (t.leader is None) == (not t.replicas)
        assert t.leader is None or t.leader in t.replicas
    assert improving_leader_chain(nodes, layout, leaders) is None


@PROPERTY
@given(clusters(dcs_max=1, capacity_max=1), MOVES_MAX)
def test_one_dc_equal_capacity_counts_differ_by_at_most_one(
    cluster: tuple[list[Node], list[Shard]], moves_max: int
) -> None:
    nodes, shards = cluster
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=moves_max)
    counts = replica_counts(nodes, {t.shard: t.replicas for t in plan.targets})
    if counts:
        assert max(counts.values()) - min(counts.values()) <= 1, counts


@PROPERTY
@given(clusters(dcs_max=1), MOVES_MAX)
def test_one_dc_weighted_counts_are_near_a_common_scale(
    cluster: tuple[list[Node], list[Shard]], moves_max: int
) -> None:
    """count/cap of two nodes differ by at most (1/cap_a + 1/cap_b)/2, unless
    the heavier (per capacity) node holds no shard the other lacks."""
    nodes, shards = cluster
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=moves_max)
    live = live_nodes(nodes)
    hosted = {n: {t.shard for t in plan.targets if n in t.replicas} for n in live}
    for a in live:
        for b in live:
            ca, cb = len(hosted[a]), len(hosted[b])
            capa, capb = live[a].capacity, live[b].capacity
            if (2 * ca - 1) * capb > (2 * cb + 1) * capa:
                assert hosted[a] <= hosted[b], (a, b, ca, cb)


# 4. minimal movement ---------------------------------------------------------


@PROPERTY
@given(clusters(), MOVES_MAX)
def test_plan_of_applied_targets_moves_nothing(
    cluster: tuple[list[Node], list[Shard]], moves_max: int
) -> None:
    nodes, shards = cluster
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=moves_max)
    again = plan_placement(
        nodes, apply_targets(shards, plan), concurrent_moves_per_node_max=moves_max
    )
    if any(n.alive for n in nodes):
        assert again.converged
    else:
        assert not again.moves
    assert again.targets == plan.targets


@PROPERTY
@given(clusters(), MOVES_MAX)
def test_moves_are_exactly_the_difference_to_the_targets(
    cluster: tuple[list[Node], list[Shard]], moves_max: int
) -> None:
    nodes, shards = cluster
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=moves_max)
    live = live_nodes(nodes)
    everything = plan.moves + plan.deferred
    for s in shards:
        target = set(plan.target(s.id).replicas)
        mine = [m for m in everything if m.shard == s.id]
        adds = Counter(m.add for m in mine if m.add is not None)
        removes = Counter(m.remove for m in mine if m.remove is not None)
        if not target:
            assert not mine
            continue
        assert set(adds) == target - set(s.replicas)
        assert set(removes) == set(s.replicas) - target
        assert all(c == 1 for c in (adds + removes).values())
        for m in mine:
            kind = (m.add is not None, m.remove is not None)
            assert kind != (False, False)
            if m.reason is MoveReason.SHRINK:
                assert kind == (False, True)
            if m.reason in (MoveReason.SPREAD, MoveReason.BALANCE):
                assert kind == (True, True) and m.remove in live


def _relocations(
    shards: list[Shard], plan: PlacementPlan, nodes: list[Node]
) -> list[tuple[PhysicalShardId, NodeId, NodeId]]:
    """(shard, old, new): a live current replica not kept, and a new one."""
    live = live_nodes(nodes)
    out = []
    for s in shards:
        target = set(plan.target(s.id).replicas)
        for old in sorted({n for n in s.replicas if n in live} - target):
            for new in sorted(target - set(s.replicas)):
                out.append((s.id, old, new))
    return out


@PROPERTY
@given(clusters(), MOVES_MAX)
def test_a_live_replica_moves_only_if_keeping_it_is_worse(
    cluster: tuple[list[Node], list[Shard]], moves_max: int
) -> None:
    """For every live current replica the plan drops (on node a) and every new
    replica of that shard (on node b): keeping a instead of b either breaks a
    rule or leaves the layout strictly less balanced."""
    nodes, shards = cluster
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=moves_max)
    live = live_nodes(nodes)
    rf = {s.id: s.replication_factor for s in shards}
    counts = replica_counts(nodes, {t.shard: t.replicas for t in plan.targets})
    for shard_id, old, new in _relocations(shards, plan, nodes):
        kept = [old if n == new else n for n in plan.target(shard_id).replicas]
        if follows_rules(nodes, kept, rf[shard_id]):
            # sum(count**2/cap) would grow if the replica went back from new to old
            worse = (2 * counts[new] - 1) * live[old].capacity < (2 * counts[old] + 1) * live[
                new
            ].capacity
            assert worse, (shard_id, old, new, counts[old], counts[new])


@PROPERTY
@given(clusters(), MOVES_MAX)
def test_no_two_moves_cancel_out(cluster: tuple[list[Node], list[Shard]], moves_max: int) -> None:
    """No pair of relocations swaps nodes (shard s a->b and shard t b->a) when
    keeping both where they were follows the rules: that would be two moves
    for no change in any node's count."""
    nodes, shards = cluster
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=moves_max)
    rf = {s.id: s.replication_factor for s in shards}
    relocations = _relocations(shards, plan, nodes)
    for s_id, a, b in relocations:
        for t_id, b2, a2 in relocations:
            if s_id == t_id or (b2, a2) != (b, a):
                continue
            s_kept = [a if n == b else n for n in plan.target(s_id).replicas]
            t_kept = [b if n == a else n for n in plan.target(t_id).replicas]
            assert not (
                follows_rules(nodes, s_kept, rf[s_id]) and follows_rules(nodes, t_kept, rf[t_id])
            ), (s_id, t_id, a, b)


@st.composite
def round_robin_clusters(draw: st.DrawFn) -> tuple[list[Node], list[Shard]]:
    """Rule-following layouts that are often already balanced."""
    nodes, shards = draw(clusters(capacity_max=1, dead=False))
    dcs = sorted({n.dc for n in nodes})
    by_dc = {dc: [n.id for n in nodes if n.dc == dc] for dc in dcs}
    offset = draw(st.integers(0, 11))
    out = []
    for i, s in enumerate(sorted(shards, key=lambda s: s.id)):
        members: list[NodeId] = []
        k = offset + i
        while len(members) < min(s.replication_factor, len(nodes)):
            dc = dcs[k % len(dcs)]
            candidates = [n for n in by_dc[dc] if n not in members]
            if candidates:
                members.append(candidates[(k // len(dcs)) % len(candidates)])
            k += 1
        out.append(Shard(s.id, s.replication_factor, tuple(members), members[0]))
    return nodes, out


@PROPERTY
@given(round_robin_clusters(), MOVES_MAX)
def test_balanced_layout_moves_nothing(
    cluster: tuple[list[Node], list[Shard]], moves_max: int
) -> None:
    nodes, shards = cluster
    rf = {s.id: s.replication_factor for s in shards}
    layout = {s.id: s.replicas for s in shards}
    leaders = {s.id: s.leader for s in shards}
    valid = all(follows_rules(nodes, s.replicas, s.replication_factor) for s in shards)
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=moves_max)
    if valid and improving_relocation(nodes, rf, layout) is None:
        assert plan.converged
        if improving_leader_chain(nodes, layout, leaders) is None:
            assert all(plan.target(s.id).leader == s.leader for s in shards)


# 5. determinism ----------------------------------------------------------------


@PROPERTY
@given(clusters(), MOVES_MAX, st.randoms(use_true_random=False), st.data())
def test_same_input_in_any_order_gives_the_same_plan(
    cluster: tuple[list[Node], list[Shard]],
    moves_max: int,
    rnd: random.Random,
    data: st.DataObject,
) -> None:
    nodes, shards = cluster
    in_progress = data.draw(in_progress_for(nodes))
    plan = plan_placement(
        nodes, shards, concurrent_moves_per_node_max=moves_max, moves_in_progress=in_progress
    )
    nodes2 = list(nodes)
    rnd.shuffle(nodes2)
    shards2 = []
    for s in shards:
        replicas = list(s.replicas)
        rnd.shuffle(replicas)
        shards2.append(Shard(s.id, s.replication_factor, tuple(replicas), s.leader))
    rnd.shuffle(shards2)
    in_progress2 = dict(sorted(in_progress.items(), key=lambda _: rnd.random()))
    again = plan_placement(
        nodes2, shards2, concurrent_moves_per_node_max=moves_max, moves_in_progress=in_progress2
    )
    assert again == plan


# 6. throttle -------------------------------------------------------------------


@PROPERTY
@given(clusters(), MOVES_MAX, st.data())
def test_throttle_is_respected_and_work_conserving(
    cluster: tuple[list[Node], list[Shard]], moves_max: int, data: st.DataObject
) -> None:
    nodes, shards = cluster
    in_progress = data.draw(in_progress_for(nodes))
    plan = plan_placement(
        nodes, shards, concurrent_moves_per_node_max=moves_max, moves_in_progress=in_progress
    )
    live = live_nodes(nodes)
    budget = {n: max(0, moves_max - in_progress.get(n, 0)) for n in live}
    used = moves_per_node(plan.moves, nodes)
    for n in live:
        assert used[n] <= budget[n], (n, used[n], budget[n])

    has_live = {s.id: any(n in live for n in s.replicas) for s in shards}
    per_shard = Counter(m.shard for m in plan.moves)
    for shard_id, count in per_shard.items():
        assert count == 1 or not has_live[shard_id]

    def blocked(move: Move) -> bool:
        over = any(
            used[n] >= budget[n] for n in (move.add, move.remove) if n is not None and n in live
        )
        return over or (has_live[move.shard] and per_shard[move.shard] > 0)

    assert all(blocked(m) for m in plan.deferred)


# convergence -----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(clusters(shards_max=25), MOVES_MAX)
def test_repeated_plans_converge_to_a_balanced_layout(
    cluster: tuple[list[Node], list[Shard]], moves_max: int
) -> None:
    nodes, shards = cluster
    final, plans = run_until_converged(nodes, shards, moves_max, rounds_max=200)
    live = live_nodes(nodes)
    if not live:
        return
    rf = {s.id: s.replication_factor for s in final}
    layout = {s.id: s.replicas for s in final}
    for s in final:
        assert follows_rules(nodes, s.replicas, s.replication_factor)
    assert improving_relocation(nodes, rf, layout) is None
    assert improving_leader_chain(nodes, layout, {s.id: s.leader for s in final}) is None
    for plan in plans:
        assert all(c <= moves_max for c in moves_per_node(plan.moves, nodes).values())

"""plan_placement on concrete clusters, with the expected plan spelled out."""

from __future__ import annotations

from collections import Counter

import pytest

from shardmgr.placement import (
    Move,
    MoveReason,
    NodeId,
    PhysicalShardId,
    PlacementInputError,
    PlacementPlan,
    plan_placement,
)
from tests.shardmgr.placement_support import (
    apply_moves,
    apply_targets,
    grid,
    node,
    run_until_converged,
    shard,
)


def render(plan: PlacementPlan) -> str:
    """The plan as text, one line per target and per move."""
    lines = []
    for t in plan.targets:
        short = " (under-replicated)" if t.under_replicated else ""
        replicas = " ".join(t.replicas) or "-"
        lines.append(f"shard {t.shard}: {replicas} leader {t.leader}{short}")
    for label, moves in (("move", plan.moves), ("deferred", plan.deferred)):
        for m in moves:
            add = f" +{m.add}" if m.add else ""
            remove = f" -{m.remove}" if m.remove else ""
            lines.append(f"{label} shard {m.shard}:{add}{remove} ({m.reason.value})")
    return "\n".join(lines)


def counts_of(plan: PlacementPlan) -> Counter[str]:
    return Counter(n for t in plan.targets for n in t.replicas)


def leaders_of(plan: PlacementPlan) -> Counter[str]:
    return Counter(t.leader for t in plan.targets if t.leader is not None)


# ---------------------------------------------------------------------------
# the cases of the brief


def test_three_dcs_of_one_node_get_one_replica_each() -> None:
    plan = plan_placement(grid(3, 1), [shard(0, 3)], concurrent_moves_per_node_max=1)
    assert render(plan) == "\n".join(
        [
            "shard 0: n00 n10 n20 leader n00",
            # a new group is created with all its members at once
            "move shard 0: +n00 (repair)",
            "move shard 0: +n10 (repair)",
            "move shard 0: +n20 (repair)",
        ]
    )


def test_eight_shards_over_three_dcs_of_two_nodes() -> None:
    nodes = grid(3, 2)
    plan = plan_placement(nodes, [shard(i, 3) for i in range(8)], concurrent_moves_per_node_max=2)
    dc = {n.id: n.dc for n in nodes}
    for t in plan.targets:
        assert sorted(dc[n] for n in t.replicas) == ["dc0", "dc1", "dc2"]
    assert counts_of(plan) == {n.id: 4 for n in nodes}
    leaders = leaders_of(plan)
    assert sum(leaders.values()) == 8
    assert all(leaders[n.id] in (1, 2) for n in nodes), leaders


def test_dead_node_is_replaced_in_a_dc_the_shard_lacks() -> None:
    # n01 is empty and would be the least loaded, but dc0 already has a replica
    nodes = [
        node("n00", "dc0"),
        node("n01", "dc0"),
        node("n10", "dc1"),
        node("n20", "dc2", alive=False),
        node("n21", "dc2"),
    ]
    shards = [shard(0, 3, ["n00", "n10", "n20"], leader="n20")]
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=1)
    assert render(plan) == "\n".join(
        [
            "shard 0: n00 n10 n21 leader n00",  # leader: a node that already has the data
            "move shard 0: +n21 -n20 (repair)",
        ]
    )


def test_dead_node_replacement_may_use_a_new_dc() -> None:
    nodes = [*grid(4, 1), node("n01", "dc0")]
    nodes = [n if n.id != "n20" else node("n20", "dc2", alive=False) for n in nodes]
    shards = [shard(0, 3, ["n00", "n10", "n20"], leader="n00")]
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=1)
    (move,) = plan.moves
    assert move == Move(PhysicalShardId(0), NodeId("n30"), NodeId("n20"), MoveReason.REPAIR)


def test_new_node_takes_replicas_gradually_under_the_throttle() -> None:
    shards = [shard(i, 3, ["n00", "n10", "n20"], leader=f"n{i % 3}0") for i in range(12)]
    assert plan_placement(grid(3, 1), shards, concurrent_moves_per_node_max=1).converged

    nodes = grid(4, 1)  # n30 joins in a fourth DC: 36 replicas / 4 nodes = 9 each
    for moves_max, rounds in ((1, 9), (2, 5)):
        current = shards
        first = plan_placement(nodes, current, concurrent_moves_per_node_max=moves_max)
        assert counts_of(first) == {"n00": 9, "n10": 9, "n20": 9, "n30": 9}
        held = []
        for _ in range(rounds):
            plan = plan_placement(nodes, current, concurrent_moves_per_node_max=moves_max)
            assert len(plan.moves) <= moves_max
            assert all(m.add == "n30" and m.reason is MoveReason.BALANCE for m in plan.moves)
            current = apply_moves(current, plan)
            held.append(sum("n30" in s.replicas for s in current))
        assert held == [min(9, moves_max * (r + 1)) for r in range(rounds)]
        final = plan_placement(nodes, current, concurrent_moves_per_node_max=moves_max)
        assert final.converged
        assert sorted(leaders_of(final).values()) == [3, 3, 3, 3]


def test_rf3_over_two_dcs_keeps_nodes_distinct() -> None:
    nodes = grid(2, 2)
    plan = plan_placement(nodes, [shard(i, 3) for i in range(4)], concurrent_moves_per_node_max=1)
    dc = {n.id: n.dc for n in nodes}
    for t in plan.targets:
        assert len(set(t.replicas)) == 3
        assert sorted(Counter(dc[n] for n in t.replicas).values()) == [1, 2]
        assert not t.under_replicated
    assert counts_of(plan) == {"n00": 3, "n01": 3, "n10": 3, "n11": 3}
    assert sorted(leaders_of(plan).values()) == [1, 1, 1, 1]


# ---------------------------------------------------------------------------
# more rules


def test_too_few_live_nodes_is_reported_under_replicated() -> None:
    nodes = [*grid(2, 1), node("n20", "dc2", alive=False)]
    plan = plan_placement(nodes, [shard(0, 3, ["n00", "n20"])], concurrent_moves_per_node_max=1)
    assert render(plan) == "\n".join(
        [
            "shard 0: n00 n10 leader n00 (under-replicated)",
            "move shard 0: +n10 -n20 (repair)",
        ]
    )


def test_no_live_node_gives_empty_targets_and_no_moves() -> None:
    nodes = [node("n00", "dc0", alive=False)]
    plan = plan_placement(nodes, [shard(0, 1, ["n00"], "n00")], concurrent_moves_per_node_max=1)
    assert render(plan) == "shard 0: - leader None (under-replicated)"


def test_capacity_weights_replicas_and_leaders() -> None:
    nodes = [node("a", "dc0", capacity=2), node("b", "dc0"), node("c", "dc0")]
    plan = plan_placement(nodes, [shard(i, 1) for i in range(8)], concurrent_moves_per_node_max=1)
    assert counts_of(plan) == {"a": 4, "b": 2, "c": 2}
    assert leaders_of(plan) == {"a": 4, "b": 2, "c": 2}


def test_two_replicas_in_one_dc_are_spread() -> None:
    nodes = grid(3, 2)
    shards = [shard(0, 2, ["n00", "n01"], leader="n00")]
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=1)
    assert render(plan) == "\n".join(
        [
            "shard 0: n00 n10 leader n00",
            "move shard 0: +n10 -n01 (spread)",
        ]
    )


def test_replicas_beyond_rf_are_removed_leader_last() -> None:
    nodes = grid(3, 1)
    shards = [shard(0, 2, ["n00", "n10", "n20"], leader="n20"), shard(1, 1, ["n00"], "n00")]
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=1)
    assert render(plan) == "\n".join(
        [
            "shard 0: n10 n20 leader n20",  # n00 is the most loaded non-leader
            "shard 1: n00 leader n00",
            "move shard 0: -n00 (shrink)",
        ]
    )


def test_leaders_are_kept_when_balanced_and_moved_when_not() -> None:
    nodes = grid(3, 1)
    balanced = [shard(i, 3, ["n00", "n10", "n20"], leader=f"n{i % 3}0") for i in range(6)]
    plan = plan_placement(nodes, balanced, concurrent_moves_per_node_max=1)
    assert [t.leader for t in plan.targets] == [s.leader for s in balanced]

    piled = [shard(i, 3, ["n00", "n10", "n20"], leader="n00") for i in range(6)]
    plan = plan_placement(nodes, piled, concurrent_moves_per_node_max=1)
    assert plan.converged  # leader changes are not moves
    assert leaders_of(plan) == {"n00": 2, "n10": 2, "n20": 2}


def test_leaders_move_along_a_chain() -> None:
    # n00 leads two shards; n20 leads none and shares no shard with n00, but
    # n10 shares one with each: the plan moves one leader n00 -> n10 and one
    # n10 -> n20.
    nodes = [node("n00", "dc0"), node("n10", "dc1"), node("n20", "dc2")]
    shards = [
        shard(0, 1, ["n00"], "n00"),
        shard(1, 2, ["n00", "n10"], "n00"),
        shard(2, 2, ["n10", "n20"], "n10"),
    ]
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=1)
    assert plan.converged
    assert [t.leader for t in plan.targets] == ["n00", "n10", "n20"]


def test_rf4_over_three_dcs_uses_every_dc() -> None:
    nodes = grid(3, 3)
    plan = plan_placement(nodes, [shard(0, 4)], concurrent_moves_per_node_max=1)
    dc = {n.id: n.dc for n in nodes}
    per_dc = Counter(dc[n] for n in plan.target(PhysicalShardId(0)).replicas)
    assert sorted(per_dc.values()) == [1, 1, 2]


def test_a_relocation_that_turns_out_needless_is_undone() -> None:
    # Found by Hypothesis. Step 1 drops n08 (excess, not the leader); step 3
    # then moves the leader's replica n01 to the emptier n00. Putting the
    # replica back on n08 instead of n00 is just as balanced and moves nothing.
    nodes = [node("n00", "dc0", capacity=2), node("n01", "dc0"), node("n08", "dc0", capacity=2)]
    plan = plan_placement(
        nodes, [shard(0, 1, ["n08", "n01"], "n01")], concurrent_moves_per_node_max=1
    )
    assert render(plan) == "\n".join(
        [
            "shard 0: n08 leader n08",
            "move shard 0: -n01 (shrink)",
        ]
    )


def test_two_replacements_that_swap_nodes_are_undone() -> None:
    # Found by Hypothesis: shards 4 and 17 each had more replicas than RF 1;
    # the greedy steps kept shard 4 on n01 and shard 17 on n04, although
    # shard 4 already had n04 and shard 17 already had n01.
    capacities = {"n01": 3, "n04": 4, "n08": 2}
    dcs = ["dc0", "dc1", "dc2", "dc0", "dc1", "dc0", "dc0", "dc2", "dc1", "dc0"]
    nodes = [node(f"n{i:02d}", dc, capacities.get(f"n{i:02d}", 1)) for i, dc in enumerate(dcs)]
    shards = [shard(i, 1) for i in range(13)]
    shards[4] = shard(4, 1, ["n00", "n02", "n04", "n07"], "n07")
    shards += [
        shard(13, 2),
        shard(14, 3),
        shard(15, 3, ["n00", "n01"]),
        shard(16, 3, ["n00", "n01"]),
        shard(17, 1, ["n01", "n02"]),
    ]
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=1)
    assert plan.target(PhysicalShardId(4)).replicas == ("n04",)
    assert plan.target(PhysicalShardId(17)).replicas == ("n01",)


# ---------------------------------------------------------------------------
# the throttle


def test_repairs_get_the_budget_before_balance() -> None:
    nodes = [node("a", "dc0"), node("b", "dc0", alive=False), node("c", "dc0")]
    shards = [
        shard(1, 1, ["a"], "a"),
        shard(2, 1, ["a"], "a"),
        shard(3, 1, ["a"], "a"),
        shard(4, 1, ["b"], "b"),
    ]
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=1)
    assert render(plan) == "\n".join(
        [
            "shard 1: c leader c",
            "shard 2: a leader a",
            "shard 3: a leader a",
            "shard 4: c leader c",
            "move shard 4: +c -b (repair)",
            "deferred shard 1: +c -a (balance)",
        ]
    )


def test_moves_in_progress_use_up_the_budget() -> None:
    shards = [shard(i, 3, ["n00", "n10", "n20"], leader="n00") for i in range(4)]
    nodes = grid(4, 1)
    busy = {NodeId("n30"): 1}
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=1, moves_in_progress=busy)
    assert not plan.moves and len(plan.deferred) == 3
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=2, moves_in_progress=busy)
    assert len(plan.moves) == 1 and len(plan.deferred) == 2


def test_dead_nodes_are_not_throttled() -> None:
    nodes = [node("dead", "dc0", alive=False), *(node(f"n{i}", "dc0") for i in range(4))]
    shards = [shard(i, 1, ["dead"], "dead") for i in range(4)]
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=1)
    assert sorted((m.add, m.remove) for m in plan.moves) == [
        ("n0", "dead"),
        ("n1", "dead"),
        ("n2", "dead"),
        ("n3", "dead"),
    ]


def test_one_membership_change_per_shard_at_a_time() -> None:
    nodes = [*grid(3, 2)]
    nodes = [node(n.id, n.dc, alive=n.id not in ("n10", "n20")) for n in nodes]
    shards = [shard(0, 3, ["n00", "n10", "n20"], "n00")]
    plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=2)
    assert render(plan) == "\n".join(
        [
            "shard 0: n00 n11 n21 leader n00",
            "move shard 0: +n11 -n10 (repair)",
            "deferred shard 0: +n21 -n20 (repair)",
        ]
    )
    final, plans = run_until_converged(nodes, shards, moves_max=2, rounds_max=5)
    assert len(plans) == 3
    assert sorted(final[0].replicas) == ["n00", "n11", "n21"]


def test_a_converged_plan_is_stable() -> None:
    nodes = grid(3, 2)
    shards = [shard(i, 3) for i in range(8)]
    final, plans = run_until_converged(nodes, shards, moves_max=1, rounds_max=50)
    assert len(plans) > 2  # the throttle spread the creation over several rounds
    again = plan_placement(nodes, final, concurrent_moves_per_node_max=1)
    assert again.converged
    assert apply_targets(final, again) == final


# ---------------------------------------------------------------------------
# malformed input


@pytest.mark.parametrize(
    ("nodes", "shards", "moves_max", "message"),
    [
        ([node("a", "x"), node("a", "y")], [], 1, "duplicate node id"),
        ([node("a", "x", capacity=0)], [], 1, "capacity"),
        ([node("a", "x")], [shard(0, 1), shard(0, 2)], 1, "duplicate shard id"),
        ([node("a", "x")], [shard(0, 0)], 1, "replication factor"),
        ([node("a", "x")], [shard(0, 1, ["a", "a"])], 1, "listed twice"),
        ([node("a", "x")], [], 0, "concurrent_moves_per_node_max"),
    ],
)
def test_malformed_input_is_refused(
    nodes: list[object], shards: list[object], moves_max: int, message: str
) -> None:
    with pytest.raises(PlacementInputError, match=message):
        plan_placement(nodes, shards, concurrent_moves_per_node_max=moves_max)  # type: ignore[arg-type]


def test_negative_moves_in_progress_is_refused() -> None:
    with pytest.raises(PlacementInputError, match="negative"):
        plan_placement(
            [node("a", "x")],
            [],
            concurrent_moves_per_node_max=1,
            moves_in_progress={NodeId("a"): -1},
        )

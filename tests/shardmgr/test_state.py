"""The shard manager's state (shardmgr.state): every change, on concrete states
and as Hypothesis properties over random clusters and random operation walks.

The invariants checked after every change are written out here, from the
module docstrings of shardmgr.state and shardmgr.placement, rather than taken
from the implementation. Known bugs are ``xfail(strict=True)`` tests that say
what goes wrong.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardmgr.placement import Node
from shardmgr.state import (
    KEYSPACE_ACTIVE,
    KEYSPACE_CREATING,
    KEYSPACE_DROPPING,
    LOGICAL_SHARDS_MAX,
    PHYSICAL_SHARDS_PER_KEYSPACE_MAX,
    ClusterState,
    NodeInfo,
    StateError,
    create_keyspace,
    drop_keyspace,
    mark_owned,
    register_node,
    remove_keyspace,
)
from tests.shardmgr.placement_support import follows_rules, improving_relocation
from tests.shardmgr.placement_support import node as placement_node

PROPERTY = settings(max_examples=100, deadline=None)
RAFT_PORT_BASE = 7000

# ---------------------------------------------------------------------------
# building states


def info(name: str, dc: str, *, host: str | None = None, client_port: int = 9000,
         ports: tuple[int, int] = (RAFT_PORT_BASE, RAFT_PORT_BASE + 99),
         capacity: int = 1) -> NodeInfo:
    return NodeInfo(name, dc, host if host is not None else f"host-{name}", client_port,
                    ports[0], ports[1], capacity)


def grid_state(dcs: int, nodes_per_dc: int, *, capacity: int = 1,
               ports: int = 100) -> ClusterState:
    """Nodes ``n<dc><i>`` in DCs ``dc<dc>`` (the placement tests' naming)."""
    state = ClusterState()
    for d in range(dcs):
        for i in range(nodes_per_dc):
            state = register_node(state, info(
                f"n{d}{i}", f"dc{d}", ports=(RAFT_PORT_BASE, RAFT_PORT_BASE + ports - 1),
                capacity=capacity))
    return state


def create(state: ClusterState, name: str, *, logical: int = 4, rf: int = 1, physical: int = 1,
           alive: Iterable[str] | None = None) -> ClusterState:
    return create_keyspace(state, name, logical_shards=logical, replication_factor=rf,
                           physical_shards=physical,
                           alive=state.nodes if alive is None else alive)


def replica_counts(state: ClusterState, nodes: Iterable[str] | None = None) -> Counter[str]:
    counts: Counter[str] = Counter({n: 0 for n in (state.nodes if nodes is None else nodes)})
    for shard in state.shards.values():
        counts.update(r.node for r in shard.replicas)
    return counts


def placement_nodes(state: ClusterState, alive: Iterable[str]) -> list[Node]:
    live = set(alive)
    return [placement_node(n.id, n.dc, n.capacity, n.id in live) for n in state.nodes.values()]


def assert_refused(change: Callable[[ClusterState], ClusterState], state: ClusterState,
                   match: str | None = None) -> None:
    """``change`` raises StateError and leaves ``state`` exactly as it was."""
    before = copy.deepcopy(state)
    before_json = state.to_json()
    with pytest.raises(StateError, match=match):
        change(state)
    assert state == before
    assert state.to_json() == before_json


# ---------------------------------------------------------------------------
# invariants of every reachable state


def check_invariants(state: ClusterState) -> None:
    nodes = state.nodes
    assert all(n.id == key for key, n in nodes.items())
    for n in nodes.values():
        assert 1 <= n.raft_port_min <= n.raft_port_max
        assert n.capacity >= 1
    ports: dict[str, list[int]] = {n: [] for n in nodes}
    for shard_id, shard in state.shards.items():
        assert shard.id == shard_id
        assert 0 < shard_id < state.next_shard_id
        assert shard.keyspace in state.keyspaces
        assert shard.created_version <= state.version
        members = [r.node for r in shard.replicas]
        assert len(set(members)) == len(members), f"shard {shard_id}: a node twice"
        assert set(members) <= set(nodes)
        assert len(members) == state.keyspaces[shard.keyspace].replication_factor
        for r in shard.replicas:
            node = nodes[r.node]
            assert node.raft_port_min <= r.raft_port <= node.raft_port_max
            ports[r.node].append(r.raft_port)
    for node_id, used in ports.items():
        assert len(set(used)) == len(used), f"node {node_id}: a raft port twice: {used}"
    ks_ids = [k.id for k in state.keyspaces.values()]
    assert len(set(ks_ids)) == len(ks_ids)
    for name, ks in state.keyspaces.items():
        assert ks.name == name
        assert 0 <= ks.id < state.next_keyspace_id
        assert ks.state in {KEYSPACE_CREATING, KEYSPACE_ACTIVE, KEYSPACE_DROPPING}
        assert len(ks.logical_map) == ks.logical_shards
        assert set(ks.shard_ids) == {s.id for s in state.shards.values() if s.keyspace == name}
        assert list(ks.logical_map) == sorted(ks.logical_map)
        owned = [state.shards[p].owned for p in ks.shard_ids]
        if ks.state == KEYSPACE_ACTIVE:
            assert all(owned)
        if ks.state == KEYSPACE_CREATING:
            assert not all(owned)
    check_assignments(state)
    check_client_map(state)


def check_assignments(state: ClusterState) -> None:
    """Each replica appears exactly once, in its node's assignment, with its peers."""
    seen: Counter[tuple[int, str]] = Counter()
    for node_id in state.nodes:
        assignment = state.assignment(node_id)
        assert [a.shard for a in assignment] == sorted({a.shard for a in assignment})
        for a in assignment:
            shard = state.shards[a.shard]
            seen[(a.shard, node_id)] += 1
            (mine,) = [r for r in shard.replicas if r.node == node_id]
            assert a.raft_port == mine.raft_port
            assert a.keyspace == shard.keyspace
            assert a.created_version == shard.created_version
            assert a.peers == tuple(
                f"{state.nodes[r.node].host}:{r.raft_port}"
                for r in shard.replicas if r.node != node_id)
    expected = Counter((s.id, r.node) for s in state.shards.values() for r in s.replicas)
    assert seen == expected
    assert state.assignment("no-such-node") == []


def check_client_map(state: ClusterState) -> None:
    cmap = state.client_map()
    assert cmap["version"] == state.version
    serving = {k.name: k for k in state.keyspaces.values() if k.state != KEYSPACE_DROPPING}
    assert set(cmap["keyspaces"]) == set(serving)
    for name, entry in cmap["keyspaces"].items():
        ks = serving[name]
        assert entry == {"id": ks.id, "logical_shards": ks.logical_shards,
                         "replication_factor": ks.replication_factor, "state": ks.state,
                         "map": list(ks.logical_map)}
    serving_shards = {p for ks in serving.values() for p in ks.logical_map}
    assert set(cmap["shards"]) == {str(p) for p in serving_shards}
    for key, replicas in cmap["shards"].items():
        shard = state.shards[int(key)]
        assert replicas == [
            {"node": r.node,
             "address": f"{state.nodes[r.node].host}:{state.nodes[r.node].client_port}",
             "raft_address": f"{state.nodes[r.node].host}:{r.raft_port}"}
            for r in shard.replicas]
    # The client map travels as cbor and json.
    assert cbor2.loads(cbor2.dumps(cmap)) == cmap
    assert json.loads(json.dumps(cmap)) == cmap


def check_new_keyspace(before: ClusterState, after: ClusterState, name: str, *, logical: int,
                       rf: int, physical: int, alive: Iterable[str]) -> None:
    """What create_keyspace promises about the keyspace it added."""
    live = sorted(set(alive) & set(before.nodes))
    assert after.version == before.version + 1
    assert after.nodes == before.nodes
    assert {k: v for k, v in after.keyspaces.items() if k != name} == dict(before.keyspaces)
    assert {i: s for i, s in after.shards.items() if i in before.shards} == dict(before.shards)
    new_ids = list(range(before.next_shard_id, before.next_shard_id + physical))
    assert sorted(set(after.shards) - set(before.shards)) == new_ids
    assert after.next_shard_id == before.next_shard_id + physical
    assert after.next_keyspace_id == before.next_keyspace_id + 1

    ks = after.keyspaces[name]
    assert (ks.name, ks.id, ks.logical_shards, ks.replication_factor, ks.state) == (
        name, before.next_keyspace_id, logical, rf, KEYSPACE_CREATING)
    # The logical map: contiguous ranges over exactly the new shards, sizes within 1.
    assert len(ks.logical_map) == logical
    assert ks.shard_ids == tuple(new_ids)
    assert list(ks.logical_map) == sorted(ks.logical_map)
    sizes = Counter(ks.logical_map)
    assert max(sizes.values()) - min(sizes.values()) <= 1
    assert sorted(sizes.values()) == sorted(
        [logical // physical + 1] * (logical % physical)
        + [logical // physical] * (physical - logical % physical))
    assert ks.logical_map[0] == new_ids[0] and ks.logical_map[-1] == new_ids[-1]
    for p in new_ids:
        assert ks.logical_shards_of(p) == tuple(
            ls for ls in range(logical) if ls * physical // logical == p - new_ids[0])

    nodes = placement_nodes(after, live)
    live_dcs = {after.nodes[n].dc for n in live}
    for p in new_ids:
        shard = after.shards[p]
        assert (shard.keyspace, shard.owned, shard.created_version) == (name, False,
                                                                         after.version)
        members = [r.node for r in shard.replicas]
        # The state refuses rf > live nodes, so min(rf, live) is always rf.
        assert len(members) == min(rf, len(live)) == rf
        assert len(set(members)) == rf
        assert set(members) <= set(live)
        if len(live_dcs) >= rf:
            assert len({after.nodes[m].dc for m in members}) == rf
        assert follows_rules(nodes, members, rf), (p, members)
    check_invariants(after)


# ---------------------------------------------------------------------------
# register_node


def test_register_node_adds_nodes_and_bumps_the_version() -> None:
    state = ClusterState()
    a = info("a", "dc1")
    one = register_node(state, a)
    assert (one.version, dict(one.nodes)) == (1, {"a": a})
    b = info("b", "dc2", capacity=3)
    two = register_node(one, b)
    assert (two.version, dict(two.nodes)) == (2, {"a": a, "b": b})
    assert dict(one.nodes) == {"a": a}, "the input state changed"
    assert state == ClusterState()
    assert (two.keyspaces, two.shards, two.next_keyspace_id, two.next_shard_id) == ({}, {}, 0, 1)


def test_register_node_again_unchanged_returns_the_same_state() -> None:
    state = create(grid_state(1, 2), "ks", rf=2, physical=2)
    node = state.nodes["n00"]
    assert register_node(state, node) is state
    assert register_node(state, copy.deepcopy(node)) is state
    assert register_node(state, info("n00", "dc0")) is state


@pytest.mark.parametrize("change", [
    {"client_port": 9999}, {"capacity": 5}, {"host": "elsewhere"},
    {"raft_port_min": 8000, "raft_port_max": 8010},
])
def test_register_node_updates_a_node_without_replicas(change: dict[str, Any]) -> None:
    state = grid_state(1, 2)
    old = state.nodes["n00"]
    new = NodeInfo(**{**vars(old), **change})
    after = register_node(state, new)
    assert after.version == state.version + 1
    assert after.nodes["n00"] == new
    assert after.nodes["n01"] == state.nodes["n01"]
    assert state.nodes["n00"] == old


@pytest.mark.parametrize("change", [{"client_port": 9999}, {"capacity": 5}])
def test_register_node_updates_client_port_and_capacity_of_a_node_with_replicas(
        change: dict[str, Any]) -> None:
    state = create(grid_state(1, 1), "ks")
    new = NodeInfo(**{**vars(state.nodes["n00"]), **change})
    after = register_node(state, new)
    assert after.version == state.version + 1
    assert after.nodes["n00"] == new
    assert after.shards == state.shards
    check_invariants(after)
    if "client_port" in change:
        (replicas,) = after.client_map()["shards"].values()
        assert replicas[0]["address"] == "host-n00:9999"


def test_register_node_refuses_a_dc_change() -> None:
    state = grid_state(2, 1)
    assert_refused(lambda s: register_node(s, info("n00", "dc1")), state,
                   match="cannot change data center")
    with_replicas = create(state, "ks", rf=2)
    assert_refused(lambda s: register_node(s, info("n00", "dc1")), with_replicas,
                   match="cannot change data center")


@pytest.mark.parametrize("change", [
    {"host": "elsewhere"}, {"raft_port_min": RAFT_PORT_BASE + 1},
    {"raft_port_max": RAFT_PORT_BASE + 50}, {"raft_port_min": 1, "raft_port_max": 65000},
])
def test_register_node_refuses_host_or_port_changes_of_a_node_with_replicas(
        change: dict[str, Any]) -> None:
    state = create(grid_state(1, 2), "ks", physical=2)
    hosting = {r.node for s in state.shards.values() for r in s.replicas}
    assert hosting == {"n00", "n01"}
    new = NodeInfo(**{**vars(state.nodes["n00"]), **change})
    assert_refused(lambda s: register_node(s, new), state, match="hosts replicas")


def test_register_node_allows_a_host_change_once_its_replicas_are_removed() -> None:
    state = create(grid_state(1, 1), "ks")
    moved = info("n00", "dc0", host="new-host", ports=(100, 199))
    assert_refused(lambda s: register_node(s, moved), state)
    # A replica of a keyspace being dropped still counts.
    dropping = drop_keyspace(state, "ks")
    assert_refused(lambda s: register_node(s, moved), dropping)
    removed = remove_keyspace(dropping, "ks")
    after = register_node(removed, moved)
    assert after.nodes["n00"] == moved
    assert after.version == removed.version + 1


@pytest.mark.parametrize(("ports", "capacity"), [
    ((10, 9), 1), ((0, 10), 1), ((-5, 10), 1), ((0, 0), 1), ((7000, 6999), 1),
    ((7000, 7010), 0), ((7000, 7010), -1),
])
def test_register_node_refuses_bad_port_ranges_and_capacities(
        ports: tuple[int, int], capacity: int) -> None:
    fresh = ClusterState()
    bad = info("a", "dc1", ports=ports, capacity=capacity)
    assert_refused(lambda s: register_node(s, bad), fresh)
    # Also as an update of a registered node.
    registered = register_node(fresh, info("a", "dc1"))
    assert_refused(lambda s: register_node(s, bad), registered)


def test_register_node_accepts_a_single_port_range() -> None:
    state = register_node(ClusterState(), info("a", "dc1", ports=(1, 1)))
    after = create(state, "ks")
    assert after.shards[1].replicas[0].raft_port == 1


def test_register_node_refuses_raft_ports_above_65535() -> None:
    assert_refused(lambda s: register_node(s, info("a", "dc1", ports=(7000, 70000))),
                   ClusterState())


@PROPERTY
@given(st.integers(-3, 70), st.integers(-3, 70), st.integers(-2, 4))
def test_register_node_accepts_exactly_the_valid_nodes(port_min: int, port_max: int,
                                                       capacity: int) -> None:
    node = info("a", "dc1", ports=(port_min, port_max), capacity=capacity)
    valid = 1 <= port_min <= port_max and capacity >= 1
    if valid:
        assert register_node(ClusterState(), node).nodes["a"] == node
    else:
        assert_refused(lambda s: register_node(s, node), ClusterState())


# ---------------------------------------------------------------------------
# create_keyspace: concrete


def test_create_keyspace_on_a_small_cluster() -> None:
    state = grid_state(3, 1)
    after = create(state, "users", logical=8, rf=3, physical=3)
    ks = after.keyspaces["users"]
    assert ks.logical_map == (1, 1, 1, 2, 2, 2, 3, 3)
    assert ks.logical_shards_of(2) == (3, 4, 5)
    assert ks.shard_ids == (1, 2, 3)
    # Three nodes, RF 3: every node holds every shard, on consecutive ports.
    for p in (1, 2, 3):
        assert sorted((r.node, r.raft_port) for r in after.shards[p].replicas) == [
            ("n00", RAFT_PORT_BASE + p - 1), ("n10", RAFT_PORT_BASE + p - 1),
            ("n20", RAFT_PORT_BASE + p - 1)]
    check_new_keyspace(state, after, "users", logical=8, rf=3, physical=3, alive=state.nodes)


def test_create_keyspace_allocates_fresh_ids_and_ports_after_earlier_keyspaces() -> None:
    state = create(grid_state(1, 2, ports=3), "a", rf=2, physical=2)
    after = create(state, "b", rf=1, physical=2)
    assert after.keyspaces["a"].id == 0 and after.keyspaces["b"].id == 1
    assert after.keyspaces["b"].shard_ids == (3, 4)
    ports_of = {n: sorted(r.raft_port for s in after.shards.values() for r in s.replicas
                          if r.node == n) for n in after.nodes}
    assert ports_of == {"n00": [7000, 7001, 7002], "n01": [7000, 7001, 7002]}
    # Ids are never reused, even after a keyspace is removed; its ports are.
    gone = remove_keyspace(drop_keyspace(after, "a"), "a")
    again = create(gone, "c", rf=2, physical=1)
    assert again.keyspaces["c"].id == 2
    assert again.keyspaces["c"].shard_ids == (5,)
    assert sorted(r.raft_port for r in again.shards[5].replicas) == [7000, 7000]
    check_invariants(again)


def test_create_keyspace_places_only_on_live_registered_nodes() -> None:
    state = grid_state(2, 2)
    after = create(state, "ks", rf=2, physical=4, alive=["n00", "n11", "ghost", "n11"])
    assert {r.node for s in after.shards.values() for r in s.replicas} == {"n00", "n11"}
    check_new_keyspace(state, after, "ks", logical=4, rf=2, physical=4,
                       alive=["n00", "n11"])


def test_create_keyspace_rf_above_the_dc_count_splits_evenly() -> None:
    state = grid_state(2, 2)
    after = create(state, "ks", rf=3, physical=4)
    for shard in after.shards.values():
        per_dc = Counter(after.nodes[r.node].dc for r in shard.replicas)
        assert sorted(per_dc.values()) == [1, 2]
    check_new_keyspace(state, after, "ks", logical=4, rf=3, physical=4, alive=state.nodes)


def test_create_keyspace_with_the_most_logical_shards() -> None:
    state = grid_state(1, 1)
    after = create(state, "big", logical=LOGICAL_SHARDS_MAX, physical=16)
    sizes = Counter(after.keyspaces["big"].logical_map)
    assert set(sizes.values()) == {LOGICAL_SHARDS_MAX // 16}


@pytest.mark.parametrize("name", ["a", "Z", "0", "a-b_c.D9", ".", "x" * 64])
def test_create_keyspace_accepts_good_names(name: str) -> None:
    assert name in create(grid_state(1, 1), name).keyspaces


@pytest.mark.parametrize("name", [
    "", "x" * 65, "a b", "a/b", "a:b", "ключ", "a\tb", "\nab", "a\nb", "a\x00",
])
def test_create_keyspace_refuses_bad_names(name: str) -> None:
    assert_refused(lambda s: create(s, name), grid_state(1, 1), match="bad keyspace name")


def test_create_keyspace_refuses_a_name_ending_in_newline() -> None:
    assert_refused(lambda s: create(s, "ks\n"), grid_state(1, 1), match="bad keyspace name")


def test_create_keyspace_refuses_a_duplicate_name_even_while_it_is_dropped() -> None:
    state = create(grid_state(1, 2), "ks")
    assert_refused(lambda s: create(s, "ks"), state, match="already exists")
    dropping = drop_keyspace(state, "ks")
    assert_refused(lambda s: create(s, "ks"), dropping, match="already exists")
    assert "ks" in create(remove_keyspace(dropping, "ks"), "ks").keyspaces


@pytest.mark.parametrize("logical", [0, -1, -4, 3, 6, 12, 1000, 2 * LOGICAL_SHARDS_MAX, 65535])
def test_create_keyspace_refuses_logical_shard_counts(logical: int) -> None:
    assert_refused(lambda s: create(s, "ks", logical=logical), grid_state(1, 1),
                   match="power of two")


@pytest.mark.parametrize("rf", [0, -1])
def test_create_keyspace_refuses_replication_factor_below_one(rf: int) -> None:
    assert_refused(lambda s: create(s, "ks", rf=rf), grid_state(1, 1),
                   match="replication factor")


@pytest.mark.parametrize(("logical", "physical"), [
    (4, 0), (4, -1), (4, 5), (1, 2), (8192, PHYSICAL_SHARDS_PER_KEYSPACE_MAX + 1),
])
def test_create_keyspace_refuses_physical_shard_counts(logical: int, physical: int) -> None:
    assert_refused(lambda s: create(s, "ks", logical=logical, physical=physical),
                   grid_state(1, 1), match="physical shards")


def test_create_keyspace_refuses_too_few_live_nodes() -> None:
    state = grid_state(3, 1)
    assert_refused(lambda s: create(s, "ks", rf=4), state, match="live nodes")
    assert_refused(lambda s: create(s, "ks", rf=3, alive=["n00", "n10", "ghost"]), state,
                   match="live nodes")
    assert_refused(lambda s: create(s, "ks", rf=1, alive=[]), state, match="live nodes")
    assert_refused(lambda s: create(s, "ks", rf=1), ClusterState(), match="live nodes")


def test_create_keyspace_refuses_when_a_node_runs_out_of_raft_ports() -> None:
    state = grid_state(1, 1, ports=3)
    full = create(state, "a", physical=3)
    assert sorted(r.raft_port for s in full.shards.values() for r in s.replicas) == [
        7000, 7001, 7002]
    assert_refused(lambda s: create(s, "b"), full, match="no free Raft port")
    assert_refused(lambda s: create(s, "b", physical=4), state, match="no free Raft port")
    # Dropping does not free ports (the replicas still exist); removal does.
    dropped = drop_keyspace(full, "a")
    assert_refused(lambda s: create(s, "b"), dropped, match="no free Raft port")
    freed = create(remove_keyspace(dropped, "a"), "b", physical=3)
    check_invariants(freed)


def test_create_keyspace_balances_a_single_dc() -> None:
    state = grid_state(1, 4)
    after = create(state, "ks", logical=16, rf=3, physical=10)
    counts = replica_counts(after)
    assert sorted(counts.values()) == [7, 7, 8, 8]


def test_create_keyspace_spread_rule_can_leave_counts_two_apart() -> None:
    """4 DCs x 3 nodes, RF 3, 4 shards: one replica per DC on 3 of the 4 DCs.

    The placement leaves one node with 2 replicas and one with 0, yet no single
    relocation is legal and improving: placement's balance definition only
    bounds counts of pairs between which a replica could legally move, so
    "within 1 over all nodes" does not hold when DCs outnumber RF.
    """
    state = grid_state(4, 3)
    after = create(state, "ks", rf=3, physical=4)
    layout = {p: [r.node for r in s.replicas] for p, s in after.shards.items()}
    nodes = placement_nodes(after, after.nodes)
    assert improving_relocation(nodes, dict.fromkeys(layout, 3), layout) is None
    counts = replica_counts(after)
    assert max(counts.values()) - min(counts.values()) <= 2  # 2 as of writing


@pytest.mark.xfail(strict=True, reason=(
    "known limit: the plan balances totals by relocating an existing replica (shard 1 from "
    "n00 to n22 here); create_keyspace hands each such move to a new shard by a direct "
    "swap that keeps its DC spread, but searches no chains of swaps, and here no direct "
    "swap is legal: counts n00=2 n01=2 ... n22=0 where 10 replicas on 9 nodes fit within 1"))
def test_create_keyspace_second_keyspace_is_balanced_given_the_first() -> None:
    state = create(grid_state(3, 3), "a", logical=1, rf=2, physical=1)
    assert sorted(r.node for r in state.shards[1].replicas) == ["n00", "n10"]
    after = create(state, "b", logical=4, rf=2, physical=4)
    counts = replica_counts(after)
    assert max(counts.values()) - min(counts.values()) <= 1, dict(counts)


# ---------------------------------------------------------------------------
# create_keyspace: properties over random clusters


@st.composite
def random_clusters(draw: st.DrawFn, *, equal: bool = False) -> tuple[ClusterState, list[str]]:
    """1-4 DCs of 1-4 nodes, capacities 1-3, some nodes dead; and the live node ids.

    ``equal``: every DC has the same node count, capacity 1, every node alive.
    """
    dcs = draw(st.integers(1, 4))
    per_dc = [draw(st.integers(1, 4))] * dcs if equal else [
        draw(st.integers(1, 4)) for _ in range(dcs)]
    state = ClusterState()
    alive = []
    for d, count in enumerate(per_dc):
        for i in range(count):
            capacity = 1 if equal else draw(st.integers(1, 3))
            base = draw(st.sampled_from([1, 7000, 7000 + 10 * i]))
            state = register_node(state, info(f"n{d}{i}", f"dc{d}",
                                              ports=(base, base + 63), capacity=capacity))
            if equal or draw(st.sampled_from([True, True, True, False])):
                alive.append(f"n{d}{i}")
    return state, alive


@st.composite
def keyspace_params(draw: st.DrawFn) -> dict[str, int]:
    logical = 2 ** draw(st.integers(0, 10))
    return {"logical": logical, "rf": draw(st.integers(1, 3)),
            "physical": draw(st.integers(1, min(logical, 16)))}


@settings(max_examples=150, deadline=None)
@given(random_clusters(), st.lists(keyspace_params(), min_size=1, max_size=3))
def test_create_keyspace_properties_over_random_clusters(
        cluster: tuple[ClusterState, list[str]], keyspaces: list[dict[str, int]]) -> None:
    state, alive = cluster
    for i, params in enumerate(keyspaces):
        name = f"ks{i}"
        if params["rf"] > len(alive):
            assert_refused(lambda s, p=params, n=name: create(s, n, alive=alive, **p), state,
                           match="live nodes")
            continue
        after = create(state, name, alive=alive, **params)
        check_new_keyspace(state, after, name, alive=alive, **params)
        state = after


@settings(max_examples=100, deadline=None)
@given(random_clusters(), keyspace_params())
def test_create_keyspace_first_keyspace_is_balanced(
        cluster: tuple[ClusterState, list[str]], params: dict[str, int]) -> None:
    """On an empty cluster the new shards are the whole layout: balanced as defined
    by placement (no legal relocation lowers sum(count**2 / cap))."""
    state, alive = cluster
    if params["rf"] > len(alive):
        return
    after = create(state, "ks", alive=alive, **params)
    layout = {p: [r.node for r in s.replicas] for p, s in after.shards.items()}
    nodes = placement_nodes(after, alive)
    assert improving_relocation(nodes, dict.fromkeys(layout, params["rf"]), layout) is None


@settings(max_examples=100, deadline=None)
@given(random_clusters(equal=True), keyspace_params())
def test_create_keyspace_first_keyspace_counts_within_one(
        cluster: tuple[ClusterState, list[str]], params: dict[str, int]) -> None:
    """Equal capacities, all alive, equal DC sizes and RF >= DCs (or one DC):
    every pair of nodes can exchange a replica, so counts are within 1. (With
    more DCs than RF they need not be: see the spread-rule test above.)"""
    state, alive = cluster
    dcs = {n.dc for n in state.nodes.values()}
    if params["rf"] > len(alive) or params["rf"] < len(dcs):
        return
    counts = replica_counts(create(state, "ks", alive=alive, **params))
    assert max(counts.values()) - min(counts.values()) <= 1, dict(counts)


# ---------------------------------------------------------------------------
# mark_owned


def test_mark_owned_activates_the_keyspace_when_its_last_shard_is_owned() -> None:
    state = create(create(grid_state(1, 2), "a", physical=3), "b", physical=1)
    assert state.keyspaces["a"].shard_ids == (1, 2, 3)
    one = mark_owned(state, 2)
    assert one.version == state.version + 1
    assert one.shards[2].owned and not state.shards[2].owned
    assert one.keyspaces["a"].state == KEYSPACE_CREATING
    assert mark_owned(one, 2) is one
    two = mark_owned(one, 1)
    assert two.keyspaces["a"].state == KEYSPACE_CREATING
    three = mark_owned(two, 3)
    assert three.version == state.version + 3
    assert three.keyspaces["a"].state == KEYSPACE_ACTIVE
    assert three.keyspaces["b"].state == KEYSPACE_CREATING
    assert mark_owned(three, 3) is three
    assert three.client_map()["keyspaces"]["a"]["state"] == KEYSPACE_ACTIVE
    check_invariants(three)


@pytest.mark.parametrize("shard_id", [0, -1, 99])
def test_mark_owned_of_an_unknown_shard_changes_nothing(shard_id: int) -> None:
    state = create(grid_state(1, 1), "ks")
    assert mark_owned(state, shard_id) is state
    assert mark_owned(ClusterState(), shard_id) == ClusterState()


def test_mark_owned_does_not_revive_a_dropped_keyspace() -> None:
    state = drop_keyspace(create(grid_state(1, 1), "ks", physical=1), "ks")
    after = mark_owned(state, 1)
    assert after.shards[1].owned
    assert after.keyspaces["ks"].state == KEYSPACE_DROPPING
    assert "ks" not in after.client_map()["keyspaces"]


@PROPERTY
@given(st.integers(1, 6), st.data())
def test_mark_owned_in_any_order(physical: int, data: st.DataObject) -> None:
    state = create(create(grid_state(1, 2), "other", physical=2), "ks", logical=8,
                   physical=physical)
    ids = list(state.keyspaces["ks"].shard_ids)
    calls = data.draw(st.lists(st.sampled_from([*ids, 1, 2, 999]), max_size=20))
    owned: set[int] = set()
    for shard_id in calls:
        after = mark_owned(state, shard_id)
        if shard_id == 999 or shard_id in owned:
            assert after is state
        else:
            assert after.version == state.version + 1
            owned.add(shard_id)
        state = after
        assert state.keyspaces["ks"].state == (
            KEYSPACE_ACTIVE if set(ids) <= owned else KEYSPACE_CREATING)
        assert state.keyspaces["other"].state == (
            KEYSPACE_ACTIVE if {1, 2} <= owned else KEYSPACE_CREATING)
        assert {p for p, s in state.shards.items() if s.owned} == owned
    check_invariants(state)


# ---------------------------------------------------------------------------
# drop_keyspace and remove_keyspace


def test_drop_keyspace_takes_it_out_of_the_client_map_only() -> None:
    state = create(create(grid_state(2, 2), "a", rf=2, physical=2), "b", rf=2, physical=3)
    dropped = drop_keyspace(state, "a")
    assert dropped.version == state.version + 1
    assert dropped.keyspaces["a"].state == KEYSPACE_DROPPING
    assert dropped.keyspaces["b"] == state.keyspaces["b"]
    assert dropped.shards == state.shards, "dropping keeps the shards until removal"
    cmap = dropped.client_map()
    assert set(cmap["keyspaces"]) == {"b"}
    assert set(cmap["shards"]) == {"3", "4", "5"}
    assert cmap["keyspaces"]["b"] == state.client_map()["keyspaces"]["b"]
    # Nodes still host the dropped keyspace's replicas (they delete its data).
    for n in state.nodes:
        assert dropped.assignment(n) == state.assignment(n)
    assert drop_keyspace(dropped, "a") is dropped
    check_invariants(dropped)


def test_drop_keyspace_refuses_an_unknown_name() -> None:
    assert_refused(lambda s: drop_keyspace(s, "nope"), create(grid_state(1, 1), "ks"),
                   match="no keyspace")


def test_remove_keyspace_only_after_drop() -> None:
    state = create(create(grid_state(2, 2), "a", rf=2, physical=2), "b", rf=2, physical=3)
    assert_refused(lambda s: remove_keyspace(s, "a"), state, match="not being dropped")
    active = mark_owned(mark_owned(state, 1), 2)
    assert active.keyspaces["a"].state == KEYSPACE_ACTIVE
    assert_refused(lambda s: remove_keyspace(s, "a"), active, match="not being dropped")
    assert remove_keyspace(state, "unknown") is state


def test_remove_keyspace_forgets_its_shards_everywhere() -> None:
    state = create(create(grid_state(2, 2), "a", rf=2, physical=2), "b", rf=2, physical=3)
    dropped = drop_keyspace(state, "a")
    removed = remove_keyspace(dropped, "a")
    assert removed.version == dropped.version + 1
    assert set(removed.keyspaces) == {"b"}
    assert removed.keyspaces["b"] == state.keyspaces["b"]
    assert set(removed.shards) == {3, 4, 5}
    assert all(removed.shards[p] == state.shards[p] for p in (3, 4, 5))
    for n in removed.nodes:
        assert [a.shard for a in removed.assignment(n)] == [
            a.shard for a in state.assignment(n) if a.shard in (3, 4, 5)]
    assert removed.client_map()["keyspaces"] == {"b": state.client_map()["keyspaces"]["b"]}
    assert (removed.next_shard_id, removed.next_keyspace_id) == (6, 2)
    assert mark_owned(removed, 1) is removed
    assert remove_keyspace(removed, "a") is removed
    assert_refused(lambda s: drop_keyspace(s, "a"), removed, match="no keyspace")
    check_invariants(removed)


# ---------------------------------------------------------------------------
# random walks of operations: invariants and the codec

NODE_IDS = ["a", "b", "c", "d", "e", "f"]
NODE_DC = {"a": "x", "b": "x", "c": "y", "d": "y", "e": "z", "f": "z"}
Draw = Callable[[st.SearchStrategy[Any]], Any]


def draw_operation(draw: Draw, state: ClusterState) -> tuple[Any, ...]:
    """One change for ``state``: valid more often than not, refused now and then
    (unknown or bad names, dead clusters, DC changes, bad ports, no ports left)."""
    names = sorted(state.keyspaces)
    kind = draw(st.sampled_from(["register", "create", "create", "create", "own", "own",
                                 "own", "own", "drop", "drop", "remove", "remove"]))
    if kind == "register":
        node_id = draw(st.sampled_from(NODE_IDS))
        dc = draw(st.sampled_from([NODE_DC[node_id]] * 5 + ["w"]))
        base = draw(st.sampled_from([7000, 7000, 7100, 0]))
        width = draw(st.sampled_from([5, 5, 30, 0, -1]))
        return ("register", NodeInfo(
            node_id, dc, draw(st.sampled_from([f"host-{node_id}", "other-host"])),
            draw(st.sampled_from([9000, 9001])), base, base + width,
            draw(st.sampled_from([1, 1, 2, 3, 0]))))
    if kind == "create":
        logical = 2 ** draw(st.integers(0, 5))
        alive = draw(st.one_of(
            st.just(NODE_IDS),
            st.lists(st.sampled_from([*NODE_IDS, "ghost"]), unique=True)))
        name = draw(st.sampled_from([f"k{len(names)}"] * 4 + [*names, "bad name"]))
        return ("create", name, logical, draw(st.sampled_from([1, 1, 2, 2, 3, 0])),
                draw(st.sampled_from([1, 2, logical, min(logical, 6), logical + 1, 0])),
                alive)
    if kind == "own":
        unowned = sorted(p for p, s in state.shards.items() if not s.owned)
        return ("own", draw(st.sampled_from([*unowned, *unowned, *state.shards, 0, 99])))
    return (kind, draw(st.sampled_from([*names, *names, "unknown"])))


def apply_operation(state: ClusterState, op: tuple[Any, ...]) -> ClusterState:
    if op[0] == "register":
        return register_node(state, op[1])
    if op[0] == "create":
        _, name, logical, rf, physical, alive = op
        return create_keyspace(state, name, logical_shards=logical, replication_factor=rf,
                               physical_shards=physical, alive=alive)
    if op[0] == "own":
        return mark_owned(state, op[1])
    if op[0] == "drop":
        return drop_keyspace(state, op[1])
    return remove_keyspace(state, op[1])


def random_walk(draw: Draw, steps_max: int = 30) -> list[ClusterState]:
    """1-6 registered nodes in 3 DCs, then random changes: every state reached.

    Each change is checked to leave its input untouched, and either to return
    the very same state (nothing to do), a state one version later, or to be
    refused with StateError.
    """
    state = ClusterState()
    for n in draw(st.lists(st.sampled_from(NODE_IDS), min_size=1, unique=True)):
        state = register_node(state, NodeInfo(n, NODE_DC[n], f"host-{n}", 9000, 7000, 7019,
                                              draw(st.integers(1, 3))))
    states = [state]
    for _ in range(draw(st.integers(10, steps_max))):
        op = draw_operation(draw, state)
        before = copy.deepcopy(state)
        try:
            after = apply_operation(state, op)
        except StateError:
            assert state == before, f"{op} was refused but changed its input"
            continue
        assert state == before, f"{op} changed its input"
        if after is not state:
            assert after.version == state.version + 1, op
            assert after != state
            states.append(after)
            state = after
    return states


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_state_invariants_hold_along_random_walks(data: st.DataObject) -> None:
    for state in random_walk(data.draw):
        check_invariants(state)


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_state_json_round_trip_along_random_walks(data: st.DataObject) -> None:
    for state in random_walk(data.draw)[-3:]:
        data_json = state.to_json()
        assert ClusterState.from_json(data_json) == state
        via_cbor = ClusterState.from_json(cbor2.loads(cbor2.dumps(data_json)))
        assert via_cbor == state
        assert via_cbor.to_json() == data_json
        assert cbor2.dumps(via_cbor.to_json()) == cbor2.dumps(data_json)
        assert ClusterState.from_json(json.loads(json.dumps(data_json))) == state
        assert via_cbor.client_map() == state.client_map()
        assert all(via_cbor.assignment(n) == state.assignment(n) for n in state.nodes)


def test_state_json_round_trip_of_the_empty_state() -> None:
    data = ClusterState().to_json()
    assert data == {"version": 0, "nodes": [], "keyspaces": [], "shards": [],
                    "next_keyspace_id": 0, "next_shard_id": 1, "moves": [], "reshards": [],
                    "next_move_id": 1}
    assert ClusterState.from_json(cbor2.loads(cbor2.dumps(data))) == ClusterState()
    # A state stored before resharding existed still loads.
    old = {k: v for k, v in data.items() if k not in ("moves", "reshards", "next_move_id")}
    assert ClusterState.from_json(old) == ClusterState()


def test_state_to_json_is_independent_of_insertion_order() -> None:
    state = mark_owned(create(create(grid_state(2, 2), "b", rf=2, physical=2), "a"), 2)
    shuffled = ClusterState(
        state.version, dict(reversed(list(state.nodes.items()))),
        dict(reversed(list(state.keyspaces.items()))),
        dict(reversed(list(state.shards.items()))), state.next_keyspace_id,
        state.next_shard_id)
    assert cbor2.dumps(shuffled.to_json()) == cbor2.dumps(state.to_json())


def test_state_to_json_output_does_not_alias_the_state() -> None:
    state = create(grid_state(1, 1), "ks")
    data = state.to_json()
    data["nodes"][0]["host"] = "edited"
    data["shards"][0]["replicas"][0]["raft_port"] = 1
    assert state.nodes["n00"].host == "host-n00"
    assert state.shards[1].replicas[0].raft_port == RAFT_PORT_BASE


def test_the_replicas_of_a_group_being_created_are_founding_until_it_owns_its_shards() -> None:
    """Founding replicas elect their first leader after a short timeout
    (Replica(founding=...)); a replica added to a serving group must not."""
    after = create(grid_state(3, 1), "users", logical=8, rf=3, physical=2)
    assert {a.founding for n in after.nodes for a in after.assignment(n)} == {True}
    owned = mark_owned(after, 1)
    for n in owned.nodes:
        assert {a.shard: a.founding for a in owned.assignment(n)} == {1: False, 2: True}

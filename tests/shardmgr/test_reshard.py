"""Resharding in the shard manager's state (shardmgr/reshard.py): each
function's contract on concrete states, and whole reshards simulated against
pure groups (the real apply function, tests/move_support.Group) with workers
that die, leases that expire, late and duplicated reports, client writes
routed as a client routes them, and aborts at any point.

The invariants are written out from the module docstrings (shardmgr/reshard.py,
shardmgr/moves.py, raftkv/statemachine/moves.py, DESIGN section 7), not taken
from the implementation. Known bugs are ``xfail(strict=True)`` tests that say
what goes wrong.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace
from typing import Any

import cbor2
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from raftkv.sharding import logical_shard
from raftkv.statemachine import layout
from raftkv.statemachine.commands import DELETE, PUT, Mutation, Own, Write
from raftkv.statemachine.moves import (
    ABORTED,
    ACTIVE,
    MOVED,
    MoveStep,
    Owner,
    decode_owner,
)
from shardmgr import reshard as rs
from shardmgr.moves import (
    FINAL,
    RESHARD_ABORTED,
    RESHARD_ABORTING,
    RESHARD_DONE,
    RESHARD_ROLLING_BACK,
    RESHARD_RUNNING,
    Action,
    Move,
    MoveError,
    action,
    advance,
    plan,
)
from shardmgr.state import (
    KEYSPACE_ACTIVE,
    ClusterState,
    NodeInfo,
    StateError,
    create_keyspace,
    drop_keyspace,
    mark_owned,
    register_node,
)
from tests.move_support import Group

NAME = "users"
NOW = 1000.0
NODES = [(f"n{d}{i}", f"dc{d}") for d in range(3) for i in range(2)]
DC_OF = dict(NODES)
ALIVE = set(DC_OF)
MANY = 1000  # a per-node limit that never binds

# ---------------------------------------------------------------------------
# building states


def cluster() -> ClusterState:
    """3 data centers x 2 nodes."""
    state = ClusterState()
    for node, dc in NODES:
        state = register_node(state, NodeInfo(node, dc, f"host-{node}", 9000, 7000, 7199))
    return state


def keyspace(physical: int, *, logical: int = 16, rf: int = 3,
             state: ClusterState | None = None) -> ClusterState:
    """Keyspace NAME on ``physical`` groups, every group owned (active)."""
    state = create_keyspace(cluster() if state is None else state, NAME, logical_shards=logical,
                            replication_factor=rf, physical_shards=physical, alive=ALIVE)
    state = own_all(state)
    assert state.keyspaces[NAME].state == KEYSPACE_ACTIVE
    return state


def own_all(state: ClusterState) -> ClusterState:
    for shard_id in sorted(state.shards):
        state = mark_owned(state, shard_id)
    return state


def with_map(state: ClusterState, logical_map: tuple[int, ...]) -> ClusterState:
    ks = state.keyspaces[NAME]
    return replace(state, keyspaces={**state.keyspaces,
                                     NAME: replace(ks, logical_map=logical_map)})


def started(physical: int = 2, target: int = 8, **kw: Any) -> ClusterState:
    """A running reshard whose new groups all serve (the controller's ``own`` applied)."""
    return own_all(rs.start(keyspace(physical, **kw), NAME, target, alive=ALIVE, now=NOW))


def snapshot(state: ClusterState) -> str:
    return json.dumps(state.to_json(), sort_keys=True)


def assert_refused(change: Callable[[ClusterState], object], state: ClusterState,
                   error: type[Exception] = StateError, match: str | None = None) -> None:
    """``change`` raises exactly ``error`` and leaves ``state`` as it was."""
    before = snapshot(state)
    with pytest.raises(error, match=match) as info:
        change(state)
    assert info.type is error, info.value
    assert snapshot(state) == before


def nodes_of(state: ClusterState, move: Move) -> set[str]:
    return {r.node for shard in (move.src, move.dst) for r in state.shards[shard].replicas}


# Group answers a worker gets when every step goes well (manager-only tests).
OK = {"prepare": {"cursor": b"", "seq": 0}, "capture": {"seq": 0}, "copy": {},
      "catchup": {"seq": 0}, "freeze": {"seq": 0}, "ship": {"seq": 0},
      "activate": {"active": True}, "moved": {"moved": True},
      "cleanup": {"deleted": 0, "more": False}, "abort": {"aborted": True},
      "unfreeze": {"active": True}, "purge": {"deleted": 0, "more": False}}
REFUSED = {"err": "MOVE_REFUSED", "msg": "capture needs an ACTIVE record with no move",
           "state": "MOVED", "move": 9}


def report(state: ClusterState, worker: str, move_id: int, *phases: str,
           now: float = NOW, stats: dict[str, Any] | None = None) -> ClusterState:
    return rs.update(state, worker, move_id, [(p, OK[p]) for p in phases], stats or {},
                     now=now)


def drive(state: ClusterState, worker: str, move_id: int, until: str,
          now: float = NOW) -> ClusterState:
    """Report one phase at a time until the move is in phase ``until``."""
    for _ in range(20):
        phase = state.moves[move_id].phase
        if phase == until:
            return state
        state = report(state, worker, move_id, phase, now=now)
    raise AssertionError(f"move {move_id} never reached {until}")


def claim(state: ClusterState, worker: str, now: float = NOW) -> tuple[ClusterState, Move]:
    state, move = rs.claim(state, worker, now=now, per_node_max=MANY)
    assert move is not None
    return state, move


def finish_every_move(state: ClusterState, now: float = NOW) -> ClusterState:
    for i in range(100):
        state, move = rs.claim(state, f"f{i}", now=now, per_node_max=MANY)
        if move is None:
            assert all(m.phase in FINAL or m.stuck for m in state.moves.values())
            return state
        state = drive(state, f"f{i}", move.id, "aborted" if move.phase in (
            "abort", "unfreeze", "purge") else "done", now=now)
    raise AssertionError("moves left")


def mapped_after(logical_map: tuple[int, ...], moves: list[tuple[int, int, int]]) -> list[int]:
    out = list(logical_map)
    for ls, src, dst in moves:
        assert out[ls] == src
        out[ls] = dst
    return out


# ---------------------------------------------------------------------------
# start and preview


def test_a_split_from_two_to_eight_makes_six_groups_on_live_nodes_and_plans_the_moves() -> None:
    before = keyspace(2)
    alive = ALIVE - {"n01"}
    after = rs.start(before, NAME, 8, alive=alive, now=NOW)
    ks = before.keyspaces[NAME]
    assert after.keyspaces == before.keyspaces  # the map changes only as moves publish
    assert after.version == before.version + 1
    new_ids = list(range(before.next_shard_id, before.next_shard_id + 6))
    assert sorted(set(after.shards) - set(before.shards)) == new_ids
    assert after.next_shard_id == before.next_shard_id + 6
    assert {i: after.shards[i] for i in before.shards} == dict(before.shards)
    for shard_id in new_ids:
        shard = after.shards[shard_id]
        members = [r.node for r in shard.replicas]
        assert shard.keyspace == NAME and not shard.owned
        assert shard.created_version == after.version
        assert len(set(members)) == 3 and set(members) <= alive
        assert {DC_OF[n] for n in members} == {"dc0", "dc1", "dc2"}
    ports = Counter((r.node, r.raft_port) for s in after.shards.values() for r in s.replicas)
    assert max(ports.values()) == 1
    targets = [1, 2, *new_ids]
    job = after.reshards[NAME]
    assert (job.id, job.keyspace, job.target, job.before, job.targets, job.state,
            job.started_at, job.finished_at) == (1, NAME, 8, (1, 2), tuple(targets),
                                                 RESHARD_RUNNING, NOW, None)
    planned = plan(list(ks.logical_map), targets)
    assert job.moves_total == len(planned) == 12
    moves = [after.moves[i] for i in sorted(after.moves)]
    assert [m.id for m in moves] == list(range(before.next_move_id, before.next_move_id + 12))
    assert after.next_move_id == before.next_move_id + 12
    assert [(m.ls, m.src, m.dst) for m in moves] == planned
    for m in moves:
        assert (m.keyspace, m.ks_id, m.total, m.reshard) == (NAME, ks.id, 16, job.id)
        assert (m.phase, m.worker, m.lease_until, m.started, m.stuck) == (
            "prepare", None, 0.0, False, None)
    assert Counter(mapped_after(ks.logical_map, planned)) == dict.fromkeys(targets, 2)
    # The client map lists the new groups already: a client follows hints there.
    assert set(after.client_map()["shards"]) == {str(t) for t in targets}
    assert rs.running(after, NAME) == job
    assert rs.running(before, NAME) is None


def unbalanced_eight() -> ClusterState:
    """Eight groups where 7 and 8 hold four logical shards, 1 three, 2..6 one."""
    return with_map(keyspace(8), (1, 1, 1, 2, 3, 4, 5, 6, 7, 7, 7, 7, 8, 8, 8, 8))


def test_a_merge_from_eight_to_three_makes_no_group_and_keeps_the_fullest() -> None:
    before = unbalanced_eight()
    after = rs.start(before, NAME, 3, alive=set(), now=NOW)  # a merge needs no live node
    assert after.shards == before.shards and after.next_shard_id == before.next_shard_id
    job = after.reshards[NAME]
    assert job.before == tuple(range(1, 9)) and job.targets == (1, 7, 8)
    logical_map = before.keyspaces[NAME].logical_map
    planned = plan(list(logical_map), [1, 7, 8])
    moves = [after.moves[i] for i in sorted(after.moves)]
    assert [(m.ls, m.src, m.dst) for m in moves] == planned
    assert {m.src for m in moves} == {2, 3, 4, 5, 6}  # the kept groups keep what they hold
    assert sorted(Counter(mapped_after(logical_map, planned)).values()) == [5, 5, 6]
    # Ties go to the lower shard id.
    even = keyspace(8)
    assert rs.start(even, NAME, 3, alive=ALIVE, now=NOW).reshards[NAME].targets == (1, 2, 3)


def test_the_same_request_again_changes_nothing_and_another_target_is_refused() -> None:
    running = rs.start(keyspace(2), NAME, 8, alive=ALIVE, now=NOW)
    assert rs.start(running, NAME, 8, alive=ALIVE, now=NOW + 5) is running
    assert_refused(lambda s: rs.start(s, NAME, 4, alive=ALIVE, now=NOW), running,
                   match="already being resharded")
    aborting = rs.abort(running, NAME)
    assert_refused(lambda s: rs.start(s, NAME, 8, alive=ALIVE, now=NOW), aborting,
                   match="already being resharded")


@pytest.mark.parametrize("count", [0, -1, 17, 4097])
def test_start_and_preview_refuse_a_count_out_of_range(count: int) -> None:
    state = keyspace(2)
    assert_refused(lambda s: rs.start(s, NAME, count, alive=ALIVE, now=NOW), state,
                   match="physical shards must be from 1")
    assert_refused(lambda s: rs.preview(s, NAME, count), state,
                   match="physical shards must be from 1")


def test_start_refuses_unknown_and_inactive_keyspaces_and_too_few_live_nodes() -> None:
    state = keyspace(2)
    assert_refused(lambda s: rs.start(s, "nope", 4, alive=ALIVE, now=NOW), state,
                   match="no keyspace 'nope'")
    assert_refused(lambda s: rs.preview(s, "nope", 4), state, match="no keyspace")
    creating = create_keyspace(cluster(), NAME, logical_shards=16, replication_factor=3,
                               physical_shards=2, alive=ALIVE)
    assert_refused(lambda s: rs.start(s, NAME, 4, alive=ALIVE, now=NOW), creating,
                   match="is creating, not active")
    dropping = drop_keyspace(state, NAME)
    assert_refused(lambda s: rs.start(s, NAME, 4, alive=ALIVE, now=NOW), dropping,
                   match="is dropping, not active")
    assert_refused(lambda s: rs.start(s, NAME, 4, alive={"n00", "n10", "gone"}, now=NOW),
                   state, match="3 live nodes; 2 are live")
    # A reshard to the present count of a balanced map moves nothing and ends at once.
    same = rs.start(state, NAME, 2, alive=ALIVE, now=NOW)
    assert same.reshards[NAME].moves_total == 0 and same.moves == {}
    assert rs.tick(same, now=NOW).reshards[NAME].state == RESHARD_DONE


def test_a_running_reshard_blocks_dropping_the_keyspace() -> None:
    state = started()
    assert_refused(lambda s: drop_keyspace(s, NAME), state, match="being resharded")


def test_preview_of_a_merge_says_what_start_does_and_changes_nothing() -> None:
    state = unbalanced_eight()
    before = snapshot(state)
    shown = rs.preview(state, NAME, 3)
    assert snapshot(state) == before
    moves = rs.start(state, NAME, 3, alive=ALIVE, now=NOW).moves
    assert shown == {"keyspace": NAME, "from": list(range(1, 9)), "to": 3, "new_shards": 0,
                     "removed": [2, 3, 4, 5, 6],
                     "moves": [[m.ls, m.src, m.dst] for _, m in sorted(moves.items())]}
    assert json.loads(json.dumps(shown)) == shown


def test_preview_of_a_split_names_the_groups_start_makes() -> None:
    """(Once named the new groups so that ties between them went the other way.)"""
    state = keyspace(2)
    shown = rs.preview(state, NAME, 8)
    assert shown["new_shards"] == 6 and shown["removed"] == []
    after = rs.start(state, NAME, 8, alive=ALIVE, now=NOW)
    new_ids = sorted(set(after.shards) - set(state.shards))
    label = {shard: f"+{i}" for i, shard in enumerate(new_ids, 1)}
    assert shown["moves"] == [[m.ls, m.src, label.get(m.dst, m.dst)]
                              for _, m in sorted(after.moves.items())]


# ---------------------------------------------------------------------------
# claim


def test_claim_leases_the_first_move_and_gives_a_worker_back_the_move_it_holds() -> None:
    state = started()
    state, first = claim(state, "w1")
    assert first.id == min(state.moves) and state.moves[first.id] == first
    assert (first.worker, first.lease_until, first.started) == ("w1", NOW + rs.LEASE_S, True)
    renewed, again = claim(state, "w1", now=NOW + 3)
    assert again.id == first.id
    assert renewed.moves[first.id] == replace(first, lease_until=NOW + 3 + rs.LEASE_S)
    assert renewed.version == state.version + 1
    state, second = claim(renewed, "w2", now=NOW + 3)
    assert second.id == first.id + 1
    # Once the leases passed, the moves are anyone's: started ones first, by id.
    later = NOW + 3 + rs.LEASE_S
    state, taken = claim(state, "w3", now=later)
    assert taken.id == first.id and taken.worker == "w3"
    state, taken = claim(state, "w4", now=later)
    assert taken.id == second.id


def test_a_worker_asking_again_is_told_its_renewed_lease() -> None:
    """(Once returned the move from the state before the renewal.)"""
    state, first = claim(started(), "w1")
    renewed, again = claim(state, "w1", now=NOW + 3)
    assert again == renewed.moves[first.id]


def test_moves_into_groups_that_do_not_serve_yet_are_not_handed_out() -> None:
    state = rs.start(keyspace(2), NAME, 8, alive=ALIVE, now=NOW)  # no own applied yet
    same, none = rs.claim(state, "w", now=NOW)
    assert same is state and none is None
    state = mark_owned(state, 5)
    into_five = sorted(i for i, m in state.moves.items() if m.dst == 5)
    for worker in ("a", "b"):
        state, move = claim(state, worker)
        assert move.dst == 5 and move.id == into_five.pop(0)
    assert rs.claim(state, "c", now=NOW, per_node_max=MANY)[1] is None


def test_a_started_move_whose_lease_passed_goes_before_unstarted_ones() -> None:
    state = mark_owned(rs.start(keyspace(2), NAME, 8, alive=ALIVE, now=NOW), 8)
    state, dead = claim(state, "dead")  # then the worker dies
    assert dead.id > min(state.moves)
    state = own_all(state)
    state, move = claim(state, "w", now=NOW + rs.LEASE_S)
    assert move.id == dead.id and move.worker == "w"
    assert move.lease_until == NOW + 2 * rs.LEASE_S
    state, move = claim(state, "v", now=NOW + rs.LEASE_S)
    assert move.id == min(state.moves) != dead.id


@settings(max_examples=40, deadline=None)
@given(physical=st.integers(1, 8), target=st.integers(1, 16), rf=st.integers(1, 3),
       per_node_max=st.integers(1, 4), workers=st.integers(1, 16))
def test_claims_respect_the_per_node_limit_and_stop_only_at_it(
        physical: int, target: int, rf: int, per_node_max: int, workers: int) -> None:
    """Leased moves touching any node (a replica of the source or the
    destination) stay within the limit; a claim that finds nothing found
    every free move touching a node at the limit."""
    state = started(physical, target, rf=rf)
    refused = False
    for w in range(workers):
        state, move = rs.claim(state, f"w{w}", now=NOW, per_node_max=per_node_max)
        if move is None:
            refused = True
            break
        assert move.worker == f"w{w}" and move.started
    leased = [m for m in state.moves.values() if m.worker is not None]
    assert len({m.id for m in leased}) == len(leased) == len({m.worker for m in leased})
    load = Counter(n for m in leased for n in nodes_of(state, m))
    assert max(load.values(), default=0) <= per_node_max
    free = [m for m in state.moves.values() if m.worker is None]
    if refused:
        for m in free:
            assert any(load[n] >= per_node_max for n in nodes_of(state, m)), m
    else:
        assert len(leased) == min(workers, len(state.moves))


# ---------------------------------------------------------------------------
# update


def claimed() -> tuple[ClusterState, Move]:
    state, move = claim(started(), "w")
    return state, move


def updating(worker: str, move_id: int, steps: list[tuple[str, Any]], stats: dict[str, Any],
             now: float) -> Callable[[ClusterState], ClusterState]:
    return lambda s: rs.update(s, worker, move_id, steps, stats, now=now)


def test_update_is_a_compare_and_set_by_the_lease_holder() -> None:
    state, move = claimed()
    prepare: list[tuple[str, Any]] = [("prepare", OK["prepare"])]
    lost: list[tuple[str, int, list[tuple[str, Any]], float]] = [
        ("other", move.id, prepare, NOW + 1),                      # not the holder
        ("w", move.id, prepare, NOW + rs.LEASE_S),                 # the lease has passed
        ("w", 999, prepare, NOW + 1),                              # no such move
        ("w", move.id, [("capture", OK["capture"])], NOW + 1)]     # not its phase
    for worker, move_id, steps, now in lost:
        assert_refused(updating(worker, move_id, steps, {}, now), state, rs.MoveLost)
    # Malformed reports change nothing either.
    malformed: list[tuple[list[tuple[str, Any]], dict[str, Any], str]] = [
        ([("prepare", OK["prepare"]), ("copy", {})], {}, "step for phase copy after capture"),
        ([("prepare", ["not", "a", "map"])], {}, "must be a map"),
        (prepare, {"keys": -1}, "'keys' must be a count"),
        (prepare, {"bytes": True}, "'bytes' must be a count"),
        (prepare, {"records": 1.5}, "'records' must be a count"),
        (prepare, {"unavailable_ms": "1"}, "must be a duration"),
        (prepare, {"unavailable_ms": -2}, "must be a duration")]
    for steps, stats, match in malformed:
        assert_refused(updating("w", move.id, steps, stats, NOW), state, StateError, match)


def test_update_advances_the_move_and_renews_the_lease() -> None:
    state, move = claimed()
    after = report(state, "w", move.id, "prepare", now=NOW + 4)
    assert after.version == state.version + 1
    assert after.moves[move.id] == replace(move, phase="capture", lease_until=NOW + 4 + rs.LEASE_S)
    assert {i: m for i, m in after.moves.items() if i != move.id} == {
        i: m for i, m in state.moves.items() if i != move.id}
    renewed = rs.update(after, "w", move.id, [], {}, now=NOW + 9)  # no steps: a renewal
    assert renewed.moves[move.id] == replace(after.moves[move.id], lease_until=NOW + 9 + rs.LEASE_S)
    # Several phases in one report, in order; stale answers keep the phase.
    later = rs.update(renewed, "w", move.id, [
        ("capture", {"seq": 0}), ("copy", {}), ("catchup", {"seq": 3}), ("freeze", {"seq": 7}),
        ("ship", {"seq": 5, "stale": True}), ("ship", {"seq": 7})], {}, now=NOW + 10)
    assert later.moves[move.id].phase == "activate" and later.moves[move.id].final_seq == 7
    assert later.keyspaces == state.keyspaces


def test_reporting_moved_publishes_the_map_in_the_same_change_then_cleanup_ends_the_move() -> None:
    state, move = claimed()
    state = drive(state, "w", move.id, "moved")
    logical_map = state.keyspaces[NAME].logical_map
    assert logical_map[move.ls] == move.src  # activated, not yet published
    after = report(state, "w", move.id, "moved", now=NOW + 1)
    assert after.version == state.version + 1
    published = list(logical_map)
    published[move.ls] = move.dst
    assert after.keyspaces[NAME].logical_map == tuple(published)
    assert after.client_map()["keyspaces"][NAME]["map"] == published
    assert after.client_map()["version"] == after.version
    assert after.moves[move.id].phase == "cleanup" and after.moves[move.id].worker == "w"
    more = rs.update(after, "w", move.id, [("cleanup", {"deleted": 2000, "more": True})], {},
                     now=NOW + 2)
    assert more.moves[move.id].phase == "cleanup"
    done = report(more, "w", move.id, "cleanup", now=NOW + 3)
    assert done.moves[move.id] == replace(more.moves[move.id], phase="done", worker=None,
                                          lease_until=0.0)
    assert_refused(lambda s: report(s, "w", move.id, "cleanup", now=NOW + 3), done, rs.MoveLost)
    _, other = rs.claim(done, "x", now=NOW + 3, per_node_max=MANY)
    assert other is not None and other.id != move.id
    # moved and cleanup in one report: the map changes in the middle of it.
    both = report(state, "w", move.id, "moved", "cleanup", now=NOW + 1)
    assert both.keyspaces[NAME].logical_map == tuple(published)
    assert both.moves[move.id].phase == "done"


def test_figures_add_up_over_reports_and_the_cutover_time_is_the_last_reported() -> None:
    state, move = claimed()
    state = report(state, "w", move.id, "prepare", stats={"bytes": 10, "records": 1})
    state = rs.update(state, "w", move.id, [], {"keys": 3, "bytes": 5, "unavailable_ms": 2},
                      now=NOW)
    state = report(state, "w", move.id, "capture", stats={"records": 2, "unavailable_ms": 1.5})
    m = state.moves[move.id]
    assert (m.copied_keys, m.copied_bytes, m.shipped, m.unavailable_ms) == (3, 15, 3, 1.5)


def test_keys_reported_while_copying_survive_the_copy_step() -> None:
    """Keys reported with lease renewals during the copy, then with the copy
    step, are all counted, once. (advance() once replaced the count with the
    copy result's ``keys``.)"""
    state, move = claimed()
    state = drive(state, "w", move.id, "copy")
    state = rs.update(state, "w", move.id, [], {"keys": 100}, now=NOW)
    state = rs.update(state, "w", move.id, [("copy", {"copied": 150})], {"keys": 150}, now=NOW)
    assert state.moves[move.id].copied_keys == 250


def test_a_result_that_fits_no_phase_leaves_the_move_stuck_until_an_abort() -> None:
    state, move = claimed()
    state = report(state, "w", move.id, "prepare")
    stuck = rs.update(state, "w", move.id, [("capture", REFUSED), ("copy", {})],
                      {"records": 1}, now=NOW + 1)
    m = stuck.moves[move.id]
    assert m.phase == "capture" and m.stuck is not None and "capture" in m.stuck
    assert (m.worker, m.lease_until, m.shipped) == (None, 0.0, 1)
    assert_refused(lambda s: report(s, "w", move.id, "capture"), stuck, rs.MoveLost)
    handed: set[int] = set()
    s = stuck
    for i in range(30):
        s, got = rs.claim(s, f"x{i}", now=NOW + 2 + rs.LEASE_S, per_node_max=MANY)
        if got is None:
            break
        handed.add(got.id)
    assert handed == set(stuck.moves) - {move.id}
    shown = rs.progress(stuck, NAME)
    assert shown is not None and shown["stuck"] == [
        {"move": move.id, "ls": move.ls, "phase": "capture", "error": m.stuck}]
    # Everything else finishes; the reshard does not.
    s = finish_every_move(stuck, now=NOW + 2)
    assert rs.tick(s, now=NOW + 3) is s
    # An abort turns the stuck move back, and a worker may take it again.
    aborted = rs.abort(s, NAME)
    turned = aborted.moves[move.id]
    assert (turned.phase, turned.stuck, turned.worker) == ("abort", None, None)
    assert claim(aborted, "y", now=NOW + 3)[1].id == move.id


def test_an_abort_releases_a_move_stuck_after_its_activation() -> None:
    """Else the reshard could never end, and the keyspace could be neither
    resharded nor dropped. (abort() once un-stuck only the moves it turned back.)"""
    state, move = claimed()
    state = drive(state, "w", move.id, "cleanup")
    state = rs.update(state, "w", move.id, [("cleanup", REFUSED)], {}, now=NOW)
    assert state.moves[move.id].stuck is not None
    aborted = rs.abort(state, NAME)
    assert aborted.moves[move.id].stuck is None
    assert claim(aborted, "y")[1].id == move.id


# ---------------------------------------------------------------------------
# abort


def test_abort_ends_unstarted_moves_and_turns_back_those_not_yet_activated() -> None:
    state = started()
    ids = sorted(state.moves)
    state, held = claim(state, "w1")                        # prepare, in a worker's hands
    state, at_activate = claim(state, "w2")
    state = drive(state, "w2", at_activate.id, "activate")  # the abort step decides
    state, activated = claim(state, "w3")
    state = drive(state, "w3", activated.id, "moved")       # too late to turn back
    state, finished = claim(state, "w4")
    state = drive(state, "w4", finished.id, "done")
    after = rs.abort(state, NAME)
    assert after.version == state.version + 1
    assert after.reshards[NAME] == replace(state.reshards[NAME], state=RESHARD_ABORTING)
    assert after.keyspaces == state.keyspaces
    for move_id in ids[4:]:
        assert after.moves[move_id] == replace(state.moves[move_id], phase="aborted",
                                               error="aborted before it started")
    for move_id in (held.id, at_activate.id):
        assert after.moves[move_id] == replace(state.moves[move_id], phase="abort",
                                               error="aborted on request", worker=None,
                                               lease_until=0.0)
    for move_id in (activated.id, finished.id):
        assert after.moves[move_id] == state.moves[move_id]
    assert rs.abort(after, NAME) is after
    assert_refused(lambda s: report(s, "w1", held.id, "prepare"), after, rs.MoveLost)
    assert_refused(lambda s: report(s, "w2", at_activate.id, "activate"), after, rs.MoveLost)
    # The activated move goes on, and its holder still holds it.
    assert drive(after, "w3", activated.id, "done").moves[activated.id].phase == "done"
    assert_refused(lambda s: rs.abort(s, "nope"), after, match="no reshard running")
    assert_refused(lambda s: rs.abort(s, NAME), keyspace(2), match="no reshard running")


# ---------------------------------------------------------------------------
# tick


def test_tick_finishes_a_split_once_every_move_is_done() -> None:
    state = started()
    assert rs.tick(state, now=NOW) is state
    state = finish_every_move(state)
    done = rs.tick(state, now=NOW + 7)
    job = done.reshards[NAME]
    assert (job.state, job.finished_at) == (RESHARD_DONE, NOW + 7)
    assert job.summary == {"keys": 0, "bytes": 0, "records": 0, "moved": 12, "aborted": 0,
                           "unavailable_ms": [], "removed_shards": []}
    assert done.moves == {} and done.shards == state.shards
    assert Counter(done.keyspaces[NAME].logical_map) == dict.fromkeys(range(1, 9), 2)
    assert rs.tick(done, now=NOW + 8) is done and rs.running(done, NAME) is None
    again = rs.start(done, NAME, 4, alive=ALIVE, now=NOW + 9)
    assert again.reshards[NAME].id == 2 and min(again.moves) == state.next_move_id


def test_tick_finishes_a_merge_and_removes_the_groups_left_empty() -> None:
    state = finish_every_move(own_all(rs.start(unbalanced_eight(), NAME, 3, alive=ALIVE,
                                               now=NOW)))
    done = rs.tick(state, now=NOW + 1)
    assert done.reshards[NAME].state == RESHARD_DONE
    assert done.reshards[NAME].summary["removed_shards"] == [2, 3, 4, 5, 6]
    assert set(done.shards) == {1, 7, 8} == set(done.keyspaces[NAME].shard_ids)
    assert {i: done.shards[i] for i in done.shards} == {i: state.shards[i] for i in (1, 7, 8)}
    assert all(a.shard in (1, 7, 8) for n in ALIVE for a in done.assignment(n))


def test_an_abort_moves_back_what_had_moved_and_ends_on_the_old_layout() -> None:
    base = keyspace(2)
    original = base.keyspaces[NAME].logical_map
    state = own_all(rs.start(base, NAME, 8, alive=ALIVE, now=NOW))
    forward = dict(state.moves)
    done_ids = []
    for worker in ("a", "b"):
        state, move = claim(state, worker)
        state = drive(state, worker, move.id, "done")
        done_ids.append(move.id)
    state, turning = claim(state, "c")
    state = drive(state, "c", turning.id, "copy")
    state = rs.abort(state, NAME)
    assert rs.tick(state, now=NOW) is state  # a move still turns back
    state, again = claim(state, "d")
    assert again.id == turning.id and again.phase == "abort"
    state = drive(state, "d", turning.id, "aborted")
    rolling = rs.tick(state, now=NOW + 1)
    job = rolling.reshards[NAME]
    assert job.state == RESHARD_ROLLING_BACK
    assert job.summary["moved"] == 2 and job.summary["aborted"] == 10
    back = [rolling.moves[i] for i in sorted(rolling.moves)]
    assert [(m.ls, m.src, m.dst) for m in back] == [
        (forward[i].ls, forward[i].dst, forward[i].src) for i in done_ids]
    assert all(m.id >= state.next_move_id and m.phase == "prepare" and not m.started
               and m.reshard == job.id for m in back)
    assert rolling.next_move_id == state.next_move_id + 2
    assert rs.abort(rolling, NAME) is rolling
    assert_refused(lambda s: rs.start(s, NAME, 8, alive=ALIVE, now=NOW), rolling)
    assert rs.tick(rolling, now=NOW + 2) is rolling
    end = rs.tick(finish_every_move(rolling), now=NOW + 3)
    job = end.reshards[NAME]
    assert job.state == RESHARD_ABORTED and job.finished_at == NOW + 3
    assert end.keyspaces[NAME].logical_map == original
    assert set(end.shards) == {1, 2} and job.summary["removed_shards"] == [3, 4, 5, 6, 7, 8]
    assert job.summary["moved"] == 4 and job.summary["aborted"] == 10
    assert end.moves == {}


def test_an_abort_before_anything_moved_ends_at_once_without_the_new_groups() -> None:
    base = keyspace(2)
    state = rs.abort(rs.start(base, NAME, 8, alive=ALIVE, now=NOW), NAME)
    end = rs.tick(state, now=NOW + 1)
    assert end.reshards[NAME].state == RESHARD_ABORTED
    assert end.shards == base.shards and end.keyspaces == base.keyspaces and end.moves == {}
    assert end.reshards[NAME].summary["aborted"] == 12


# ---------------------------------------------------------------------------
# progress and the codec


def test_progress_reports_phases_figures_and_cutover_percentiles() -> None:
    assert rs.progress(keyspace(2), NAME) is None
    state = started()
    state, a = claim(state, "a")
    state = report(state, "a", a.id, "prepare", "capture", "copy",
                   stats={"keys": 5, "bytes": 50})
    state, b = claim(state, "b")
    state = drive(state, "b", b.id, "moved")
    state = report(state, "b", b.id, "moved", stats={"records": 2, "unavailable_ms": 4.25})
    shown = rs.progress(state, NAME)
    assert shown is not None
    job = state.reshards[NAME]
    assert shown == {**job.to_json(), "summary": None, "moves_done": 0, "moves_aborted": 0,
                     "keys": 5, "bytes": 50, "records": 2,
                     "phases": {"catchup": 1, "cleanup": 1, "prepare": 10}, "stuck": [],
                     "unavailable_ms": {"p50": 4.25, "p99": 4.25, "max": 4.25, "count": 1},
                     "removed_shards": [],
                     "leases": [{"move": a.id, "worker": "a", "phase": "catchup"},
                                {"move": b.id, "worker": "b", "phase": "cleanup"}]}
    assert json.loads(json.dumps(shown)) == shown
    done = rs.tick(finish_every_move(state, now=NOW + rs.LEASE_S), now=NOW + 11)
    shown = rs.progress(done, NAME)
    assert shown is not None
    assert (shown["state"], shown["moves_done"], shown["phases"]) == (RESHARD_DONE, 12, {})
    assert shown["keys"] == 5 and shown["unavailable_ms"]["count"] == 1


def test_percentiles() -> None:
    assert rs.percentiles([]) == {"p50": None, "p99": None, "max": None, "count": 0}
    assert rs.percentiles([4, 1, 3, 2]) == {"p50": 2.5, "p99": 4, "max": 4, "count": 4}
    values = [float(v) for v in range(1, 201)]
    assert rs.percentiles(values) == {"p50": 100.5, "p99": 199.0, "max": 200.0, "count": 200}


def busy_state() -> ClusterState:
    """A second keyspace done resharding, NAME mid-way: leases, a stuck move, figures."""
    state = keyspace(2)
    state = create_keyspace(state, "other", logical_shards=4, replication_factor=1,
                            physical_shards=1, alive=ALIVE)
    state = own_all(rs.start(own_all(state), "other", 2, alive=ALIVE, now=NOW))
    state = rs.tick(finish_every_move(state), now=NOW)
    assert state.reshards["other"].state == RESHARD_DONE
    state = own_all(rs.start(state, NAME, 5, alive=ALIVE, now=NOW))
    state, a = claim(state, "a")
    state = report(state, "a", a.id, "prepare", "capture", "copy",
                   stats={"keys": 3, "bytes": 30, "unavailable_ms": 0.5})
    state, b = claim(state, "b")
    return rs.update(state, "b", b.id, [("prepare", REFUSED)], {}, now=NOW)


def test_the_state_round_trips_through_json_and_cbor_with_moves_and_reshards() -> None:
    state = busy_state()
    assert state.moves and len(state.reshards) == 2
    assert any(m.stuck for m in state.moves.values())
    data = json.loads(json.dumps(state.to_json()))
    assert ClusterState.from_json(data) == state
    assert ClusterState.from_json(cbor2.loads(cbor2.dumps(state.to_json()))) == state
    assert ClusterState.from_json(data).to_json() == state.to_json()


def test_a_state_saved_before_resharding_existed_still_loads() -> None:
    state = keyspace(2)
    data = json.loads(json.dumps(state.to_json()))
    for name in ("moves", "reshards", "next_move_id"):
        del data[name]
    loaded = ClusterState.from_json(data)
    assert loaded == state
    assert (loaded.moves, loaded.reshards, loaded.next_move_id) == ({}, {}, 1)
    assert rs.start(loaded, NAME, 4, alive=ALIVE, now=NOW).reshards[NAME].moves_total == 8


# ---------------------------------------------------------------------------
# the simulation: pure groups, workers, clients, the controller


KEYS = [b"key-%d" % i for i in range(24)]


def key_in(ls: int, logical: int) -> bytes:
    return next(k for k in (b"k%d" % i for i in range(10_000))
                if logical_shard(NAME, k, logical) == ls)


SHIP_ROUNDS_MAX = 20
HOPS_MAX = 6


@dataclass(frozen=True)
class Params:
    logical: int = 16
    physical: int = 2
    target: int = 8
    rf: int = 3
    per_node_max: int = 4
    workers_max: int = 3
    batch_max: int = 3
    page_max: int = 3
    death_rate: float = 0.0
    jump_rate: float = 0.0
    chaos_steps: int = 0
    abort_at: int | None = None
    fenced: bool = True
    """Workers renew their lease before each step in a group (so none of their
    steps lands after they lost the move); else only when they report, as
    shardmgr/worker.py does through the cutover: steps of a move that was
    aborted or taken over meanwhile still land in the groups."""


@dataclass
class Report:
    worker: str
    move_id: int
    steps: list[tuple[str, Any]]
    stats: dict[str, Any]


@dataclass
class Client:
    cid: bytes
    seq: int = 0
    logical_map: tuple[int, ...] = ()
    pending: tuple[Write, bytes, bytes | None] | None = None  # write, key, value


class Sim:
    """One keyspace resharded against pure groups. ``step`` does one random
    thing; ``check`` asserts the invariants that hold between any two steps."""

    def __init__(self, rng: random.Random, params: Params) -> None:
        self.rng = rng
        self.p = params
        self.now = NOW
        self.state = create_keyspace(cluster(), NAME, logical_shards=params.logical,
                                     replication_factor=params.rf,
                                     physical_shards=params.physical, alive=ALIVE)
        self.ks_id = self.state.keyspaces[NAME].id
        self.groups: dict[int, Group] = {}
        while self.own_new_groups():
            pass
        self.before = self.state
        self.model: dict[bytes, bytes | None] = {}
        self.clients = [Client(bytes([c]) * 16) for c in (1, 2, 3)]
        self.acked: list[tuple[Write, dict[str, Any]]] = []
        self.workers: dict[str, Iterator[None]] = {}
        self.worker_count = 0
        self.unsent: dict[str, Report] = {}
        self.late: list[tuple[Report, float]] = []
        self.reported: Counter[str] = Counter()
        self.unavailable: dict[int, float] = {}
        self.steps = 0
        self.aborted_at: int | None = None
        self.seen: Counter[str] = Counter()  # what happened, for hypothesis.event
        self.ls_cache: dict[bytes, int] = {}

    # -- groups ------------------------------------------------------------------

    def own_new_groups(self) -> bool:
        """The controller: the first group not serving yet applies its ``own``."""
        for shard in sorted(self.state.shards.values(), key=lambda s: s.id):
            if shard.owned:
                continue
            ks = self.state.keyspaces[shard.keyspace]
            group = self.groups.setdefault(shard.id, Group())
            group.run(Own(ks.id, ks.name, ks.logical_shards, ks.logical_shards_of(shard.id)))
            self.state = mark_owned(self.state, shard.id)
            return True
        return False

    def owner(self, shard: int, ls: int) -> Owner | None:
        return decode_owner(self.groups[shard].state.get(layout.owner_key(self.ks_id, ls)))

    def run_step(self, shard: int, move: Move, step: str, data: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.groups[shard].run(
            MoveStep(step, move.ks_id, move.ls, move.id, data))[0]
        return result

    def do_step(self, move: Move) -> dict[str, Any]:
        """A phase's action done at once (for the scripted tests)."""
        gen = self.do(move, action(move), Counter(), worker=None)
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            result: dict[str, Any] = stop.value
            return result

    def shard_items(self, shard: int, ls: int, after: bytes,
                    limit: int) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` of the logical shard's keys (data, then dedup
        records) after ``after``: a page of the worker's bulk copy."""
        out: list[tuple[bytes, bytes]] = []
        for start, stop in layout.shard_ranges(self.ks_id, ls):
            out += self.groups[shard].state.scan(max(start, after + b"\x00"), stop, limit)
        return out[:limit]

    # -- workers -----------------------------------------------------------------

    def renew(self, worker: str | None, move_id: int) -> bool:
        """Before a step in a group, the worker may make sure it still holds the
        move (a report with no steps); False if it does not."""
        if worker is None:
            return True
        if not self.p.fenced:
            return True  # in flight: the worker finds out when it reports
        try:
            self.state = rs.update(self.state, worker, move_id, [], {}, now=self.now)
        except rs.MoveLost:
            self.seen["lost on renewal"] += 1
            return False
        return True

    def do(self, move: Move, act: Action, stats: Counter[str],
           worker: str | None) -> Generator[None, None, dict[str, Any] | None]:
        """Carry out one phase's action; None if the worker lost the move."""
        if act.kind == "step":
            assert act.shard is not None and act.step is not None
            yield
            if not self.renew(worker, move.id):
                return None
            return self.run_step(act.shard, move, act.step, act.data)
        if act.kind == "copy":
            owner = self.owner(move.dst, move.ls)
            cursor = owner.cursor if owner is not None else b""
            while True:
                yield
                page = self.shard_items(move.src, move.ls, cursor,
                                        self.rng.randint(1, self.p.page_max))
                if not page:
                    return {}
                yield
                if not self.renew(worker, move.id):
                    return None
                got = self.run_step(move.dst, move, "ingest", {
                    "cursor": cursor, "next": page[-1][0], "kvs": [list(p) for p in page]})
                if got.get("active"):
                    self.seen["told active"] += 1
                    return {"copied": 0}  # a predecessor went through the cutover
                if "err" in got:
                    return got
                if not got.get("stale"):
                    stats["keys"] += len(page)
                    stats["bytes"] += sum(len(k) + len(v) for k, v in page)
                cursor = got["cursor"]
        assert act.kind == "ship", act
        upto = act.data.get("upto")
        owner = self.owner(move.dst, move.ls)
        applied = owner.seq if owner is not None and owner.move == move.id else 0
        for _ in range(SHIP_ROUNDS_MAX):
            if upto is not None and applied >= upto:
                break
            yield
            records = []
            for seq in range(applied + 1, applied + 1 + self.rng.randint(1, 3)):
                raw = self.groups[move.src].state.get(layout.changelog_key(move.id, seq))
                if raw is None or (upto is not None and seq > upto):
                    break
                records.append(cbor2.loads(raw))
            if not records:
                break
            yield
            if not self.renew(worker, move.id):
                return None
            got = self.run_step(move.dst, move, "delta", {"from": applied + 1,
                                                          "records": records})
            if got.get("active"):
                self.seen["told active"] += 1
                return {"active": True}  # a predecessor activated the copy already
            if "err" in got:
                return got
            if not got.get("stale"):
                stats["records"] += len(records)
            applied = got["seq"]
        if upto is not None and applied < upto:
            return {"seq": applied, "stale": True}  # ship again
        return {"seq": applied}

    def worker(self, name: str) -> Iterator[None]:
        while True:
            yield
            before = self.state
            self.state, move = rs.claim(self.state, name, now=self.now,
                                        per_node_max=self.p.per_node_max)
            if move is not None:
                assert move.worker == name and move.phase not in FINAL
                assert move == self.state.moves[move.id]  # with the lease it has now
                was = before.moves[move.id]  # free, expired, or this worker's already
                assert was.worker in (None, name) or was.lease_until <= self.now, was
                if before.reshards[NAME].state == RESHARD_ABORTING:
                    assert was.started, was  # an abort starts nothing new
                yield from self.carry_out(name, move)

    def carry_out(self, name: str, move: Move) -> Iterator[None]:
        """Do one or more phases of ``move``, then report them in one update."""
        steps: list[tuple[str, Any]] = []
        stats: Counter[str] = Counter()
        local = move
        frozen_at: float | None = None
        unavailable_ms: float | None = None
        for _ in range(self.rng.randint(1, self.p.batch_max)):
            act = action(local)
            if act.kind in ("publish", "none"):
                break  # the manager publishes
            result = yield from self.do(local, act, stats, name)
            if result is None:
                return  # MoveLost on a renewal: drop the move
            steps.append((local.phase, result))
            if local.phase == "freeze":
                frozen_at = self.now
            if local.phase == "moved" and frozen_at is not None:
                unavailable_ms = round((self.now - frozen_at) * 1000, 3)
            try:
                after = advance(local, result)
            except MoveError:
                self.seen["step refused (a lost move)"] += 1
                break  # reported: refused (lost), or the manager marks it stuck
            if after.phase == local.phase:
                break  # another chunk or round: report, then the next claim gives it back
            local = after
        figures: dict[str, Any] = dict(stats)
        if unavailable_ms is not None:
            figures["unavailable_ms"] = unavailable_ms
        self.unsent[name] = Report(name, move.id, steps, figures)
        yield  # dying here leaves the report unsent
        self.send(self.unsent.pop(name))

    def send(self, sent: Report) -> bool:
        before = snapshot(self.state) if self.rng.random() < 0.2 else None
        try:
            self.state = rs.update(self.state, sent.worker, sent.move_id, sent.steps,
                                   sent.stats, now=self.now)
        except rs.MoveLost:
            self.seen["report lost"] += 1
            if before is not None:
                assert snapshot(self.state) == before
            return False
        for name in ("keys", "bytes", "records"):
            self.reported[name] += sent.stats.get(name, 0)
        if "unavailable_ms" in sent.stats:
            self.unavailable[sent.move_id] = sent.stats["unavailable_ms"]
        move = self.state.moves[sent.move_id]
        if sent.steps and move.phase != sent.steps[0][0] and self.rng.random() < 0.2:
            # The same report again (a retry whose answer was lost): refused, harmless.
            self.seen["duplicate report"] += 1
            unchanged = snapshot(self.state)
            with pytest.raises(rs.MoveLost):
                rs.update(self.state, sent.worker, sent.move_id, sent.steps, sent.stats,
                          now=self.now)
            assert snapshot(self.state) == unchanged
        return True

    def kill(self, name: str) -> None:
        self.seen["worker died"] += 1
        del self.workers[name]
        unsent = self.unsent.pop(name, None)
        if unsent is not None:
            move = self.state.moves.get(unsent.move_id)
            lease = move.lease_until if move is not None and move.worker == name else 0.0
            self.late.append((unsent, lease))

    def deliver_late(self) -> None:
        """A dead worker's report arrives after its lease passed: refused, harmless."""
        ready = [x for x in self.late if x[1] <= self.now]
        if not ready:
            return
        late = self.rng.choice(ready)
        self.late.remove(late)
        self.seen["late report"] += 1
        before = snapshot(self.state)
        with pytest.raises(rs.MoveLost):
            rs.update(self.state, late[0].worker, late[0].move_id, late[0].steps,
                      late[0].stats, now=self.now)
        assert snapshot(self.state) == before

    def spawn(self) -> None:
        self.worker_count += 1
        name = f"w{self.worker_count}"
        self.workers[name] = self.worker(name)

    # -- clients -----------------------------------------------------------------

    def refresh(self, client: Client) -> None:
        client.logical_map = tuple(self.state.client_map()["keyspaces"][NAME]["map"])

    def route(self, client: Client, write: Write) -> dict[str, Any] | None:
        """Send a write as a client does: by its cached map, following WRONG_SHARD
        hints; None when refused for now (SHARD_MOVING, or no way found)."""
        ls = write.mutations[0].logical_shard
        if not client.logical_map or self.rng.random() < 0.05:
            self.refresh(client)
        target = client.logical_map[ls]
        for _ in range(HOPS_MAX):
            if target not in self.state.shards:  # a removed group: its nodes dropped it
                self.refresh(client)
                target = client.logical_map[ls]
                continue
            result: dict[str, Any] = self.groups[target].run(write)[0]
            err = result.get("err")
            if err in (None, "OUTCOME_UNKNOWN"):
                return result
            if err == "SHARD_MOVING":
                self.seen["SHARD_MOVING"] += 1
                return None
            assert err == "WRONG_SHARD", result
            if result.get("dest") is not None:
                self.seen["followed a hint"] += 1
                target = result["dest"]
            else:
                self.seen["WRONG_SHARD, no hint"] += 1
                self.refresh(client)
                target = client.logical_map[ls]
        return None

    def client_write(self, client: Client, key: bytes | None = None) -> None:
        if client.pending is None:
            key = self.rng.choice(KEYS) if key is None else key
            ls = self.ls_of(key)
            client.seq += 1
            value: bytes | None = b"%s-%d" % (client.cid[:1].hex().encode(), client.seq)
            if self.rng.random() < 0.2:
                value = None
                mutation = Mutation(DELETE, ls, key)
            else:
                mutation = Mutation(PUT, ls, key, value)
            # Mostly the client acks what it has been answered (one write in flight).
            ack = client.seq - 1 if self.rng.random() < 0.8 else 0
            client.pending = (Write(self.ks_id, client.cid, client.seq, ack, (mutation,)), key,
                              value)
        write, key, value = client.pending
        result = self.route(client, write)
        if result is None:
            return  # refused: definitely not applied; sent again later
        assert "r" in result, result
        client.pending = None
        self.model[key] = value
        self.acked.append((write, result))

    def retry_acknowledged(self) -> None:
        """An acknowledged write sent again: answered from its stored result (or
        OUTCOME_UNKNOWN once forgotten), never applied twice, wherever its
        logical shard lives now."""
        if not self.acked:
            return
        write, first = self.rng.choice(self.acked)
        again = self.route(self.rng.choice(self.clients), write)
        if again is not None and again.get("err") == "OUTCOME_UNKNOWN":
            self.seen["retry forgotten"] += 1  # acked, or out of the window: not applied
        elif again is not None:
            self.seen["retry answered"] += 1
            assert again == first, (again, first)

    def put_initial_data(self, count: int) -> None:
        for _ in range(count):
            self.client_write(self.rng.choice(self.clients))
        assert all(c.pending is None for c in self.clients)

    # -- the run -----------------------------------------------------------------

    def start(self) -> None:
        self.before = self.state
        self.state = rs.start(self.state, NAME, self.p.target, alive=ALIVE, now=self.now)
        self.new_ids = sorted(set(self.state.shards) - set(self.before.shards))
        for _ in range(self.p.workers_max):
            self.spawn()

    def finished(self) -> bool:
        return self.state.reshards[NAME].state in (RESHARD_DONE, RESHARD_ABORTED)

    def step(self) -> None:
        self.steps += 1
        rng, p = self.rng, self.p
        chaos = self.steps <= p.chaos_steps
        self.now += rng.uniform(0.0, 0.3)
        if p.abort_at is not None and self.steps == p.abort_at:
            self.abort()
        roll = rng.random()
        if roll < 0.5 and self.workers:
            name = rng.choice(sorted(self.workers))
            next(self.workers[name])
        elif roll < 0.7:
            self.client_write(rng.choice(self.clients))
        elif roll < 0.73:
            self.retry_acknowledged()
        elif roll < 0.78:
            self.own_new_groups()
        elif roll < 0.83:
            self.state = rs.tick(self.state, now=self.now)
        elif roll < 0.86:
            self.deliver_late()
        elif roll < 0.86 + p.death_rate and chaos and self.workers:
            self.kill(rng.choice(sorted(self.workers)))
        elif roll < 0.86 + p.death_rate + p.jump_rate and chaos:
            self.seen["pause"] += 1
            self.now += rs.LEASE_S * rng.uniform(0.5, 1.5)  # a pause: leases pass
        if not self.workers or (len(self.workers) < p.workers_max and rng.random() < 0.05):
            self.spawn()

    def abort(self) -> None:
        job = self.state.reshards[NAME]
        if job.state in (RESHARD_DONE, RESHARD_ABORTED):
            assert_refused(lambda s: rs.abort(s, NAME), self.state, match="no reshard running")
            return
        assert job.state == RESHARD_RUNNING
        before, self.state = self.state, rs.abort(self.state, NAME)
        self.aborted_at = self.steps
        for move in self.state.moves.values():
            if move.phase != before.moves[move.id].phase:  # turned: anyone may take it
                assert move.worker is None and (move.phase == "aborted") == (
                    not before.moves[move.id].started), move
        assert rs.abort(self.state, NAME) is self.state
        assert_refused(lambda s: rs.start(s, NAME, self.p.target, alive=ALIVE, now=self.now),
                       self.state)

    # -- invariants ---------------------------------------------------------------

    def ls_of(self, key: bytes) -> int:
        ls = self.ls_cache.get(key)
        if ls is None:
            ls = self.ls_cache[key] = logical_shard(NAME, key, self.p.logical)
        return ls

    def expected(self) -> dict[int, dict[bytes, bytes]]:
        out: dict[int, dict[bytes, bytes]] = {}
        for key, value in self.model.items():
            if value is not None:
                out.setdefault(self.ls_of(key), {})[key] = value
        return out

    def survey(self) -> tuple[dict[int, list[int]], dict[int, dict[int, dict[bytes, bytes]]]]:
        """One pass over every group: the groups where each logical shard is
        ACTIVE, and each group's user data by logical shard."""
        owners: dict[int, list[int]] = {ls: [] for ls in range(self.p.logical)}
        data: dict[int, dict[int, dict[bytes, bytes]]] = {}
        for shard, group in self.groups.items():
            mine = data[shard] = {}
            for key, value in group.state.data.items():
                prefix = key[:1]
                if prefix == layout.DATA_PREFIX:
                    ks, ls, user_key = layout.split_data_key(key)
                    assert ks == self.ks_id
                    mine.setdefault(ls, {})[user_key] = value
                elif prefix == layout.OWNER_PREFIX:
                    owner = decode_owner(value)
                    assert owner is not None
                    if owner.state == ACTIVE:
                        owners[int.from_bytes(key[5:9], "big")].append(shard)
        return owners, data

    def active_owners(self) -> dict[int, list[int]]:
        return self.survey()[0]

    def check(self) -> None:
        state = self.state
        ks = state.keyspaces[NAME]
        job = state.reshards[NAME]
        owners, data = self.survey()
        expected = self.expected()
        for ls, active in owners.items():
            # Never two owners; the one there is holds exactly the acknowledged writes.
            assert len(active) <= 1, f"logical shard {ls} is ACTIVE in groups {active}"
            if active:
                assert data[active[0]].get(ls, {}) == expected.get(ls, {}), (ls, active)
        leased = [m for m in state.moves.values() if m.worker is not None
                  and m.lease_until > self.now and m.phase not in FINAL]
        load = Counter(n for m in leased for n in nodes_of(state, m))
        assert max(load.values(), default=0) <= self.p.per_node_max
        holders = Counter(m.worker for m in leased)
        assert max(holders.values(), default=0) <= 1, holders  # one move per worker
        for move in state.moves.values():
            assert move.stuck is None, move
            assert move.reshard == job.id
            published = move.phase in ("cleanup", "done")
            assert ks.logical_map[move.ls] == (move.dst if published else move.src), move
        for shard in ks.shard_ids:
            assert state.shards[shard].owned  # the map names only groups that serve
        if self.rng.random() < 0.05:
            assert ClusterState.from_json(json.loads(json.dumps(state.to_json()))) == state

    def check_end(self) -> None:
        state, p = self.state, self.p
        job = state.reshards[NAME]
        ks = state.keyspaces[NAME]
        assert job.state in (RESHARD_DONE, RESHARD_ABORTED)
        owners = self.active_owners()
        for ls, active in owners.items():
            assert active == [ks.logical_map[ls]], (ls, active, ks.logical_map)
        mine = {i for i, s in state.shards.items() if s.keyspace == NAME}
        assert mine == set(ks.shard_ids)
        if job.state == RESHARD_DONE:
            assert len(mine) == p.target
            counts = Counter(ks.logical_map)
            assert max(counts.values()) - min(counts.values()) <= 1
            assert job.summary["moved"] == job.moves_total and job.summary["aborted"] == 0
        else:
            assert ks.logical_map == self.before.keyspaces[NAME].logical_map
            assert mine == set(job.before) == set(self.before.keyspaces[NAME].shard_ids)
        removed = (set(job.before) | set(self.new_ids)) - mine
        assert job.summary["removed_shards"] == sorted(removed)
        assert not removed & set(state.shards)
        assert not any(m.reshard == job.id for m in state.moves.values())
        for name in ("keys", "bytes", "records"):
            assert job.summary[name] == self.reported[name], name
        assert job.summary["unavailable_ms"] == sorted(
            round(v, 3) for v in self.unavailable.values())
        # Every acknowledged write reads back, with its last value, from the mapped group.
        for key, value in self.model.items():
            ls = self.ls_of(key)
            group = self.groups[ks.logical_map[ls]]
            assert group.state.get(layout.data_key(self.ks_id, ls, key)) == value, key
        # Clean: no move left in any serving group, no copy left behind.
        for shard in mine:
            group = self.groups[shard]
            for ls in range(p.logical):
                owner = self.owner(shard, ls)
                if ks.logical_map[ls] == shard:
                    assert owner is not None and owner.state == ACTIVE and not owner.capturing
                else:
                    assert owner is None or owner.state in (MOVED, ABORTED), (shard, ls, owner)
                    for start, stop in layout.shard_ranges(self.ks_id, ls):
                        assert group.state.scan(start, stop, 1) == [], (shard, ls)
            assert not any(k[:1] == layout.CHANGELOG_PREFIX for k in group.state.data)
            keys = sum(1 for k in group.state.data if k[:1] == layout.DATA_PREFIX)
            assert layout.decode_index(group.state.get(layout.KEY_COUNT_KEY)) == keys


def simulate(params: Params, seed: int) -> Sim:
    sim = Sim(random.Random(seed), params)
    sim.put_initial_data(20)
    sim.start()
    sim.check()
    for _ in range(20_000):
        sim.step()
        sim.check()
        if sim.finished():
            break
    assert sim.finished(), (sim.state.reshards[NAME], sorted(
        (m.id, m.phase, m.worker, m.lease_until) for m in sim.state.moves.values()))
    for _ in range(10):  # clients with old maps find the new layout
        sim.client_write(sim.rng.choice(sim.clients))
        sim.retry_acknowledged()
        sim.check()
    sim.check_end()
    return sim


def record_events(sim: Sim) -> None:
    """What the run went through (pytest --hypothesis-show-statistics)."""
    job = sim.state.reshards[NAME]
    event(f"ended {job.state}, {'fenced' if sim.p.fenced else 'unfenced'} workers")
    if job.state == RESHARD_ABORTED and job.summary["moved"]:
        event("rolled back")
    for what, count in sim.seen.items():
        event(f"{what}: {'1-9' if count < 10 else '10+'}")


def test_a_small_split_runs_to_done_in_the_simulation() -> None:
    sim = simulate(Params(logical=8, physical=1, target=2, rf=1), seed=5)
    assert sim.state.reshards[NAME].state == RESHARD_DONE
    assert sim.state.reshards[NAME].summary["moved"] == 4
    assert sim.reported["keys"] > 0 and sim.acked


counts = st.tuples(st.sampled_from([8, 16]), st.integers(1, 8), st.integers(1, 16)).map(
    lambda t: (t[0], min(t[1], t[0]), min(t[2], t[0])))


@settings(max_examples=100, deadline=None)
@given(counts=counts, rf=st.integers(1, 3), per_node_max=st.integers(1, 4),
       workers_max=st.integers(1, 4), batch_max=st.integers(1, 6), page_max=st.integers(1, 4),
       death_rate=st.sampled_from([0.0, 0.01, 0.04]), jump_rate=st.sampled_from([0.0, 0.005]),
       chaos_steps=st.integers(0, 1500), fenced=st.booleans(), seed=st.integers(0, 2**32))
def test_a_reshard_ends_done_whatever_the_workers_and_clients_do(
        counts: tuple[int, int, int], rf: int, per_node_max: int, workers_max: int,
        batch_max: int, page_max: int, death_rate: float, jump_rate: float, chaos_steps: int,
        fenced: bool, seed: int) -> None:
    logical, physical, target = counts
    sim = simulate(Params(logical, physical, target, rf, per_node_max, workers_max, batch_max,
                          page_max, death_rate, jump_rate, chaos_steps, fenced=fenced), seed)
    record_events(sim)
    assert sim.state.reshards[NAME].state == RESHARD_DONE


@settings(max_examples=100, deadline=None)
@given(counts=counts, rf=st.integers(1, 3), per_node_max=st.integers(1, 4),
       workers_max=st.integers(1, 4), batch_max=st.integers(1, 6),
       death_rate=st.sampled_from([0.0, 0.02]), chaos_steps=st.integers(0, 1500),
       abort_at=st.integers(1, 800), fenced=st.booleans(), seed=st.integers(0, 2**32))
def test_an_aborted_reshard_ends_on_the_old_layout_or_done(
        counts: tuple[int, int, int], rf: int, per_node_max: int, workers_max: int,
        batch_max: int, death_rate: float, chaos_steps: int, abort_at: int, fenced: bool,
        seed: int) -> None:
    logical, physical, target = counts
    sim = simulate(Params(logical, physical, target, rf, per_node_max, workers_max, batch_max,
                          2, death_rate, 0.005, chaos_steps, abort_at, fenced), seed)
    record_events(sim)
    job = sim.state.reshards[NAME]
    if sim.aborted_at is not None:
        assert job.state == RESHARD_ABORTED
    else:  # it had ended before the operator asked
        assert job.state == RESHARD_DONE and sim.steps < abort_at


# ---------------------------------------------------------------------------
# steps in flight: a worker's step that lands after its move went on without it


def scripted(seed: int = 1) -> Sim:
    """One group split in two (4 moves), every group serving, 16 writes in."""
    sim = Sim(random.Random(seed), Params(logical=8, physical=1, target=2, rf=1))
    sim.put_initial_data(16)
    sim.start()
    sim.own_new_groups()
    return sim


def run_phases(sim: Sim, worker: str, move_id: int, until: str | tuple[str, ...]) -> Move:
    """``worker`` does and reports one phase at a time until the move's phase is in ``until``."""
    move = sim.state.moves[move_id]
    while move.phase not in until:
        sim.state = rs.update(sim.state, worker, move.id, [(move.phase, sim.do_step(move))], {},
                              now=sim.now)
        move = sim.state.moves[move.id]
    return move


def in_flight_then_aborted() -> tuple[Sim, Move]:
    """w1 holds a move in phase capture, its capture step on its way; an
    operator aborts; w2 takes the move and turns it back; the reshard ends."""
    sim = scripted()
    sim.state, move = claim(sim.state, "w1")
    in_flight = run_phases(sim, "w1", move.id, "capture")
    sim.state = rs.abort(sim.state, NAME)
    sim.state, taken = claim(sim.state, "w2")
    assert taken.id == move.id and taken.phase == "abort"
    run_phases(sim, "w2", move.id, FINAL)
    sim.state = rs.tick(sim.state, now=sim.now)
    assert sim.state.reshards[NAME].state == RESHARD_ABORTED
    sim.check_end()
    return sim, in_flight


def test_a_capture_and_freeze_in_flight_when_the_move_was_turned_back_are_refused() -> None:
    """(Once started capturing again, and froze the logical shard at its only
    owner for good: the source now remembers the move it turned back.)"""
    sim, in_flight = in_flight_then_aborted()
    assert sim.do_step(in_flight)["err"] == "MOVE_REFUSED"  # w1's capture lands
    assert sim.do_step(replace(in_flight, phase="freeze"))["err"] == "MOVE_REFUSED"
    with pytest.raises(rs.MoveLost):
        rs.update(sim.state, "w1", in_flight.id, [("capture", {"seq": 0})], {}, now=sim.now)
    sim.check_end()
    key = key_in(in_flight.ls, 8)
    sim.client_write(sim.clients[0], key)
    assert sim.clients[0].pending is None and sim.model[key] is not None
    sim.check_end()


def test_a_capture_in_flight_cannot_restart_capturing_after_a_roll_back() -> None:
    sim = scripted()
    sim.state, move = claim(sim.state, "w1")
    in_flight = run_phases(sim, "w1", move.id, "capture")  # ... and w1 stalls
    sim.now += rs.LEASE_S
    sim.state, taken = claim(sim.state, "w2", now=sim.now)
    assert taken.id == move.id
    run_phases(sim, "w2", move.id, "done")
    sim.state = rs.tick(rs.abort(sim.state, NAME), now=sim.now)
    assert sim.state.reshards[NAME].state == RESHARD_ROLLING_BACK
    sim.state, back = claim(sim.state, "w3", now=sim.now)
    assert (back.ls, back.src, back.dst) == (move.ls, move.dst, move.src)
    run_phases(sim, "w3", back.id, "done")
    sim.state = rs.tick(sim.state, now=sim.now)
    assert sim.state.reshards[NAME].state == RESHARD_ABORTED
    sim.check_end()
    sim.do_step(in_flight)  # w1's capture lands (its copy is then refused: MoveLost)
    sim.client_write(sim.clients[0], key_in(move.ls, 8))
    sim.check_end()  # the source is not capturing, and no changelog is left


def test_a_successor_redoing_the_copy_or_ship_after_the_cutover_is_told_so() -> None:
    """w1 did ship and activate (the cutover, reported as one batch) and died
    before reporting; w2 finds the move at ship, and the move still finishes.
    (The destination once refused the delta: MoveError, the move stuck.)"""
    sim = scripted(2)
    sim.state, move = claim(sim.state, "w1")
    move = run_phases(sim, "w1", move.id, "copy")
    sim.client_write(sim.clients[0], key_in(move.ls, 8))  # a write the changelog carries
    assert sim.clients[0].pending is None
    move = run_phases(sim, "w1", move.id, "ship")
    assert move.final_seq == 1
    assert "err" not in sim.do_step(move)
    assert sim.do_step(replace(move, phase="activate"))["active"] is True  # ... w1 dies
    sim.now += rs.LEASE_S
    sim.state, again = claim(sim.state, "w2", now=sim.now)
    assert again.phase == "ship"
    assert sim.do_step(again) == {"active": True}
    assert sim.do_step(replace(again, phase="copy")) == {"copied": 0}
    assert run_phases(sim, "w2", move.id, "done").stuck is None
    sim.check()

"""The shard manager group's state machine (shardmgr.machine): compare-and-set
of the versioned state, patches, the stored parts (and stores in the earlier
whole form), barriers, malformed entries, and the entry codec.

Entries are applied to a ``MemoryState`` as a replica would: the output's
writes are committed before the next entry. Known bugs are
``xfail(strict=True)`` tests that say what goes wrong.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.statemachine import layout
from raftkv.statemachine.apply import ApplyOutput, MemoryState
from raftkv.statemachine.commands import Barrier
from shardmgr.machine import (
    MOVE_PREFIX,
    PARTS_KEY,
    STATE_KEY,
    VERSION_KEY,
    PatchState,
    SetState,
    _decode,
    encode_manager_commands,
    manager_apply,
    manager_apply_state,
    move_key,
    read_state,
)
from shardmgr.moves import Move
from shardmgr.state import ClusterState, NodeInfo, create_keyspace, mark_owned, register_node
from tests.shardmgr.test_state import random_walk

PROPERTY = settings(max_examples=100, deadline=None)


def sample_state(version: int) -> ClusterState:
    """A state with nodes, a keyspace and an owned shard, at ``version``."""
    state = ClusterState()
    for name, dc in (("a", "dc1"), ("b", "dc2")):
        state = register_node(state, NodeInfo(name, dc, f"host-{name}", 9000, 7000, 7099, 2))
    state = create_keyspace(state, "ks", logical_shards=4, replication_factor=2,
                            physical_shards=2, alive=["a", "b"])
    return replace(mark_owned(state, 1), version=version)


def stored(version: int) -> MemoryState:
    """A store of an earlier version: the whole state under one key."""
    return MemoryState({STATE_KEY: cbor2.dumps(sample_state(version).to_json())})


def stored_state(view: MemoryState) -> ClusterState:
    return read_state(view)[1]


def in_parts(state: ClusterState) -> dict[bytes, bytes | None]:
    """What a store in parts holds for ``state`` (but its version)."""
    return {STATE_KEY: cbor2.dumps(state.base_json()), PARTS_KEY: b"1",
            **{move_key(i): cbor2.dumps(m.to_json()) for i, m in state.moves.items()}}


def applied_only(index: int) -> dict[bytes, bytes | None]:
    return {layout.APPLIED_KEY: layout.encode_index(index)}


def apply_and_commit(view: MemoryState, index: int, commands: list[Any]) -> ApplyOutput:
    out = manager_apply(view, index, encode_manager_commands(commands))
    assert out.error is None
    view.commit(out.writes)
    return out


# ---------------------------------------------------------------------------
# compare-and-set


def test_manager_apply_stores_a_set_with_the_expected_version() -> None:
    view = MemoryState()
    assert stored_state(view) == ClusterState()
    new = sample_state(1)
    out = manager_apply(view, 7, encode_manager_commands([SetState(0, new)]))
    assert out.error is None
    assert out.results == [{"i": 7, "ok": True, "version": 1}]
    assert out.writes == {**applied_only(7), **in_parts(new),
                          VERSION_KEY: layout.encode_index(1)}
    assert view.data == {}, "manager_apply must not write through the view"
    view.commit(out.writes)
    assert stored_state(view) == new
    assert layout.decode_index(view.get(layout.APPLIED_KEY)) == 7


def test_a_store_written_before_the_version_key_is_read_by_its_state() -> None:
    """``stored(n)`` holds only the state, as a store of an earlier version
    does: the compare-and-set reads the version from it, then writes both."""
    view = stored(3)
    assert VERSION_KEY not in view.data
    refused = manager_apply(view, 4, encode_manager_commands([SetState(2, sample_state(4))]))
    assert refused.results == [{"i": 4, "ok": False, "version": 3}]
    apply_and_commit(view, 5, [SetState(3, sample_state(4))])
    assert layout.decode_index(view.get(VERSION_KEY)) == 4


def test_the_version_key_is_what_the_compare_and_set_reads() -> None:
    view = stored(3)
    view.data[VERSION_KEY] = layout.encode_index(9)  # (never differs from the state's)
    out = manager_apply(view, 6, encode_manager_commands([SetState(3, sample_state(10))]))
    assert out.results == [{"i": 6, "ok": False, "version": 9}]


def test_manager_apply_accepts_a_version_jump() -> None:
    view = stored(3)
    out = apply_and_commit(view, 9, [SetState(3, sample_state(40))])
    assert out.results == [{"i": 9, "ok": True, "version": 40}]
    assert stored_state(view) == sample_state(40)


@pytest.mark.parametrize("expected", [0, 2, 4, 100, -1])
def test_manager_apply_refuses_a_wrong_expected_version(expected: int) -> None:
    view = stored(3)
    before = dict(view.data)
    out = manager_apply(view, 11, encode_manager_commands([SetState(expected, sample_state(5))]))
    assert out.error is None
    assert out.results == [{"i": 11, "ok": False, "version": 3}]
    assert out.writes == applied_only(11)
    view.commit(out.writes)
    assert view.data == {**before, **applied_only(11)}


@pytest.mark.parametrize("new_version", [3, 2, 0, -5])
def test_manager_apply_refuses_a_version_that_does_not_increase(new_version: int) -> None:
    view = stored(3)
    out = manager_apply(view, 12, encode_manager_commands([SetState(3, sample_state(new_version))]))
    assert out.results == [{"i": 12, "ok": False, "version": 3}]
    assert out.writes == applied_only(12)


def test_manager_apply_refuses_a_non_increasing_version_on_an_empty_store() -> None:
    out = manager_apply(MemoryState(), 1, encode_manager_commands([SetState(0, ClusterState())]))
    assert out.results == [{"i": 1, "ok": False, "version": 0}]
    assert out.writes == applied_only(1)


def test_manager_apply_runs_the_commands_of_one_entry_in_order() -> None:
    view = stored(1)
    commands: list[Any] = [
        SetState(1, sample_state(2)),   # ok
        SetState(1, sample_state(5)),   # refused: sees version 2 now
        Barrier(),
        SetState(2, sample_state(4)),   # ok
        SetState(4, sample_state(4)),   # refused: not newer
        SetState(4, sample_state(3)),   # refused: older
    ]
    out = apply_and_commit(view, 20, commands)
    assert out.results == [
        {"i": 20, "ok": True, "version": 2},
        {"i": 20, "ok": False, "version": 2},
        {"i": 20},
        {"i": 20, "ok": True, "version": 4},
        {"i": 20, "ok": False, "version": 4},
        {"i": 20, "ok": False, "version": 4},
    ]
    assert out.writes == {**applied_only(20), **in_parts(sample_state(4)),
                          VERSION_KEY: layout.encode_index(4)}
    assert stored_state(view) == sample_state(4)


def test_manager_apply_the_second_of_two_proposals_from_one_version_loses() -> None:
    view = stored(6)
    first = replace(sample_state(7), next_shard_id=50)
    second = replace(sample_state(7), next_shard_id=60)
    out = apply_and_commit(view, 3, [SetState(6, first), SetState(6, second)])
    assert out.results == [{"i": 3, "ok": True, "version": 7},
                           {"i": 3, "ok": False, "version": 7}]
    assert stored_state(view) == first
    # The same proposal again, in a later entry, loses too.
    again = apply_and_commit(view, 4, [SetState(6, second)])
    assert again.results == [{"i": 4, "ok": False, "version": 7}]
    assert stored_state(view) == first


# ---------------------------------------------------------------------------
# barriers and empty entries


@pytest.mark.parametrize("barriers", [1, 2, 3])
def test_manager_apply_barriers_answer_the_index(barriers: int) -> None:
    view = stored(2)
    out = manager_apply(view, 33, encode_manager_commands([Barrier()] * barriers))
    assert out.error is None
    assert out.results == [{"i": 33}] * barriers
    assert out.writes == applied_only(33)


def test_manager_apply_an_empty_entry_answers_nothing() -> None:
    out = manager_apply(stored(2), 5, encode_manager_commands([]))
    assert (out.results, out.error, out.writes) == ([], None, applied_only(5))


# ---------------------------------------------------------------------------
# malformed entries

STATE_JSON = sample_state(5).to_json()
BASE_JSON = sample_state(5).base_json()
MOVE_JSON = Move(1, "ks", 0, 4, 1, 1, 2).to_json()
MALFORMED: dict[str, bytes] = {
    "empty payload": b"",
    "truncated cbor": cbor2.dumps([["b"]])[:-1],
    "not cbor": b"\xff\xff\xff",
    "a map": cbor2.dumps({"set": [0, STATE_JSON]}),
    "an integer": cbor2.dumps(5),
    "a string": cbor2.dumps("b"),
    "null": cbor2.dumps(None),
    "unknown command": cbor2.dumps([["x"]]),
    "barrier with an argument": cbor2.dumps([["b", 1]]),
    "bare string command": cbor2.dumps(["b"]),
    "set without a state": cbor2.dumps([["set", 0]]),
    "set with an extra field": cbor2.dumps([["set", 0, STATE_JSON, 1]]),
    "set with a string version": cbor2.dumps([["set", "0", STATE_JSON]]),
    "set with a float version": cbor2.dumps([["set", 0.0, STATE_JSON]]),
    "set with an empty state": cbor2.dumps([["set", 0, {}]]),
    "set with a state missing a field": cbor2.dumps(
        [["set", 0, {k: v for k, v in STATE_JSON.items() if k != "shards"}]]),
    "set with a node with an unknown field": cbor2.dumps(
        [["set", 0, {**STATE_JSON, "nodes": [{**STATE_JSON["nodes"][0], "colour": 1}]}]]),
    "set with a state that is a list": cbor2.dumps([["set", 0, [1, 2]]]),
    "good set then unknown command": cbor2.dumps([["set", 0, STATE_JSON], ["zz"]]),
    "barrier then junk": cbor2.dumps([["b"], 7]),
    "patch without removed ids": cbor2.dumps([["patch", 0, BASE_JSON, []]]),
    "patch with moves in its state": cbor2.dumps([["patch", 0, STATE_JSON, [], []]]),
    "patch with a state that is a list": cbor2.dumps([["patch", 0, [1], [], []]]),
    "patch with a string version": cbor2.dumps([["patch", "0", BASE_JSON, [], []]]),
    "patch with a string removed id": cbor2.dumps([["patch", 0, BASE_JSON, [], ["1"]]]),
    "patch with moves that are not a list": cbor2.dumps([["patch", 0, BASE_JSON, {}, []]]),
    "patch with a move that is not a map": cbor2.dumps([["patch", 0, BASE_JSON, [1], []]]),
    "patch with a move missing a field": cbor2.dumps(
        [["patch", 0, BASE_JSON, [{"id": 1, "keyspace": "ks"}], []]]),
    "patch with a move with a string id": cbor2.dumps(
        [["patch", 0, BASE_JSON, [{**MOVE_JSON, "id": "1"}], []]]),
    "patch with one move twice": cbor2.dumps(
        [["patch", 0, BASE_JSON, [MOVE_JSON, MOVE_JSON], []]]),
}


@pytest.mark.parametrize("payload", list(MALFORMED.values()), ids=list(MALFORMED))
@pytest.mark.parametrize("initial", [None, 0], ids=["empty", "stored"])
def test_manager_apply_a_malformed_entry_writes_only_the_index(
        payload: bytes, initial: int | None) -> None:
    view = MemoryState() if initial is None else stored(initial)
    before = dict(view.data)
    out = manager_apply(view, 42, payload)
    assert out.writes == applied_only(42)
    assert out.results is None
    assert out.error is not None
    assert "42" in out.error
    view.commit(out.writes)
    assert view.data == {**before, **applied_only(42)}


@pytest.mark.parametrize("state_json", [
    {**ClusterState().to_json(), "version": "1"},
    {**ClusterState().to_json(), "version": None},
    {**ClusterState(version=1).to_json(), "nodes": [
        {"id": 1, "dc": "d", "host": "h", "client_port": 1, "raft_port_min": 1,
         "raft_port_max": 2, "capacity": 1},
        {"id": "a", "dc": "d", "host": "h", "client_port": 1, "raft_port_min": 1,
         "raft_port_max": 2, "capacity": 1}]},
], ids=["string version", "null version", "mixed node id types"])
@pytest.mark.parametrize("as_patch", [False, True], ids=["set", "patch"])
def test_manager_apply_a_change_to_an_ill_typed_state_never_raises(
        state_json: dict[str, Any], as_patch: bool) -> None:
    if as_patch:
        base = {k: v for k, v in state_json.items() if k != "moves"}
        payload = cbor2.dumps([["patch", 0, base, [], []]])
    else:
        payload = cbor2.dumps([["set", 0, state_json]])
    out = manager_apply(MemoryState(), 8, payload)
    assert out.writes == applied_only(8)
    assert out.error is not None


def test_manager_apply_refuses_a_non_integer_state_version() -> None:
    view = MemoryState()
    out = manager_apply(view, 8, cbor2.dumps([["set", 0, {**ClusterState().to_json(),
                                                          "version": 1.5}]]))
    view.commit(out.writes)
    assert out.writes == applied_only(8)
    assert out.error is not None


# ---------------------------------------------------------------------------
# the entry codec


def test_manager_entry_encoding_is_the_documented_cbor() -> None:
    state = sample_state(4)
    raw = encode_manager_commands([SetState(3, state), Barrier()])
    assert cbor2.loads(raw) == [["set", 3, state.to_json()], ["b"]]
    assert encode_manager_commands([]) == cbor2.dumps([])


def test_manager_entry_encoding_refuses_other_commands() -> None:
    with pytest.raises(AssertionError):
        encode_manager_commands(["b"])


@st.composite
def manager_commands(draw: st.DrawFn) -> list[Any]:
    states = random_walk(draw, steps_max=12)
    return draw(st.lists(st.one_of(
        st.just(Barrier()),
        st.builds(SetState, st.integers(-2, 2**70), st.sampled_from(states)),
    ), max_size=5))


@settings(max_examples=60, deadline=None)
@given(manager_commands())
def test_manager_entry_round_trips_through_the_decoder(commands: list[Any]) -> None:
    raw = encode_manager_commands(commands)
    assert _decode(raw) == commands
    assert encode_manager_commands(_decode(raw)) == raw


def test_a_change_proposed_since_a_state_is_encoded_as_a_patch() -> None:
    before = with_moves(sample_state(4), 3)
    move = replace(before.moves[2], phase="copy")
    after = replace(before, version=5, moves={1: before.moves[1], 2: move, 4: move_of(4)})
    raw = encode_manager_commands([SetState(4, after, since=before)])
    assert cbor2.loads(raw) == [["patch", 4, after.base_json(),
                                 [move.to_json(), move_of(4).to_json()], [3]]]
    [decoded] = _decode(raw)
    assert decoded == PatchState(4, replace(after, moves={}), (move, move_of(4)), (3,))
    assert encode_manager_commands([decoded]) == raw


def move_of(move_id: int, **fields: Any) -> Move:
    return Move(move_id, "ks", 0, 4, move_id % 4, 1, 2, **fields)


def with_moves(state: ClusterState, count: int) -> ClusterState:
    return replace(state, moves={i: move_of(i) for i in range(1, count + 1)})


# ---------------------------------------------------------------------------
# random entries against a model

VERSIONS = st.integers(0, 6)


@st.composite
def entries(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """An entry: good commands, or now and then a malformed payload."""
    if draw(st.integers(0, 9)) == 0:
        return [("raw", draw(st.sampled_from(list(MALFORMED.values()))))]
    return draw(st.lists(st.one_of(
        st.just(("b", None)),
        st.tuples(st.just("set"), st.tuples(VERSIONS, VERSIONS)),
    ), max_size=4))


@PROPERTY
@given(st.lists(entries(), min_size=1, max_size=12), st.integers(1, 1000))
def test_manager_apply_matches_a_compare_and_set_model(
        log: list[list[tuple[str, Any]]], first_index: int) -> None:
    view = MemoryState()
    version = 0
    model_state = ClusterState()
    for index, entry in enumerate(log, start=first_index):
        if entry and entry[0][0] == "raw":
            out = manager_apply(view, index, entry[0][1])
            assert out.writes == applied_only(index) and out.error is not None
            view.commit(out.writes)
            continue
        commands: list[Any] = []
        expected_results: list[dict[str, Any]] = []
        for kind, arg in entry:
            if kind == "b":
                commands.append(Barrier())
                expected_results.append({"i": index})
                continue
            expected, new_version = arg
            new = sample_state(new_version)
            commands.append(SetState(expected, new))
            ok = expected == version and new_version > version
            if ok:
                version, model_state = new_version, new
            expected_results.append({"i": index, "ok": ok, "version": version})
        out = manager_apply(view, index, encode_manager_commands(commands))
        assert out.error is None
        assert out.results == expected_results
        assert set(out.writes) <= {layout.APPLIED_KEY, STATE_KEY, VERSION_KEY, PARTS_KEY}
        view.commit(out.writes)
        assert stored_state(view) == model_state
        assert layout.decode_index(view.get(VERSION_KEY)) == version
        assert layout.decode_index(view.get(layout.APPLIED_KEY)) == index


# ---------------------------------------------------------------------------
# patches: what changed, stored in parts

MOVE_FIELDS = st.fixed_dictionaries({
    "phase": st.sampled_from(["prepare", "copy", "freeze", "done", "abort"]),
    "copied_keys": st.integers(0, 3), "worker": st.sampled_from([None, "w-1", "w-2"]),
    "lease_until": st.sampled_from([0.0, 1.5, 2.0]), "started": st.booleans(),
})


@st.composite
def move_histories(draw: st.DrawFn) -> list[ClusterState]:
    """States one version apart whose moves are added, changed and removed
    (an unchanged move is the same object, as the state's changes keep it)."""
    state = sample_state(1)
    states = [state]
    for _ in range(draw(st.integers(1, 8))):
        moves = dict(state.moves)
        for move_id in draw(st.lists(st.integers(1, 6), max_size=3)):
            if move_id in moves and draw(st.booleans()) and draw(st.booleans()):
                del moves[move_id]
            else:
                moves[move_id] = move_of(move_id, **draw(MOVE_FIELDS))
        next_shard_id = state.next_shard_id + draw(st.integers(0, 1))
        state = replace(state, version=state.version + 1, moves=moves,
                        next_shard_id=next_shard_id)
        states.append(state)
    return states


def stored_moves(view: MemoryState) -> dict[bytes, bytes]:
    return {k: v for k, v in view.data.items() if k.startswith(MOVE_PREFIX)}


@PROPERTY
@given(move_histories(), st.booleans())
def test_patches_store_what_whole_states_store(states: list[ClusterState],
                                                from_whole_store: bool) -> None:
    """The same history as patches (with and without the state stored last
    at hand) and as whole states: the same results, the same stored state,
    each move under its key and no other, from an empty store or from one in
    the earlier whole form."""
    first = states[0]
    views = [MemoryState(dict(stored(1).data)) if from_whole_store else MemoryState()
             for _ in range(3)]
    if not from_whole_store:
        for view in views:
            apply_and_commit(view, 1, [SetState(0, first)])
    previous: Any = None
    for index, (before, after) in enumerate(itertools.pairwise(states), 2):
        patch = encode_manager_commands([SetState(before.version, after, since=before)])
        whole = encode_manager_commands([SetState(before.version, after)])
        outs = [manager_apply(views[0], index, patch),
                manager_apply(views[1], index, whole)]
        hinted, stored_now = manager_apply_state(views[2], index, patch, previous)
        outs.append(hinted)
        assert stored_now == after
        previous = stored_now
        for view, out in zip(views, outs, strict=True):
            assert out.error is None
            assert out.results == [{"i": index, "ok": True, "version": after.version}]
            view.commit(out.writes)
            assert stored_state(view) == after
            assert stored_moves(view) == {k: v for k, v in in_parts(after).items()
                                          if k.startswith(MOVE_PREFIX)}
            assert view.data[PARTS_KEY] == b"1"
            assert "moves" not in cbor2.loads(view.data[STATE_KEY])


@PROPERTY
@given(move_histories())
def test_a_patch_against_another_state_is_refused(states: list[ClusterState]) -> None:
    """A patch applies only to the version it was computed from: the
    compare-and-set refuses it anywhere else, and nothing is written."""
    view = MemoryState()
    apply_and_commit(view, 1, [SetState(0, states[-1])])
    for before, after in itertools.pairwise(states):
        if before.version == states[-1].version:
            continue
        out = manager_apply(view, 2, encode_manager_commands(
            [SetState(before.version, after, since=before)]))
        assert out.results == [{"i": 2, "ok": False, "version": states[-1].version}]
        assert out.writes == applied_only(2)


def test_a_previous_state_of_another_version_or_form_is_not_used() -> None:
    """``previous`` only saves reading the stored moves: one of another
    version, or any while the store is still whole, is read past."""
    before = with_moves(sample_state(3), 2)
    after = replace(before, version=4, moves={**before.moves, 3: move_of(3)})
    whole = MemoryState({STATE_KEY: cbor2.dumps(before.to_json())})
    patch = encode_manager_commands([SetState(3, after, since=before)])
    assert len(cbor2.loads(patch)[0][3]) == 1  # (moves 1 and 2 are not in it)
    wrong = with_moves(sample_state(3), 0)  # version 3, but not the stored state
    out, stored_now = manager_apply_state(whole, 5, patch, wrong)
    whole.commit(out.writes)
    assert stored_state(whole) == after == stored_now
    assert set(stored_moves(whole)) == {move_key(i) for i in (1, 2, 3)}
    stale = replace(sample_state(2), moves={5: move_of(5)})  # another version: not used
    later = replace(after, version=5, moves={**after.moves, 1: move_of(1, phase="copy")})
    out, stored_now = manager_apply_state(whole, 6, encode_manager_commands(
        [SetState(4, later, since=after)]), stale)
    whole.commit(out.writes)
    assert stored_state(whole) == later == stored_now
    assert set(out.writes) == {layout.APPLIED_KEY, STATE_KEY, VERSION_KEY, move_key(1)}


def test_a_change_writes_only_the_moves_it_changed() -> None:
    """A reshard's state holds every move; a change of one writes one (the
    entry and the writes would otherwise grow with the moves)."""
    before = with_moves(sample_state(1), 192)
    view = MemoryState()
    apply_and_commit(view, 1, [SetState(0, before)])
    after = replace(before, version=2, moves={**before.moves, 7: move_of(7, phase="copy")})
    payload = encode_manager_commands([SetState(1, after, since=before)])
    assert len(payload) < len(encode_manager_commands([SetState(1, after)])) / 10
    out = apply_and_commit(view, 2, [SetState(1, after, since=before)])
    assert set(out.writes) == {layout.APPLIED_KEY, STATE_KEY, VERSION_KEY, move_key(7)}
    assert stored_state(view) == after
    gone = replace(after, version=3, moves={i: m for i, m in after.moves.items() if i != 9})
    out = apply_and_commit(view, 3, [SetState(2, gone, since=after)])
    assert out.writes[move_key(9)] is None
    assert stored_state(view) == gone


def test_a_state_is_read_again_when_it_changes_under_the_reader() -> None:
    """``read_state`` from another thread: a change stored between reading
    the state's key and its moves is seen, and the parts read again."""
    before, after = with_moves(sample_state(1), 2), with_moves(sample_state(2), 3)
    view = MemoryState()
    apply_and_commit(view, 1, [SetState(0, before)])
    change = manager_apply(view, 2, encode_manager_commands([SetState(1, after, since=before)]))

    class Racing(MemoryState):
        scans = 0

        def scan(self, start: bytes, stop: bytes, limit: int) -> list[tuple[bytes, bytes]]:
            found = super().scan(start, stop, limit)
            self.scans += 1
            if self.scans == 1:
                self.commit(change.writes)  # the change lands after the first scan
            return found

    racing = Racing(dict(view.data))
    assert read_state(racing) == (racing.data[STATE_KEY], after)
    assert racing.scans == 2

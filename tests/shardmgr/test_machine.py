"""The shard manager group's state machine (shardmgr.machine): compare-and-set
of the versioned state, barriers, malformed entries, and the entry codec.

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
    STATE_KEY,
    VERSION_KEY,
    SetState,
    _decode,
    encode_manager_commands,
    load_state,
    manager_apply,
    manager_apply_state,
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
    return MemoryState({STATE_KEY: cbor2.dumps(sample_state(version).to_json())})


def stored_state(view: MemoryState) -> ClusterState:
    return load_state(view.get(STATE_KEY))


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
    assert out.writes == {**applied_only(7), STATE_KEY: cbor2.dumps(new.to_json()),
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
    assert out.writes == {**applied_only(20), STATE_KEY: cbor2.dumps(sample_state(4).to_json()),
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
def test_manager_apply_a_set_with_an_ill_typed_state_never_raises(
        state_json: dict[str, Any]) -> None:
    out = manager_apply(MemoryState(), 8, cbor2.dumps([["set", 0, state_json]]))
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
        assert set(out.writes) <= {layout.APPLIED_KEY, STATE_KEY, VERSION_KEY}
        view.commit(out.writes)
        assert stored_state(view) == model_state
        assert layout.decode_index(view.get(VERSION_KEY)) == version
        assert layout.decode_index(view.get(layout.APPLIED_KEY)) == index


# ---------------------------------------------------------------------------
# decoding and encoding against the previous state (unchanged moves reused)

MOVE_FIELDS = st.fixed_dictionaries({
    "phase": st.sampled_from(["prepare", "copy", "freeze", "done", "abort"]),
    "copied_keys": st.integers(0, 3), "worker": st.sampled_from([None, "w-1", "w-2"]),
    "lease_until": st.sampled_from([0.0, 1.5, 2.0]), "started": st.booleans(),
})


@st.composite
def move_histories(draw: st.DrawFn) -> list[ClusterState]:
    """States one version apart whose moves are added, changed and removed."""
    state = sample_state(1)
    states = [state]
    for _ in range(draw(st.integers(1, 8))):
        moves = dict(state.moves)
        for move_id in draw(st.lists(st.integers(1, 6), max_size=3)):
            if move_id in moves and draw(st.booleans()) and draw(st.booleans()):
                del moves[move_id]
            else:
                moves[move_id] = Move(move_id, "ks", 0, 4, move_id % 4, 1, 2,
                                      **draw(MOVE_FIELDS))
        state = replace(state, version=state.version + 1, moves=moves)
        states.append(state)
    return states


@PROPERTY
@given(move_histories())
def test_decoding_and_encoding_with_the_previous_state_change_nothing(
        states: list[ClusterState]) -> None:
    for before, after in itertools.pairwise(states):
        data = cbor2.loads(cbor2.dumps(after.to_json()))
        previous_data = cbor2.loads(cbor2.dumps(before.to_json()))
        decoded = ClusterState.from_json(previous_data)
        again = ClusterState.from_json(data, (previous_data, decoded))
        assert again == after
        for move_id, move in again.moves.items():  # reused exactly where unchanged
            assert (move is decoded.moves.get(move_id)) == (move == before.moves.get(move_id))
        assert after.to_json((before.to_json(), before)) == after.to_json()


@PROPERTY
@given(move_histories())
def test_manager_apply_with_the_previous_state_gives_the_same_output(
        states: list[ClusterState]) -> None:
    plain, hinted = MemoryState(), MemoryState()
    previous: Any = None
    for index, (before, after) in enumerate(itertools.pairwise([ClusterState(), *states]), 1):
        payload = encode_manager_commands([SetState(before.version, after)])
        out = manager_apply(plain, index, payload)
        out_hinted, stored = manager_apply_state(hinted, index, payload, previous)
        assert (out_hinted.writes, out_hinted.results) == (out.writes, out.results)
        assert stored is not None and stored[1] == after and stored[0] == after.to_json()
        plain.commit(out.writes)
        hinted.commit(out_hinted.writes)
        previous = stored

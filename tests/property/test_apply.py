"""apply_entry against a dict store and an independent model of user data.

The store is what LevelDB would hold: ``read`` is ``dict.get`` and every
``out.writes`` is written back (None = delete) after each entry, as the
storage layer does in one WriteBatch.

Semantics modelled here (from the docstrings of apply.py / commands.py):

- a write is all or nothing: every cas precondition is checked against the
  state before the write; if one fails, the result names the first failing op
  and its current value, and no op of the write happens;
- otherwise ops run in order: put -> None, delete -> existed, cas -> True;
- a write's (client_id, seq) result is remembered until the client's ack
  reaches it; a retry returns the remembered result (without ``cur``, which
  is not stored) and changes nothing; a retry of a forgotten seq gets
  OUTCOME_UNKNOWN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cbor2
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from raftkv.sharding import logical_shard
from raftkv.statemachine import layout
from raftkv.statemachine.apply import DEDUP_RESULTS_MAX, ApplyOutput, MemoryState, apply_entry
from raftkv.statemachine.commands import (
    CAS,
    DELETE,
    PUT,
    Barrier,
    Command,
    DropKeyspace,
    MalformedEntry,
    Mutation,
    Own,
    Write,
    decode_commands,
    encode_commands,
)

KEYSPACE_IDS = [0, 5]
USER_KEYS = [b"a", b"b", b"{t}x", b"{t}y", b"zz"]
VALUES = [b"", b"1", b"2", b"a longer value \x00\xff"]
CLIENTS = [bytes([i]) * 16 for i in (1, 2, 3)]


def owning_every_logical_shard() -> dict[bytes, bytes]:
    """A group's state after the shard manager gave it every logical shard."""
    return {layout.owner_key(ks, ls): layout.OWNER_ACTIVE
            for ks in KEYSPACE_IDS for ls in range(256)}


def ls_of(key: bytes) -> int:
    return logical_shard("default", key, 256)


def dkey(ks: int, key: bytes) -> bytes:
    return layout.data_key(ks, ls_of(key), key)


def commit(store: dict[bytes, bytes], out: ApplyOutput) -> None:
    for key, value in out.writes.items():
        if value is None:
            store.pop(key, None)
        else:
            store[key] = value


def user_data(store: dict[bytes, bytes]) -> dict[tuple[int, bytes], bytes]:
    data = {}
    for stored, value in store.items():
        if stored.startswith(layout.DATA_PREFIX):
            ks, ls, key = layout.split_data_key(stored)
            assert ls == ls_of(key)
            data[(ks, key)] = value
    return data


def dedup_state(store: dict[bytes, bytes], cid: bytes, ks: int,
                ls: int) -> tuple[int, set[int]] | None:
    """(floor, seqs with a stored result) of a client in one logical shard, or
    None if nothing is stored.

    The floor record under ``dedup_key`` (a u64 floor, then the stored seqs
    when it lists them) and one key per stored result (``dedup_key`` + u64
    seq); a list in the floor record must name exactly the stored results."""
    prefix = layout.dedup_key(ks, ls, cid)
    keys = [k for k in store if k.startswith(prefix)]
    if not keys:
        return None
    floor, listed = layout.decode_dedup_floor(store.get(prefix))
    seqs = set()
    for k in keys:
        if k != prefix:
            assert len(k) == len(prefix) + 8, k
            seqs.add(int.from_bytes(k[len(prefix) :], "big"))
    if listed is not None:
        assert sorted(listed) == sorted(seqs), (listed, seqs)
    return floor, seqs


def without_cur(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "cur"}


def is_outcome_unknown(result: Any) -> bool:
    return (
        isinstance(result, dict)
        and result.get("err") == "OUTCOME_UNKNOWN"
        and isinstance(result.get("msg"), str)
        and "i" not in result
        and "r" not in result
    )


@dataclass
class Client:
    cid: bytes
    next_seq: int = 1
    last_ack: int = 0
    # The dedup floor per (keyspace, logical shard): results live, and are
    # forgotten, under the logical shard of the write's first op.
    floors: dict[tuple[int, int], int] = field(default_factory=dict)
    history: dict[int, tuple[Write, dict[str, Any]]] = field(default_factory=dict)

    def floor_of(self, write: Write) -> int:
        return self.floors.get(home(write), 0)


def home(write: Write) -> tuple[int, int]:
    return write.keyspace_id, write.mutations[0].logical_shard


OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"  # sentinel in expected results


class ApplyMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.store: dict[bytes, bytes] = owning_every_logical_shard()
        self.model: dict[tuple[int, bytes], bytes] = {}
        self.index = 0
        self.clients = {cid: Client(cid) for cid in CLIENTS}
        self.entries: list[tuple[int, bytes]] = []  # valid entries, for replays

    # -- model ---------------------------------------------------------------

    def _model_write(self, write: Write, index: int) -> dict[str, Any]:
        """Apply a fresh write to the model; return the expected result.

        Ops run in order (a cas sees the ops before it); the write is kept
        only if every cas held."""
        scratch = dict(self.model)
        per_op: list[Any] = []
        for position, m in enumerate(write.mutations):
            k = (write.keyspace_id, m.key)
            if m.kind == PUT:
                assert m.value is not None
                scratch[k] = m.value
                per_op.append(None)
            elif m.kind == DELETE:
                per_op.append(scratch.pop(k, None) is not None)
            else:
                current = scratch.get(k)
                if current != m.expected:
                    return {"i": index, "err": "PRECONDITION_FAILED", "op": position,
                            "cur": current}
                assert m.value is not None
                scratch[k] = m.value
                per_op.append(True)
        self.model = scratch
        return {"i": index, "r": per_op}

    def _expected_retry(self, cid: bytes, seq: int) -> Any:
        client = self.clients[cid]
        if seq <= client.floor_of(client.history[seq][0]):
            return OUTCOME_UNKNOWN
        return without_cur(client.history[seq][1])

    def _draw_write(self, data: st.DataObject) -> Write:
        client = self.clients[data.draw(st.sampled_from(CLIENTS), label="client")]
        seq = client.next_seq + data.draw(st.integers(0, 2), label="seq gap")
        client.next_seq = seq + 1
        if data.draw(st.booleans(), label="advance ack"):
            client.last_ack = data.draw(st.integers(client.last_ack, seq - 1), label="ack")
        ks = data.draw(st.sampled_from(KEYSPACE_IDS), label="ks")
        mutations = []
        for _ in range(data.draw(st.integers(1, 4), label="ops")):
            kind = data.draw(st.sampled_from([PUT, DELETE, CAS]), label="kind")
            key = data.draw(st.sampled_from(USER_KEYS), label="key")
            if kind == PUT:
                mutations.append(Mutation(PUT, ls_of(key), key, data.draw(st.sampled_from(VALUES))))
            elif kind == DELETE:
                mutations.append(Mutation(DELETE, ls_of(key), key))
            else:
                current = self.model.get((ks, key))
                choice = data.draw(st.sampled_from(["current", "current", "wrong", "none"]))
                if choice == "current":
                    expected = current
                elif choice == "none":
                    expected = None
                else:
                    expected = data.draw(
                        st.sampled_from([v for v in [None, *VALUES] if v != current])
                    )
                value = data.draw(st.sampled_from(VALUES), label="value")
                mutations.append(Mutation(CAS, ls_of(key), key, value, expected))
        return Write(ks, client.cid, seq, client.last_ack, tuple(mutations))

    def _draw_retry(self, data: st.DataObject, above_floor_only: bool) -> Write | None:
        candidates = [
            (cid, seq)
            for cid, client in self.clients.items()
            for seq, (write, _) in client.history.items()
            if not above_floor_only or seq > client.floor_of(write)
        ]
        if not candidates:
            return None
        cid, seq = data.draw(st.sampled_from(candidates), label="retry of")
        return self.clients[cid].history[seq][0]

    # -- applying ------------------------------------------------------------

    def _apply_and_check(
        self,
        index: int,
        commands: list[Command],
        expected: list[Any],
        data_keys: set[bytes],
        dedup_clients: set[bytes],
    ) -> None:
        payload = encode_commands(commands)
        out = apply_entry(MemoryState(self.store), index, payload)
        assert out.error is None
        assert out.results is not None
        assert len(out.results) == len(expected)
        for got, want in zip(out.results, expected, strict=True):
            if want == OUTCOME_UNKNOWN:
                assert is_outcome_unknown(got), got
            else:
                assert got == want
        assert out.writes[layout.APPLIED_KEY] == layout.encode_index(index)
        written_data = {k for k in out.writes if k.startswith(layout.DATA_PREFIX)}
        assert written_data == data_keys, "a write changed keys it should not have"
        written_dedup = {k for k in out.writes if k.startswith(layout.DEDUP_PREFIX)}
        # only clients with a fresh write in this entry get their dedup state written
        assert {k[9:25] for k in written_dedup} == dedup_clients
        assert set(out.writes) - {layout.KEY_COUNT_KEY} == (
            {layout.APPLIED_KEY} | written_data | written_dedup)
        commit(self.store, out)
        self.entries.append((index, payload))

    @rule(data=st.data())
    def apply_entry_of_commands(self, data: st.DataObject) -> None:
        """One entry with 1-4 commands: fresh writes, retries and barriers."""
        self.index += data.draw(st.integers(1, 3), label="index step")  # gaps are allowed
        index = self.index
        commands: list[Command] = []
        expected: list[Any] = []
        data_keys: set[bytes] = set()
        dedup_clients: set[bytes] = set()
        for _ in range(data.draw(st.integers(1, 4), label="commands")):
            what = data.draw(st.sampled_from(["write", "write", "write", "retry", "barrier"]))
            if what == "barrier":
                commands.append(Barrier())
                expected.append({"i": index})
                continue
            if what == "retry":
                write = self._draw_retry(data, above_floor_only=False)
                if write is not None:
                    commands.append(write)
                    expected.append(self._expected_retry(write.client_id, write.seq))
                    continue
            write = self._draw_write(data)
            result = self._model_write(write, index)
            client = self.clients[write.client_id]
            client.history[write.seq] = (write, result)
            client.floors[home(write)] = max(client.floor_of(write),
                                             min(write.ack_seq, write.seq - 1),
                                             write.seq - DEDUP_RESULTS_MAX)
            commands.append(write)
            expected.append(result)
            dedup_clients.add(write.client_id)
            if "r" in result:
                data_keys |= {dkey(write.keyspace_id, m.key) for m in write.mutations}
        self._apply_and_check(index, commands, expected, data_keys, dedup_clients)

    @precondition(lambda self: any(
        seq > c.floor_of(w) for c in self.clients.values() for seq, (w, _) in c.history.items()))
    @rule(data=st.data())
    def retry_in_a_later_entry(self, data: st.DataObject) -> None:
        """Re-send writes whose results are still remembered: same results as
        the first time, and nothing changes."""
        self.index += 1
        writes = [self._draw_retry(data, above_floor_only=True)
                  for _ in range(data.draw(st.integers(1, 3), label="retries"))]
        commands: list[Command] = [w for w in writes if w is not None]
        expected = []
        for write in commands:
            assert isinstance(write, Write)
            first = self.clients[write.client_id].history[write.seq][1]
            expected.append(without_cur(first))
        before = dict(self.model)
        self._apply_and_check(self.index, commands, expected, set(), set())
        assert self.model == before

    @precondition(lambda self: bool(self.entries))
    @rule(data=st.data())
    def replay_an_applied_entry(self, data: st.DataObject) -> None:
        """Apply an already applied entry again at its own index on the current
        store: dedup alone keeps the data unchanged (the layer above also skips
        index <= !applied, which we do not rely on here)."""
        index, payload = data.draw(
            st.sampled_from(self.entries) | st.just(self.entries[-1]), label="entry"
        )
        out = apply_entry(MemoryState(self.store), index, payload)
        assert out.error is None
        assert out.writes == {layout.APPLIED_KEY: layout.encode_index(index)}
        assert out.results is not None
        for command, got in zip(decode_commands(payload), out.results, strict=True):
            if isinstance(command, Barrier):
                assert got == {"i": index}
            else:
                want = self._expected_retry(command.client_id, command.seq)
                if want == OUTCOME_UNKNOWN:
                    assert is_outcome_unknown(got), got
                else:
                    assert got == want
        # not committed: committing would move !applied backwards

    @rule(
        prefix=st.sampled_from(["none", "barrier", "write"]),
        bad=st.sampled_from(range(30)),
    )
    def apply_malformed_entry(self, prefix: str, bad: int) -> None:
        self.index += 1
        cid = CLIENTS[0]
        seq = self.clients[cid].next_seq  # would be fresh if it were applied
        good: list[Any] = []
        if prefix == "barrier":
            good = [["b"]]
        elif prefix == "write":
            good = [["w", 0, cid, seq, 0, [[PUT, ls_of(b"a"), b"a", b"nope"]]]]
        payload = _malformed(bad, good)
        out = apply_entry(MemoryState(self.store), self.index, payload)
        assert isinstance(out.error, str) and out.error
        assert str(self.index) in out.error
        assert out.results is None
        assert out.writes == {layout.APPLIED_KEY: layout.encode_index(self.index)}
        commit(self.store, out)

    # -- invariants ----------------------------------------------------------

    @invariant()
    def store_matches_model(self) -> None:
        assert user_data(self.store) == self.model

    @invariant()
    def applied_index(self) -> None:
        assert layout.decode_index(self.store.get(layout.APPLIED_KEY)) == self.index

    @invariant()
    def dedup_records(self) -> None:
        for client in self.clients.values():
            for ks in KEYSPACE_IDS:
                for ls in {ls_of(k) for k in USER_KEYS}:
                    state = dedup_state(self.store, client.cid, ks, ls)
                    mine = {s for s, (w, _) in client.history.items() if home(w) == (ks, ls)}
                    if not mine:
                        assert state is None
                        continue
                    assert state is not None
                    floor, seqs = state
                    assert floor == client.floors.get((ks, ls), 0)
                    assert seqs == {s for s in mine if s > floor}


def _malformed(bad: int, good: list[Any]) -> bytes:
    cid = b"\x09" * 16

    def w(*fields: Any) -> list[Any]:
        return [*good, ["w", *fields]]

    def mut(m: Any) -> list[Any]:
        return w(0, cid, 1, 0, [[PUT, 1, b"k", b"v"], m])

    cases: list[Any] = [
        b"\xff",  # not cbor
        b"",
        cbor2.dumps({"w": 1}),  # not a list
        cbor2.dumps("w"),
        cbor2.dumps(None),
        [*good, ["x"]],  # unknown command
        [*good, ["b", 1]],
        [*good, "b"],
        [*good, ["w", 0, cid, 1, 0]],  # write of the wrong length
        w("0", cid, 1, 0, []),
        w(0, "cid", 1, 0, []),
        w(0, cid, 1.5, 0, []),
        w(0, cid, 1, None, []),
        w(0, cid, 1, 0, {}),
        mut([3, 1, b"k", b"v"]),  # unknown mutation kind
        mut([PUT, 1, b"k"]),
        mut([PUT, 1, "k", b"v"]),
        mut([PUT, "1", b"k", b"v"]),
        mut([PUT, 1, b"k", None]),
        mut([DELETE, 1, b"k", b"v"]),
        mut([CAS, 1, b"k", b"v"]),
        mut([CAS, 1, b"k", "e", b"v"]),
        mut([CAS, 1, b"k", None, None]),
        mut(5),
        mut([PUT, -1, b"k", b"v"]),  # logical shard out of the u32 range
        mut([PUT, 2**32, b"k", b"v"]),
        w(-1, cid, 1, 0, [[PUT, 1, b"k", b"v"]]),  # keyspace id out of the u32 range
        w(2**32, cid, 1, 0, [[PUT, 1, b"k", b"v"]]),
        w(2**64, cid, 1, 0, [[DELETE, 1, b"k"]]),
        mut([DELETE, 2**40, b"k"]),
    ]
    case = cases[bad]
    return case if isinstance(case, bytes) else cbor2.dumps(case)


ApplyMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=30, deadline=None
)
TestApplyMachine = ApplyMachine.TestCase


# ---------------------------------------------------------------------------
# explicit cases


def _put(key: bytes, value: bytes) -> Mutation:
    return Mutation(PUT, ls_of(key), key, value)


def _delete(key: bytes) -> Mutation:
    return Mutation(DELETE, ls_of(key), key)


def _cas(key: bytes, expected: bytes | None, value: bytes) -> Mutation:
    return Mutation(CAS, ls_of(key), key, value, expected)


def _run(store: dict[bytes, bytes], index: int, *commands: Command) -> ApplyOutput:
    out = apply_entry(MemoryState(store), index, encode_commands(list(commands)))
    commit(store, out)
    return out


CID = b"\x42" * 16


def test_failing_cas_in_the_middle_of_a_batch_changes_nothing() -> None:
    store = owning_every_logical_shard()
    _run(store, 1, Write(0, CID, 1, 0, (_put(b"a", b"1"), _put(b"b", b"2"))))
    before = user_data(store)
    out = _run(store, 2, Write(0, CID, 2, 1, (
        _put(b"c", b"3"), _delete(b"a"), _cas(b"b", b"wrong", b"x"), _cas(b"a", b"1", b"y"),
    )))
    assert out.results == [{"i": 2, "err": "PRECONDITION_FAILED", "op": 2, "cur": b"2"}]
    assert user_data(store) == before
    assert not any(k.startswith(layout.DATA_PREFIX) for k in out.writes)


def test_cas_sees_the_earlier_ops_of_its_own_batch() -> None:
    store = owning_every_logical_shard()
    _run(store, 1, Write(0, CID, 1, 0, (_put(b"k", b"old"),)))
    out = _run(store, 2, Write(0, CID, 2, 1, (_delete(b"k"), _cas(b"k", None, b"new"))))
    assert out.results == [{"i": 2, "r": [True, True]}]
    out = _run(store, 3, Write(0, CID, 3, 2, (_put(b"k", b"mid"), _cas(b"k", b"new", b"x"))))
    assert out.results == [{"i": 3, "err": "PRECONDITION_FAILED", "op": 1, "cur": b"mid"}]
    assert user_data(store) == {(0, b"k"): b"new"}


def test_cas_on_absent_key_reports_cur_none() -> None:
    store = owning_every_logical_shard()
    out = _run(store, 1, Write(0, CID, 1, 0, (_cas(b"a", b"x", b"y"),)))
    assert out.results == [{"i": 1, "err": "PRECONDITION_FAILED", "op": 0, "cur": None}]
    out = _run(store, 2, Write(0, CID, 2, 0, (_cas(b"a", None, b"y"),)))
    assert out.results == [{"i": 2, "r": [True]}]
    assert user_data(store) == {(0, b"a"): b"y"}


def test_delete_reports_whether_the_key_existed() -> None:
    store = owning_every_logical_shard()
    out = _run(store, 1, Write(0, CID, 1, 0, (
        _delete(b"a"), _put(b"a", b""), _delete(b"a"), _delete(b"a"),
    )))
    # an empty value is a value: the key exists
    assert out.results == [{"i": 1, "r": [False, None, True, False]}]
    assert user_data(store) == {}


def test_keyspaces_are_separate() -> None:
    store = owning_every_logical_shard()
    _run(store, 1, Write(0, CID, 1, 0, (_put(b"a", b"zero"),)))
    out = _run(store, 2, Write(5, CID, 2, 0, (_cas(b"a", None, b"five"), _delete(b"b"))))
    assert out.results == [{"i": 2, "r": [True, False]}]
    assert user_data(store) == {(0, b"a"): b"zero", (5, b"a"): b"five"}


def test_retry_returns_the_first_result_and_changes_nothing() -> None:
    store = owning_every_logical_shard()
    first = Write(0, CID, 1, 0, (_put(b"a", b"1"), _delete(b"b")))
    out1 = _run(store, 1, first)
    _run(store, 2, Write(0, CID, 2, 0, (_put(b"a", b"2"),)))
    out3 = _run(store, 3, first)
    assert out3.results == out1.results == [{"i": 1, "r": [None, False]}]
    assert user_data(store) == {(0, b"a"): b"2"}
    assert set(out3.writes) == {layout.APPLIED_KEY}


def test_ack_forgets_results() -> None:
    store = owning_every_logical_shard()
    writes = [Write(0, CID, seq, 0, (_put(b"a", str(seq).encode()),)) for seq in (1, 2, 3)]
    for index, write in enumerate(writes, start=1):
        _run(store, index, write)
    _run(store, 4, Write(0, CID, 4, 2, (_put(b"a", b"4"),)))  # the same logical shard
    assert dedup_state(store, CID, 0, ls_of(b"a")) == (2, {3, 4})
    out = _run(store, 5, writes[1], writes[2])
    assert out.results is not None
    assert is_outcome_unknown(out.results[0])
    assert out.results[1] == {"i": 3, "r": [None]}
    assert user_data(store) == {(0, b"a"): b"4"}


def test_same_write_twice_in_one_entry_applies_once() -> None:
    store = owning_every_logical_shard()
    write = Write(0, CID, 1, 0, (_delete(b"a"), _put(b"a", b"x")))
    _run(store, 1, Write(0, b"\x01" * 16, 1, 0, (_put(b"a", b"old"),)))
    out = _run(store, 2, write, write)
    assert out.results == [{"i": 2, "r": [True, None]}, {"i": 2, "r": [True, None]}]


def test_malformed_entry_writes_only_the_applied_index() -> None:
    store = owning_every_logical_shard()
    _run(store, 1, Write(0, CID, 1, 0, (_put(b"a", b"1"),)))
    snapshot = dict(store)
    out = apply_entry(MemoryState(store), 2, b"\x82\x81\x61b")  # truncated cbor
    assert out.error is not None and "2" in out.error
    assert out.results is None
    assert out.writes == {layout.APPLIED_KEY: layout.encode_index(2)}
    commit(store, out)
    snapshot[layout.APPLIED_KEY] = layout.encode_index(2)
    assert store == snapshot


def test_barrier_answers_its_index() -> None:
    store = owning_every_logical_shard()
    out = _run(store, 77, Barrier(), Barrier())
    assert out.results == [{"i": 77}, {"i": 77}]
    assert out.writes == {layout.APPLIED_KEY: layout.encode_index(77)}


def test_dedup_window_is_bounded() -> None:
    """A client that never acks keeps at most DEDUP_RESULTS_MAX results; the
    oldest are forgotten and a retry of one gets OUTCOME_UNKNOWN."""
    store = owning_every_logical_shard()
    total = DEDUP_RESULTS_MAX + 10
    writes = [Write(0, CID, seq, 0, (_put(b"{w}k%d" % (seq % 7), b"%d" % seq),))
              for seq in range(1, total + 1)]
    firsts: dict[int, Any] = {}
    index = 0
    position = 0
    while position < total:
        # many writes per entry to keep it quick, then one per entry near the bound
        chunk = writes[position : position + (37 if position < 990 else 1)]
        position += len(chunk)
        index += 1
        out = _run(store, index, *chunk)
        assert out.results is not None
        for write, result in zip(chunk, out.results, strict=True):
            assert result == {"i": index, "r": [None]}
            firsts[write.seq] = result
        state = dedup_state(store, CID, 0, ls_of(b"{w}k"))
        assert state is not None
        assert len(state[1]) <= DEDUP_RESULTS_MAX
    state = dedup_state(store, CID, 0, ls_of(b"{w}k"))
    assert state is not None
    floor, seqs = state
    assert len(seqs) == DEDUP_RESULTS_MAX
    assert min(seqs) == total - DEDUP_RESULTS_MAX + 1 == 11
    assert floor == 10
    data = user_data(store)
    index += 1
    out = _run(store, index, writes[0], writes[9], writes[10], writes[-1])
    assert out.results is not None
    assert is_outcome_unknown(out.results[0])
    assert is_outcome_unknown(out.results[1])
    assert out.results[2] == firsts[11]
    assert out.results[3] == firsts[total]
    assert user_data(store) == data


# -- ownership (DESIGN section 4) ------------------------------------------------

def test_a_write_to_a_logical_shard_the_group_does_not_own_changes_nothing() -> None:
    store: dict[bytes, bytes] = {}
    out = _run(store, 1, Write(0, CID, 1, 0, (_put(b"a", b"1"),)))
    assert out.results == [{"i": 1, "err": "WRONG_SHARD", "ks": 0, "ls": ls_of(b"a")}]
    assert out.writes == {layout.APPLIED_KEY: layout.encode_index(1)}
    # nothing was stored for a retry: once the group owns the shard, it applies
    out = _run(store, 2, Own(0, "default", 256, (ls_of(b"a"),)),
               Write(0, CID, 1, 0, (_put(b"a", b"1"),)))
    assert out.results == [{"i": 2}, {"i": 2, "r": [None]}]
    assert user_data(store) == {(0, b"a"): b"1"}
    assert store[layout.keyspace_key("default")] == layout.encode_keyspace(0, 256)


def test_a_write_touching_one_unowned_shard_is_refused_whole() -> None:
    store: dict[bytes, bytes] = {}
    _run(store, 1, Own(0, "default", 256, (ls_of(b"a"),)))
    assert ls_of(b"a") != ls_of(b"b")
    out = _run(store, 2, Write(0, CID, 1, 0, (_put(b"a", b"1"), _put(b"b", b"2"))))
    assert out.results is not None and out.results[0]["err"] == "WRONG_SHARD"
    assert user_data(store) == {}


def test_own_is_idempotent_and_keeps_existing_records() -> None:
    store: dict[bytes, bytes] = {}
    _run(store, 1, Own(3, "ks", 16, (1, 2)))
    before = dict(store)
    out = _run(store, 2, Own(3, "ks", 16, (1, 2)))
    assert set(out.writes) == {layout.APPLIED_KEY, layout.keyspace_key("ks")}
    del store[layout.APPLIED_KEY], before[layout.APPLIED_KEY]
    assert store == before


def test_key_count_follows_puts_deletes_and_cas() -> None:
    store = owning_every_logical_shard()

    def count() -> int:
        return layout.decode_index(store.get(layout.KEY_COUNT_KEY))

    _run(store, 1, Write(0, CID, 1, 0, (_put(b"a", b"1"), _put(b"b", b"1"), _put(b"a", b"2"))))
    assert count() == 2
    _run(store, 2, Write(0, CID, 2, 1, (_cas(b"c", None, b"1"), _cas(b"a", b"2", b"3"))))
    assert count() == 3
    _run(store, 3, Write(0, CID, 3, 2, (_delete(b"a"), _delete(b"zz"))))
    assert count() == 2
    _run(store, 4, Write(0, CID, 4, 3, (_cas(b"b", b"wrong", b"x"), _delete(b"b"))))
    assert count() == 2  # the failed cas undid the delete


def test_drop_stops_serving_and_deletes_in_chunks() -> None:
    store: dict[bytes, bytes] = {}
    keys = [b"k%d" % i for i in range(25)]
    _run(store, 1, Own(7, "gone", 256, tuple(range(256))), Own(8, "kept", 256, (ls_of(b"x"),)))
    _run(store, 2, Write(7, CID, 1, 0, tuple(_put(k, b"v") for k in keys)),
         Write(8, CID, 2, 1, (_put(b"x", b"v"),)))
    results = []
    index = 3
    while True:
        out = _run(store, index, DropKeyspace(7, "gone", 10))
        assert out.results is not None
        results.append(out.results[0])
        index += 1
        if not out.results[0]["more"]:
            break
    assert [r["deleted"] for r in results] == [10, 10, 5]
    assert user_data(store) == {(8, b"x"): b"v"}
    assert layout.decode_index(store[layout.KEY_COUNT_KEY]) == 1
    assert layout.keyspace_key("gone") not in store
    assert not any(k.startswith(layout.owner_prefix(7)) for k in store)
    out = _run(store, index, Write(7, CID, 3, 2, (_put(b"k1", b"v"),)))
    assert out.results is not None and out.results[0]["err"] == "WRONG_SHARD"


def test_admin_commands_round_trip_and_reject_garbage() -> None:
    commands: list[Command] = [Own(1, "a", 64, (0, 63)), DropKeyspace(1, "a", 500)]
    assert decode_commands(encode_commands(commands)) == commands
    for bad in (["own", 1, "a", 64], ["own", -1, "a", 64, []], ["own", 1, 2, 64, []],
                ["drop", 1, "a", "x"], ["own", 1, "a", 64, ["x"]]):
        with pytest.raises(MalformedEntry):
            decode_commands(cbor2.dumps([bad]))


def test_a_floor_that_jumps_deletes_only_the_results_that_exist() -> None:
    """A client's seqs are spread over every logical shard it writes, so the
    floor of one logical shard jumps by hundreds at a time. The write must
    delete the few results stored there, not touch every seq in between: the
    benchmark found puts 4x slower when it did."""
    store = owning_every_logical_shard()
    _run(store, 1, Write(0, CID, 1, 0, (_put(b"a", b"1"),)))
    out = _run(store, 2, Write(0, CID, 900, 899, (_put(b"a", b"2"),)))
    ls = ls_of(b"a")
    deleted = [k for k, v in out.writes.items() if v is None]
    assert deleted == [layout.dedup_result_key(0, ls, CID, 1)]
    assert len(out.writes) <= 6
    assert dedup_state(store, CID, 0, ls) == (899, {900})


def test_dedup_records_of_an_earlier_version_still_answer_retries() -> None:
    """Earlier versions kept a bare u64 floor (or, before a client's floor rose,
    no floor record at all) beside one key per stored result. A retry of such a
    write returns its stored result instead of applying again, and the next
    write lists what is stored in the floor record."""
    store = owning_every_logical_shard()
    ls = ls_of(b"a")
    stored = {"i": 7, "r": [None]}
    store[layout.dedup_result_key(0, ls, CID, 1)] = cbor2.dumps(stored)  # no floor record
    other = b"\x43" * 16
    store[layout.dedup_key(0, ls, other)] = layout.encode_index(4)  # a bare floor
    store[layout.dedup_result_key(0, ls, other, 6)] = cbor2.dumps(stored)
    out = _run(store, 10, Write(0, CID, 1, 0, (_put(b"a", b"again"),)),
               Write(0, other, 6, 4, (_put(b"a", b"again"),)))
    assert out.results == [stored, stored]
    assert layout.data_key(0, ls, b"a") not in store  # neither applied a second time
    _run(store, 11, Write(0, other, 8, 5, (_put(b"a", b"new"),)))
    assert layout.decode_dedup_floor(store[layout.dedup_key(0, ls, other)]) == (5, [6, 8])
    assert dedup_state(store, other, 0, ls) == (5, {6, 8})

"""Moving a logical shard between two groups, on the pure state machine
(raftkv/statemachine/moves.py through apply_entry): every step, its
idempotency and refusals, and whole moves with client writes interleaved at
random, steps re-issued, and aborts at any point."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.sharding import logical_shard
from raftkv.statemachine import layout
from raftkv.statemachine.commands import (
    CAS,
    DELETE,
    PUT,
    MalformedEntry,
    Mutation,
    Write,
    decode_commands,
    encode_commands,
)
from raftkv.statemachine.moves import MoveStep, is_cutover
from tests.move_support import (
    A_ID,
    B_ID,
    CLIENTS,
    KEYS,
    KS,
    LS,
    MOVE,
    NAME,
    OTHER_KEY,
    TOTAL,
    Group,
    put,
    source,
)


def copy_page(a: Group, b: Group, page: int) -> bool:
    """One page of the worker's bulk copy (A's keys of the logical shard after
    B's cursor, read now); True once nothing is left."""
    cursor = b.owner().cursor
    todo = [(k, v) for k, v in sorted(a.shard_keys().items()) if k > cursor][:page]
    if not todo:
        return True
    b.step("ingest", cursor=cursor, next=todo[-1][0], kvs=[list(p) for p in todo])
    return False


def copy_all(a: Group, b: Group, page: int) -> None:
    b.step("prepare", name=NAME, total=TOTAL)
    while not copy_page(a, b, page):
        pass


def ship_changelog(a: Group, b: Group, upto: int, chunk: int) -> None:
    applied = b.owner().seq
    while applied < upto:
        records = []
        for seq in range(applied + 1, min(upto, applied + chunk) + 1):
            raw = a.state.get(layout.changelog_key(MOVE, seq))
            assert raw is not None, f"changelog record {seq} missing"
            records.append(cbor2.loads(raw))
        applied = b.step("delta", records=records, **{"from": applied + 1})["seq"]


# -- single steps -------------------------------------------------------------------------


def test_a_move_step_round_trips_and_bad_ones_are_refused_at_decode() -> None:
    step = MoveStep("ingest", KS, LS, MOVE, {"cursor": b"", "next": b"d", "kvs": [[b"d", b"v"]]})
    assert decode_commands(encode_commands([step])) == [step]
    for bad in ({"cursor": b"", "next": b"d", "kvs": [[b"d", 3]]}, {"cursor": 1},
                {"next": b"", "kvs": []}):
        with pytest.raises(MalformedEntry):
            decode_commands(encode_commands([MoveStep("ingest", KS, LS, MOVE, bad)]))
    with pytest.raises(MalformedEntry):
        decode_commands(encode_commands([MoveStep("teleport", KS, LS, MOVE, {})]))


def test_clients_are_refused_while_the_shard_is_incoming_frozen_or_moved() -> None:
    a, b = source(), Group()
    assert a.run(put(CLIENTS[0], 1, KEYS[0], b"v"))[0]["r"] == [None]
    assert b.step("prepare", name=NAME, total=TOTAL) == {"cursor": b"", "seq": 0, "i": 1}
    assert b.run(put(CLIENTS[0], 9, KEYS[1], b"v"))[0]["err"] == "SHARD_MOVING"
    a.step("capture")
    assert a.run(put(CLIENTS[0], 2, KEYS[1], b"w"))[0]["r"] == [None]  # capturing: served
    assert a.step("freeze") == {"seq": 1, "i": a.index}
    assert a.run(put(CLIENTS[0], 3, KEYS[2], b"x"))[0]["err"] == "SHARD_MOVING"
    assert a.run(put(CLIENTS[1], 1, OTHER_KEY, b"y"))[0]["r"] == [None]  # other shards: served
    assert a.step("moved", dest=B_ID)["moved"] is True
    refused = a.run(put(CLIENTS[0], 4, KEYS[2], b"x"))[0]
    assert refused["err"] == "WRONG_SHARD" and refused["dest"] == B_ID


def test_each_step_is_idempotent() -> None:
    a, b = source(), Group()
    a.run(put(CLIENTS[0], 1, KEYS[0], b"v"))
    for _ in range(2):
        assert b.step("prepare", name=NAME, total=TOTAL)["cursor"] == b""
        assert a.step("capture")["seq"] == 0
    a.run(put(CLIENTS[0], 2, KEYS[1], b"w"))
    copy_all(a, b, page=1)
    copy_all(a, b, page=1)  # a second copy finds its cursor at the end
    for _ in range(2):
        assert a.step("freeze")["seq"] == 1
    ship_changelog(a, b, 1, 5)
    stale = b.step("delta", records=[[]], **{"from": 1})
    assert stale["stale"] is True and stale["seq"] == 1
    for _ in range(2):
        assert b.step("activate", seq=1)["active"] is True
        assert a.step("moved", dest=B_ID)["moved"] is True
    assert b.shard_keys() == a.shard_keys()


def test_activate_needs_every_change_and_abort_wins_over_a_late_activate() -> None:
    a, b = source(), Group()
    b.step("prepare", name=NAME, total=TOTAL)
    a.step("capture")
    a.run(put(CLIENTS[0], 1, KEYS[0], b"v"))
    a.step("freeze")
    assert b.step("activate", seq=1)["stale"] is True  # change 1 not shipped yet
    assert b.step("abort") == {"aborted": True, "i": b.index}
    ship = b.step("delta", records=[[]], **{"from": 1})
    assert ship["err"] == "MOVE_REFUSED"
    assert b.step("activate", seq=0)["err"] == "MOVE_REFUSED"
    assert b.step("prepare", name=NAME, total=TOTAL)["err"] == "MOVE_REFUSED"
    assert b.run(put(CLIENTS[0], 1, KEYS[0], b"v"))[0]["err"] == "WRONG_SHARD"
    assert a.step("unfreeze")["active"] is True
    assert a.run(put(CLIENTS[0], 2, KEYS[1], b"again"))[0]["r"] == [None]
    assert a.state.scan(layout.changelog_prefix(MOVE),
                        layout.prefix_end(layout.changelog_prefix(MOVE)), 10) == []
    assert a.step("moved", dest=B_ID)["err"] == "MOVE_REFUSED"  # the move is over


def test_abort_is_refused_once_activated() -> None:
    a, b = source(), Group()
    b.step("prepare", name=NAME, total=TOTAL)
    a.step("capture")
    a.step("freeze")
    assert b.step("activate", seq=0)["active"] is True
    assert b.step("abort")["err"] == "MOVE_REFUSED"
    assert b.owner().state == "ACTIVE"


def test_ingest_refuses_keys_outside_the_moving_shard() -> None:
    b = Group()
    b.step("prepare", name=NAME, total=TOTAL)
    foreign = layout.data_key(KS, (LS + 1) % TOTAL, b"k")
    result = b.step("ingest", cursor=b"", next=foreign, kvs=[[foreign, b"v"]])
    assert result["err"] == "MOVE_REFUSED" and "not in the moving" in result["msg"]
    assert b.state.get(foreign) is None


def test_cleanup_and_purge_delete_in_chunks() -> None:
    a, b = source(), Group()
    for i, key in enumerate(KEYS):
        a.run(put(CLIENTS[0], i + 1, key, b"v"))
    a.run(put(CLIENTS[1], 1, OTHER_KEY, b"stays"))
    b.step("prepare", name=NAME, total=TOTAL)
    a.step("capture")
    copy_all(a, b, page=5)
    a.step("freeze")
    b.step("activate", seq=0)
    a.step("moved", dest=B_ID)
    rounds = 0
    while a.step("cleanup", n=5)["more"]:
        rounds += 1
    assert rounds >= 3
    assert a.shard_keys() == {}
    assert a.user_key_count() == 1 == len([k for k in a.state.data if k.startswith(b"d")])
    assert b.user_key_count() == len(KEYS)
    c = Group()  # a destination that aborted after copying some
    c.step("prepare", name=NAME, total=TOTAL)
    copy_all(a if a.shard_keys() else b, c, page=4)
    c.step("abort")
    while c.step("purge", n=3)["more"]:
        pass
    assert c.shard_keys() == {} and c.user_key_count() == 0


def test_a_logical_shard_moves_back_into_a_group_once_its_old_copy_is_gone() -> None:
    a, b = source(), Group()
    for i, key in enumerate(KEYS[:4]):
        a.run(put(CLIENTS[0], i + 1, key, b"v%d" % i))
    b.step("prepare", name=NAME, total=TOTAL)
    a.step("capture")
    copy_all(a, b, page=3)
    a.step("freeze")
    b.step("activate", seq=0)
    a.step("moved", dest=B_ID)
    back = MOVE + 1

    def step_back(group: Group, what: str, **data: Any) -> dict[str, Any]:
        result: dict[str, Any] = group.run(MoveStep(what, KS, LS, back, data))[0]
        return result

    # A still holds the old copy: a move back is refused until cleanup ends.
    assert step_back(a, "prepare", name=NAME, total=TOTAL)["err"] == "MOVE_REFUSED"
    while a.step("cleanup", n=2)["more"]:
        pass
    assert step_back(a, "prepare", name=NAME, total=TOTAL) == {"cursor": b"", "seq": 0,
                                                               "i": a.index}
    assert b.run(put(CLIENTS[0], 10, KEYS[0], b"at-b"))[0]["r"] == [None]
    step_back(b, "capture")
    after = b""
    while True:
        page = [[k, v] for k, v in sorted(b.shard_keys().items()) if k > after][:2]
        if not page:
            break
        assert step_back(a, "ingest", cursor=after, next=page[-1][0], kvs=page)["cursor"]
        after = page[-1][0]
    assert step_back(b, "freeze")["seq"] == 0
    assert step_back(a, "activate", seq=0)["active"] is True
    assert step_back(b, "moved", dest=A_ID)["moved"] is True
    assert a.owner().state == "ACTIVE" and b.owner().state == "MOVED"
    assert a.shard_keys() == b.shard_keys()
    assert a.run(put(CLIENTS[0], 11, KEYS[1], b"home"))[0]["r"] == [None]
    # An abort of a later move finds the tombstone and replaces it.
    again = MOVE + 2
    assert b.run(MoveStep("abort", KS, LS, again, {}))[0]["aborted"] is True
    assert b.owner().state == "ABORTED" and b.owner().move == again


def test_a_turned_back_move_cannot_capture_again_and_an_activated_copy_says_so() -> None:
    # A capture that arrives after the move was turned back (its worker lost the
    # move) is refused, whether or not the capture had landed before.
    for captured_first in (False, True):
        a = source()
        if captured_first:
            a.step("capture")
        assert a.step("unfreeze")["active"] is True
        assert a.step("capture")["err"] == "MOVE_REFUSED"
        assert a.step("freeze")["err"] == "MOVE_REFUSED"
        assert a.owner().state == "ACTIVE" and not a.owner().capturing
        assert a.run(put(CLIENTS[0], 1, KEYS[0], b"v"))[0]["r"] == [None]
    # A worker redoing the copy or the ship after its predecessor activated.
    a, b = source(), Group()
    b.step("prepare", name=NAME, total=TOTAL)
    a.step("capture")
    a.step("freeze")
    b.step("activate", seq=0)
    assert b.step("ingest", cursor=b"", next=b"", kvs=[]) == {"active": True, "i": b.index}
    assert b.step("delta", records=[], **{"from": 1}) == {"active": True, "i": b.index}


def test_the_cutover_in_two_entries_freeze_with_records_and_delta_with_activate() -> None:
    a, b = source(), Group()
    b.step("prepare", name=NAME, total=TOTAL)
    a.step("capture")
    for i in range(3):
        a.run(put(CLIENTS[0], i + 1, KEYS[i], b"v%d" % i))
    ship_changelog(a, b, 1, 1)  # the catch-up shipped record 1
    frozen = a.step("freeze", dest=B_ID, **{"from": 2})
    assert frozen["seq"] == 3 and frozen["from"] == 2 and len(frozen["records"]) == 2
    assert "more" not in frozen
    assert a.step("freeze", dest=B_ID, **{"from": 2}) == {**frozen, "i": a.index}  # idempotent
    refused = a.run(put(CLIENTS[0], 9, KEYS[0], b"x"))[0]
    assert refused["err"] == "SHARD_MOVING" and refused["dest"] == B_ID
    # Records short of the final seq do not activate.
    partial = b.step("delta", records=frozen["records"][:1], activate=3, **{"from": 2})
    assert partial["seq"] == 2 and "active" not in partial and b.owner().state == "INCOMING"
    done = b.step("delta", records=frozen["records"][1:], activate=3, **{"from": 3})
    assert done["active"] is True and b.owner().state == "ACTIVE"
    assert b.run(put(CLIENTS[0], 10, KEYS[0], b"at-b"))[0]["r"] == [None]
    assert b.step("activate", seq=3)["active"] is True


# -- whole moves ---------------------------------------------------------------------------

actions = st.lists(st.one_of(
    st.tuples(st.just("write"), st.sampled_from(CLIENTS), st.sampled_from(KEYS),
              st.sampled_from([PUT, PUT, DELETE, CAS])),
    st.tuples(st.just("retry"), st.integers(0, 50)),
    st.tuples(st.just("step"), st.integers(1, 2)),
), min_size=1, max_size=80)


@settings(max_examples=150, deadline=None)
@given(actions=actions, page=st.integers(1, 7), chunk=st.integers(1, 4),
       abort_at=st.one_of(st.none(), st.integers(0, 8)))
def test_a_move_under_writes_moves_every_effect_exactly(
        actions: list[Any], page: int, chunk: int, abort_at: int | None) -> None:
    """Client writes (and retries) hit A while the move advances; B ends up with
    exactly A's keys of the logical shard at the freeze, retries are answered
    by whoever owns the shard with the first result, and an abort before the
    activation leaves A serving with nothing lost."""
    a, b = source(), Group()
    reference = source()  # the same accepted writes, on a group that never moves
    sent: list[tuple[Write, dict[str, Any]]] = []
    seqs = dict.fromkeys(CLIENTS, 0)
    phase = 0  # 0 nothing, 1 prepared, 2 capturing, 3 copied, 4 frozen+shipped, 5 active
    aborted = False
    frozen_keys: dict[bytes, bytes] = {}

    def owner_group() -> Group:
        return b if phase >= 5 and not aborted else a

    def advance() -> None:
        nonlocal phase, aborted, frozen_keys
        if abort_at is not None and phase == abort_at and phase < 5 and not aborted:
            assert b.step("abort")["aborted"] is True
            assert a.step("unfreeze")["active"] is True
            aborted = True
            return
        if aborted or phase >= 5:
            return
        if phase == 0:
            b.step("prepare", name=NAME, total=TOTAL)
        elif phase == 1:
            a.step("capture")
        elif phase == 2:
            if not copy_page(a, b, page):
                return  # more pages to go; client writes go on meanwhile
        elif phase == 3:
            final = a.step("freeze")["seq"]
            ship_changelog(a, b, final, chunk)
            frozen_keys = a.shard_keys()
        elif phase == 4:
            assert b.step("activate", seq=a.owner().seq)["active"] is True
            assert a.step("moved", dest=B_ID)["moved"] is True
        phase += 1

    for action in actions:
        if action[0] == "write":
            _, cid, key, kind = action
            seqs[cid] += 1
            ls = logical_shard(NAME, key, TOTAL)
            m = (Mutation(PUT, ls, key, b"%d" % seqs[cid]) if kind == PUT else
                 Mutation(DELETE, ls, key) if kind == DELETE else
                 Mutation(CAS, ls, key, b"c",
                          owner_group().state.get(layout.data_key(KS, ls, key))))
            write = Write(KS, cid, seqs[cid], max(0, seqs[cid] - 3), (m,))
            result = owner_group().run(write)[0]
            if result.get("err") not in ("SHARD_MOVING", "WRONG_SHARD"):
                sent.append((write, result))
                expected = reference.run(write)[0]
                assert {k: v for k, v in result.items() if k != "i"} == {
                    k: v for k, v in expected.items() if k != "i"}
        elif action[0] == "retry":
            if sent:
                write, first = sent[action[1] % len(sent)]
                again = owner_group().run(write)[0]
                if again.get("err") != "OUTCOME_UNKNOWN":  # forgotten after the client's ack
                    assert again == {k: v for k, v in first.items() if k != "cur"}
        else:
            for _ in range(action[1]):
                advance()
        if phase in (2, 3) and not aborted:  # re-issued steps find their work done
            assert a.step("capture")["seq"] == a.owner().seq
            assert b.step("prepare", name=NAME, total=TOTAL)["cursor"] == b.owner().cursor

    if phase >= 5 and not aborted:
        assert _without_indexes(b.shard_keys()) == _without_indexes(reference.shard_keys())
        assert b.user_key_count() == len([k for k in b.state.data if k.startswith(b"d")])
        while a.step("cleanup", n=3)["more"]:
            pass
        assert a.shard_keys() == {}
        assert a.owner().state == "MOVED" and a.owner().dest == B_ID
    else:
        assert _without_indexes(a.shard_keys()) == _without_indexes(reference.shard_keys())
    if aborted:
        assert a.owner().state == "ACTIVE" and not a.owner().capturing
        assert b.step("activate", seq=0)["err"] == "MOVE_REFUSED"
        while b.step("purge", n=3)["more"]:
            pass
        assert b.shard_keys() == {}
        assert a.run(put(CLIENTS[0], 999, KEYS[0], b"after"))[0]["r"] == [None]


def _without_indexes(keys: dict[bytes, bytes]) -> dict[bytes, Any]:
    """Stored results hold the log index they were applied at, which differs
    between groups; everything else must be equal."""
    out: dict[bytes, Any] = {}
    for k, v in keys.items():
        if k.startswith(layout.DEDUP_PREFIX) and len(k) == 1 + 8 + 16 + 8:
            out[k] = {f: x for f, x in cbor2.loads(v).items() if f != "i"}
        else:
            out[k] = v
    return out


def test_the_cutover_steps_are_the_freeze_and_the_activation() -> None:
    """Those the node proposes at once, past the proposer's window."""
    assert is_cutover("freeze", {"dest": 2, "from": 1})
    assert is_cutover("activate", {})
    assert is_cutover("delta", {"from": 3, "records": [], "activate": 5})
    for step, data in (("delta", {"from": 3, "records": []}), ("ingest", {}),
                       ("capture", {}), ("moved", {}), ("cleanup", {}), ("delta", None)):
        assert not is_cutover(step, data), step

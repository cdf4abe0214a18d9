"""The coordinator's side of resharding (shardmgr/moves.py): the plan, and
each move's phases driven against two pure groups by a worker that may die
after any step (a successor redoes the phase) and an operator who may abort
at any time."""

from __future__ import annotations

import random
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.statemachine import layout
from raftkv.statemachine.commands import PUT, Mutation, Write
from raftkv.statemachine.moves import MoveStep
from shardmgr.moves import FINAL, Move, MoveError, action, advance, plan, request_abort
from tests.move_support import KEYS, KS, LS, NAME, TOTAL, Group, source

# -- the plan ----------------------------------------------------------------------------

@given(assignment=st.lists(st.integers(1, 6), min_size=1, max_size=300),
       targets=st.sets(st.integers(1, 9), min_size=1, max_size=8))
def test_the_plan_balances_and_moves_as_little_as_possible(
        assignment: list[int], targets: set[int]) -> None:
    moves = plan(assignment, sorted(targets))
    after = list(assignment)
    for ls, src, dst in moves:
        assert after[ls] == src != dst and dst in targets
        after[ls] = dst
    assert len({ls for ls, _, _ in moves}) == len(moves)  # each logical shard moves once
    counts = [after.count(t) for t in targets]
    assert set(after) <= targets
    assert max(counts) - min(counts) <= 1
    # Minimal: a logical shard moves only off a non-target or an over-full target.
    base = len(assignment) // len(targets)
    must = sum(1 for s in assignment if s not in targets)
    over = sum(max(0, assignment.count(t) - (base + 1)) for t in targets)
    assert must + over <= len(moves) <= must + over + len(targets)
    assert plan(assignment, sorted(targets)) == moves  # deterministic


def test_split_two_to_eight_and_merge_eight_to_three() -> None:
    two = [ls % 2 + 1 for ls in range(256)]
    split = plan(two, list(range(1, 9)))
    assert len(split) == 256 - 2 * 32  # only what the new shards get moves
    eight = list(two)
    for ls, _, dst in split:
        eight[ls] = dst
    merge = plan(eight, [1, 2, 3])
    assert {src for _, src, _ in merge} == set(range(4, 9))  # 1..3 keep theirs, 4..8 empty
    assert all(dst in (1, 2, 3) for _, _, dst in merge)
    assert len(merge) == 256 - 32 - 32 - 32  # shards 1, 2, 3 keep what they hold


# -- the phases, against pure groups -------------------------------------------------------

class Worker:
    """Carries out actions the way the real worker will, against two groups."""

    def __init__(self, groups: dict[int, Group], rng: random.Random) -> None:
        self.groups = groups
        self.rng = rng
        self.published: dict[int, int] = {}

    def do(self, move: Move) -> dict[str, Any]:
        act = action(move)
        if act.kind == "step":
            assert act.shard is not None and act.step is not None
            result: dict[str, Any] = self.groups[act.shard].run(
                MoveStep(act.step, move.ks_id, move.ls, move.id, act.data))[0]
            return result
        src, dst = self.groups[move.src], self.groups[move.dst]
        if act.kind == "copy":
            owner = dst.owner()
            cursor = owner.cursor if owner is not None else b""
            keys = sorted(src.shard_keys().items())
            end = keys[-1][0] if keys else b""
            copied = 0
            while cursor < end:
                page = [(k, v) for k, v in keys if k > cursor][:self.rng.randint(1, 4)]
                got = dst.step("ingest", cursor=cursor, next=page[-1][0],
                               kvs=[list(p) for p in page])
                if "err" in got:
                    return got
                cursor = got["cursor"]
                copied += len(page)
            return {"keys": copied}
        if act.kind == "ship":
            applied = dst.owner().seq
            upto = act.data.get("upto")
            while True:
                raw = src.state.get(layout.changelog_key(move.id, applied + 1))
                if raw is None or (upto is not None and applied >= upto):
                    return {"seq": applied}
                got = dst.step("delta", records=[cbor2.loads(raw)], **{"from": applied + 1})
                if "err" in got:
                    return got
                applied = got["seq"]
        if act.kind == "publish":
            self.published[move.ls] = move.dst
            return {}
        return {}


def groups_with_data() -> dict[int, Group]:
    a = source()
    for i, key in enumerate(KEYS):
        a.run(Write(KS, b"c" * 16, i + 1, 0, (Mutation(PUT, LS, key, b"v%d" % i),)))
    return {1: a, 2: Group()}


def write(groups: dict[int, Group], owner: int, seq: int) -> dict[str, Any]:
    result: dict[str, Any] = groups[owner].run(
        Write(KS, b"w" * 16, seq, 0, (Mutation(PUT, LS, KEYS[seq % len(KEYS)], b"w%d" % seq),)))[0]
    return result


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**32), crash_rate=st.floats(0, 0.5),
       abort_after=st.one_of(st.none(), st.integers(0, 40)))
def test_a_move_finishes_or_turns_back_whatever_crashes_and_aborts(
        seed: int, crash_rate: float, abort_after: int | None) -> None:
    rng = random.Random(seed)
    groups = groups_with_data()
    # (The test Group applies steps for keyspace 3, logical shard LS and move 41.)
    move = Move(41, NAME, KS, TOTAL, LS, src=1, dst=2)
    worker = Worker(groups, rng)
    owner, seq, rounds = 1, 100, 0
    while move.phase not in FINAL:
        rounds += 1
        assert rounds < 500, move
        if abort_after is not None and rounds == abort_after:
            move = request_abort(move)
        if rng.random() < 0.5:  # clients write all along; refusals are fine
            seq += 1
            result = write(groups, owner, seq)
            assert result.get("err") in (None, "SHARD_MOVING", "WRONG_SHARD"), result
            if result.get("err") == "WRONG_SHARD" and result.get("dest") == 2:
                owner = 2  # the hint: the new group
        result = worker.do(move)
        if rng.random() < crash_rate:
            continue  # the worker died before reporting: a successor redoes the phase
        move = advance(move, result)
    a, b = groups[1].owner(), groups[2].owner()
    assert not (a is not None and a.state == "ACTIVE" and b is not None and b.state == "ACTIVE")
    if move.phase == "done":
        assert b.state == "ACTIVE" and a.state == "MOVED" and a.dest == 2
        assert groups[1].shard_keys() == {}
        assert worker.published == {LS: 2}
        assert {k[9:] for k in groups[2].shard_keys() if k[:1] == b"d"} >= set(KEYS)
    else:
        assert a.state == "ACTIVE" and not a.capturing
        assert b is not None and b.state == "ABORTED"
        assert groups[2].shard_keys() == {}
        assert {k[9:] for k in groups[1].shard_keys() if k[:1] == b"d"} >= set(KEYS)


def test_a_result_that_does_not_fit_stops_the_move() -> None:
    move = Move(41, NAME, KS, TOTAL, LS, src=1, dst=2, phase="capture")
    with pytest.raises(MoveError, match="capture"):
        advance(move, {"err": "MOVE_REFUSED", "msg": "capture needs an ACTIVE record",
                       "state": "MOVED", "move": 9})
    assert request_abort(Move(41, NAME, KS, TOTAL, LS, 1, 2, phase="moved")).phase == "moved"


def run_to_the_end(move: Move, worker: Worker) -> Move:
    for _ in range(100):
        if move.phase in FINAL:
            return move
        move = advance(move, worker.do(move))
    raise AssertionError(f"stuck at {move.phase}")


def move_to(phase: str, worker: Worker) -> Move:
    move = Move(41, NAME, KS, TOTAL, LS, src=1, dst=2)
    while move.phase != phase:
        move = advance(move, worker.do(move))
    return move


def test_an_abort_applied_first_refuses_the_activation_and_the_move_turns_back() -> None:
    groups = groups_with_data()
    worker = Worker(groups, random.Random(1))
    move = move_to("activate", worker)
    # Another coordinator (say, one that took over) aborted in the destination.
    assert groups[2].step("abort")["aborted"] is True
    move = advance(move, worker.do(move))
    assert move.phase == "unfreeze"
    assert run_to_the_end(move, worker).phase == "aborted"
    assert groups[1].owner().state == "ACTIVE" and groups[2].owner().state == "ABORTED"
    assert write(groups, 1, 500).get("err") is None


def test_an_activation_applied_first_refuses_the_abort_and_the_move_goes_on() -> None:
    groups = groups_with_data()
    worker = Worker(groups, random.Random(2))
    move = move_to("activate", worker)
    worker.do(move)  # activated, but the worker died before it reported
    move = request_abort(move)
    assert move.phase == "abort"
    move = advance(move, worker.do(move))
    assert move.phase == "moved"
    assert run_to_the_end(move, worker).phase == "done"
    assert groups[2].owner().state == "ACTIVE" and groups[1].owner().state == "MOVED"

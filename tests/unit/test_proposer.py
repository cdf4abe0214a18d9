"""Proposer: batching under an in-flight window, barriers shared by reads,
results handed back in order, and the timeout that fails a stale entry once.

The replica is a stand-in recording what would be proposed (this is the
batching logic, not Raft); the results are those apply_entry would give.
"""

from __future__ import annotations

from typing import Any

import trio

from raftkv.errors import RaftKVError, Timeout
from raftkv.server.proposer import Proposer
from raftkv.statemachine.commands import Barrier, Write, decode_commands


class HeldReplica:
    """Keeps each submitted entry until the test answers it."""

    def __init__(self) -> None:
        self.entries: list[tuple[list[Any], Any]] = []

    def submit(self, payload: bytes, on_done: Any) -> None:
        self.entries.append((decode_commands(payload), on_done))

    def answer(self, n: int) -> None:
        commands, on_done = self.entries[n]
        on_done([{"i": 100 + n} if isinstance(c, Barrier) else {"i": 100 + n, "r": [None]}
                 for c in commands], None)


def write(seq: int) -> Write:
    return Write(0, b"c" * 16, seq, seq - 1, ())


async def test_batches_wait_for_the_window_and_answer_in_order() -> None:
    replica = HeldReplica()
    proposer = Proposer(replica, trio.lowlevel.current_trio_token(), in_flight_max=2)  # type: ignore[arg-type]
    got: list[tuple[str, Any, RaftKVError | None]] = []
    for seq in range(1, 6):
        proposer.propose(write(seq), lambda r, e, s=seq: got.append((f"w{s}", r, e)))
    proposer.barrier(lambda r, e: got.append(("read-a", r, e)))
    proposer.barrier(lambda r, e: got.append(("read-b", r, e)))
    # two entries go out at once (one command each); the rest wait and batch
    assert [len(c) for c, _ in replica.entries] == [1, 1]
    replica.answer(0)
    await trio.testing.wait_all_tasks_blocked()
    # the freed slot takes everything pending: 3 writes and ONE barrier
    assert [len(c) for c, _ in replica.entries] == [1, 1, 4]
    assert sum(isinstance(c, Barrier) for c in replica.entries[2][0]) == 1
    replica.answer(1)
    replica.answer(2)
    await trio.testing.wait_all_tasks_blocked()
    assert [name for name, _, _ in got] == ["w1", "w2", "w3", "w4", "w5", "read-a", "read-b"]
    assert got[-1][1] == {"i": 102} and got[-2][1] == {"i": 102}
    assert all(e is None for _, _, e in got)


async def test_a_stale_entry_times_out_once_and_a_late_answer_is_ignored() -> None:
    replica = HeldReplica()
    proposer = Proposer(replica, trio.lowlevel.current_trio_token(), timeout_s=0.2)  # type: ignore[arg-type]
    got: list[tuple[Any, RaftKVError | None]] = []
    proposer.propose(write(1), lambda r, e: got.append((r, e)))
    await trio.sleep(0.1)
    proposer.expire_stale()
    assert got == []  # not stale yet
    await trio.sleep(0.2)
    proposer.expire_stale()
    proposer.expire_stale()
    assert len(got) == 1 and isinstance(got[0][1], Timeout) and not got[0][1].definite
    replica.answer(0)  # the entry commits after all: nobody hears twice
    await trio.testing.wait_all_tasks_blocked()
    assert len(got) == 1
    # and the window slot was freed: a new command goes out at once
    proposer.propose(write(2), lambda r, e: got.append((r, e)))
    assert len(replica.entries) == 2


async def test_an_urgent_command_goes_out_at_once_past_the_window() -> None:
    """A move's cutover steps do not wait behind the entry in flight; what is
    pending goes with them, and the window is respected again afterwards."""
    replica = HeldReplica()
    proposer = Proposer(replica, trio.lowlevel.current_trio_token(), in_flight_max=1)  # type: ignore[arg-type]
    got: list[str] = []
    proposer.propose(write(1), lambda r, e: got.append("w1"))
    proposer.propose(write(2), lambda r, e: got.append("w2"))
    assert [len(c) for c, _ in replica.entries] == [1]  # w2 waits for the window
    proposer.propose(write(3), lambda r, e: got.append("w3"), urgent=True)
    assert [len(c) for c, _ in replica.entries] == [1, 2]  # w2 and w3, now
    proposer.propose(write(4), lambda r, e: got.append("w4"))
    assert len(replica.entries) == 2  # two in flight: w4 waits
    replica.answer(0)
    await trio.testing.wait_all_tasks_blocked()
    assert got == ["w1"]
    assert len(replica.entries) == 2  # one still in flight, the window is full: w4 waits
    replica.answer(1)
    await trio.testing.wait_all_tasks_blocked()
    assert got == ["w1", "w2", "w3"]
    assert [len(c) for c, _ in replica.entries] == [1, 2, 1]
    assert proposer.urgent_proposed == 1


async def test_separate_commands_have_a_lane_of_their_own() -> None:
    """A move's steps (``separate``) go out in entries of their own, one in
    flight at a time, neither waiting behind the clients' window nor holding
    it: a client's write never waits a round behind a page of copied keys,
    nor a page behind a client's write."""
    replica = HeldReplica()
    proposer = Proposer(replica, trio.lowlevel.current_trio_token(), in_flight_max=1)  # type: ignore[arg-type]
    got: list[str] = []
    proposer.propose(write(1), lambda r, e: got.append("w1"))
    proposer.propose(write(2), lambda r, e: got.append("step2"), separate=True)
    assert [len(c) for c, _ in replica.entries] == [1, 1]  # the step did not wait for w1
    proposer.propose(write(3), lambda r, e: got.append("step3"), separate=True)
    proposer.propose(write(4), lambda r, e: got.append("step4"), separate=True)
    proposer.propose(write(5), lambda r, e: got.append("w5"))
    assert len(replica.entries) == 2  # one step in flight; w5 waits for w1's entry only
    replica.answer(0)
    await trio.testing.wait_all_tasks_blocked()
    assert got == ["w1"] and [len(c) for c, _ in replica.entries] == [1, 1, 1]  # w5 alone
    replica.answer(1)
    await trio.testing.wait_all_tasks_blocked()
    assert got == ["w1", "step2"] and [len(c) for c, _ in replica.entries] == [1, 1, 1, 2]
    replica.answer(3)
    replica.answer(2)
    await trio.testing.wait_all_tasks_blocked()
    assert got == ["w1", "step2", "step3", "step4", "w5"]
    proposer.expire(float("inf"), Timeout("closed"))  # nothing left over in either lane
    assert len(got) == 5


async def test_a_stale_step_of_the_separate_lane_times_out_and_frees_the_lane() -> None:
    replica = HeldReplica()
    proposer = Proposer(replica, trio.lowlevel.current_trio_token(), timeout_s=0.2)  # type: ignore[arg-type]
    got: list[tuple[str, RaftKVError | None]] = []
    proposer.propose(write(1), lambda r, e: got.append(("step1", e)), separate=True)
    proposer.propose(write(2), lambda r, e: got.append(("step2", e)), separate=True)
    assert len(replica.entries) == 1  # step2 waits for the lane
    await trio.sleep(0.3)
    proposer.expire_stale()
    assert [name for name, _ in got] == ["step1"] and isinstance(got[0][1], Timeout)
    assert len(replica.entries) == 2  # the lane went on with step2
    replica.answer(0)  # the late answer of step1 reaches nobody twice, frees nothing twice
    replica.answer(1)
    await trio.testing.wait_all_tasks_blocked()
    assert [name for name, _ in got] == ["step1", "step2"] and got[1][1] is None
    proposer.propose(write(3), lambda r, e: got.append(("step3", e)), separate=True)
    assert len(replica.entries) == 3  # nothing counted in flight any more

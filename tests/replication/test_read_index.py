"""Strong reads by read index (no log entry) on real in-process 3-replica
groups (127.0.0.1, LevelDB, the hub): a leader serves a read only after a
majority confirmed its leadership after the read arrived, and after applying
up to the read index. A leader cut off from the others never confirms one."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import pytest

from raftkv.errors import RaftKVError
from raftkv.replication.replica import Replica
from tests.replication.support import FAST, wait_for
from tests.replication.test_faults_transport import MakeGroup, commit, faulty_group, key

pytestmark = pytest.mark.timeout(30)
__all__ = ["faulty_group"]  # the fixture, imported for this module's tests


def read_index(replica: Replica, timeout_s: float = 5.0) -> tuple[Any, RaftKVError | None]:
    """Ask for a read index and wait: (result, None), (None, error), or
    (None, None) if nothing came within ``timeout_s``."""
    done = threading.Event()
    out: list[tuple[Any, RaftKVError | None]] = []

    def on_done(result: Any, error: RaftKVError | None) -> None:
        out.append((result, error))
        done.set()

    replica.read_index(on_done)
    if not done.wait(timeout_s):
        return None, None
    return out[0]


def test_a_read_index_covers_every_acknowledged_write_and_needs_no_log_entry(
        faulty_group: MakeGroup) -> None:
    group = faulty_group(3)
    leader = group.leader()
    for seq in range(1, 6):
        commit(leader, seq, b"k%d" % seq)
    last = leader.commit_index
    # (a follower may still be receiving the last write)
    wait_for(lambda: len({r.journal.size_bytes for r in group.replicas}) == 1)
    before = [r.journal.size_bytes for r in group.replicas]
    for _ in range(20):
        result, error = read_index(leader)
        assert error is None, error
        assert result is not None, "no read index in time"
        assert result["i"] >= last
        # The state it lets the caller read holds every acknowledged write.
        assert leader.last_applied >= result["i"]
        assert leader.store.get(key(b"k5")) == b"v"
    assert [r.journal.size_bytes for r in group.replicas] == before, "a read wrote a log entry"
    assert leader.transport.reads.served >= 20
    assert leader.transport.reads.pending == 0


def test_concurrent_reads_share_heartbeat_rounds(faulty_group: MakeGroup) -> None:
    group = faulty_group(3)
    leader = group.leader()
    commit(leader, 1, b"k")
    rounds_before = leader.transport.reads.rounds
    results: list[tuple[Any, RaftKVError | None]] = []
    done = threading.Event()

    def on_done(result: Any, error: RaftKVError | None) -> None:
        results.append((result, error))
        if len(results) == 200:
            done.set()

    for _ in range(200):
        leader.read_index(on_done)
    assert done.wait(10), f"{len(results)} of 200 reads answered"
    assert all(error is None for _, error in results), results[:3]
    assert leader.transport.reads.rounds - rounds_before < 200


def test_a_follower_refuses_with_the_leaders_hint(faulty_group: MakeGroup) -> None:
    group = faulty_group(3)
    leader = group.leader()
    commit(leader, 1, b"k")
    follower = next(r for r in group.replicas if r is not leader)
    wait_for(lambda: follower.leader_address == leader.self_address)
    result, error = read_index(follower)
    assert result is None
    assert error is not None and error.code == "NOT_LEADER", error


def test_a_leader_cut_off_from_the_majority_confirms_no_read(faulty_group: MakeGroup) -> None:
    """The old leader still believes it leads for a while after the cut; a
    read it took then must not be served, though the new leader has taken a
    write since (the old leader's state would be stale)."""
    group = faulty_group(3)
    old = group.leader()
    commit(old, 1, b"k")
    followers = [r for r in group.replicas if r is not old]
    group.net.spec = group.net.spec.isolate([old.self_address], group.addresses)
    answers: list[tuple[Any, RaftKVError | None]] = []
    old.read_index(lambda r, e: answers.append((r, e)))  # while it still leads
    wait_for(lambda: any(f.is_leader for f in followers), timeout_s=5)
    new = next(f for f in followers if f.is_leader)
    commit(new, 2, b"after-cut")
    time.sleep(0.3)
    assert old.store.get(key(b"after-cut")) is None  # its state is stale
    assert all(result is None for result, _ in answers), f"stale read confirmed: {answers}"
    # pysyncobj's leader steps down when it hears from no majority; the read
    # then fails (the client retries elsewhere).
    wait_for(lambda: bool(answers), timeout_s=10)
    assert answers[0][1] is not None and answers[0][1].code == "NOT_LEADER", answers
    result, error = read_index(new)
    assert error is None and result is not None
    assert new.store.get(key(b"after-cut")) == b"v"
    group.net.spec = group.net.spec.heal()


def test_a_new_leaders_read_waits_for_its_terms_first_commit(faulty_group: MakeGroup) -> None:
    """Right after an election the new leader's commit index may lag what the
    old leader committed; its read index is taken only once an entry of its
    own term (pysyncobj's no-op) is committed."""
    group = faulty_group(3)
    old = group.leader()
    for seq in range(1, 4):
        commit(old, seq, b"k%d" % seq)
    old_commit = old.commit_index
    group.net.spec = group.net.spec.isolate([old.self_address], group.addresses)
    followers = [r for r in group.replicas if r is not old]
    wait_for(lambda: any(f.is_leader for f in followers), timeout_s=5)
    new = next(f for f in followers if f.is_leader)
    result, error = read_index(new)
    assert error is None and result is not None
    assert result["i"] >= old_commit
    assert new.store.get(key(b"k3")) == b"v"
    group.net.spec = group.net.spec.heal()


def test_a_lone_replica_serves_reads_at_once(faulty_group: MakeGroup) -> None:
    group = faulty_group(1)
    leader = group.replicas[0]
    wait_for(lambda: leader.is_leader)
    result, error = read_index(leader)
    assert error is None and result is not None
    commit(leader, 1, b"k")
    result, error = read_index(leader)
    assert error is None and result is not None and result["i"] >= leader.commit_index
    assert leader.store.get(key(b"k")) == b"v"


def test_reads_interleaved_with_writes_see_each_acknowledged_write(
        faulty_group: MakeGroup) -> None:
    group = faulty_group(3)
    leader = group.leader()
    for seq in range(1, 30):
        commit(leader, seq, b"n%d" % seq)
        result, error = read_index(leader)
        assert error is None and result is not None
        assert leader.store.get(key(b"n%d" % seq)) == b"v"


def test_closing_a_replica_fails_its_pending_reads(faulty_group: MakeGroup) -> None:
    group = faulty_group(3)
    leader = group.leader()
    commit(leader, 1, b"k")
    # Cut off, the leader can confirm no round: the read stays pending.
    group.net.spec = group.net.spec.isolate([leader.self_address], group.addresses)
    answers: list[tuple[Any, RaftKVError | None]] = []
    leader.read_index(lambda r, e: answers.append((r, e)))
    wait_for(lambda: leader.transport.reads.pending == 1, timeout_s=2)
    assert answers == []
    leader.destroy()
    assert len(answers) == 1
    result, error = answers[0]
    assert result is None and error is not None and error.code == "UNAVAILABLE", answers


def _record_sent(replica: Replica, kind: str) -> list[tuple[str, dict[str, Any]]]:
    """Record the messages of type ``kind`` that ``replica``'s transport hands
    to its hub (the real sending goes on)."""
    sent: list[tuple[str, dict[str, Any]]] = []
    hand = replica.transport._hand

    def recording(address: str, message: Any, late: bool) -> bool:
        if message.get("type") == kind:
            sent.append((address, dict(message)))
        return hand(address, message, late)

    replica.transport._hand = recording  # type: ignore[method-assign]
    return sent


def test_a_read_round_without_writes_goes_out_as_probes(faulty_group: MakeGroup) -> None:
    """With no append-entries leaving, a round reaches the followers as
    read_probes (no pysyncobj processing on either side), and their read_acks
    confirm it."""
    group = faulty_group(3)
    leader = group.leader()
    commit(leader, 1, b"k")
    probes = _record_sent(leader, "read_probe")
    for _ in range(10):
        result, error = read_index(leader)
        assert error is None and result is not None, error
    assert probes, "no read_probe sent"
    term = leader.transport.reads.term
    assert {m["term"] for _, m in probes} == {term}
    assert {a for a, _ in probes} <= {r.self_address for r in group.replicas if r is not leader}


def test_a_follower_confirms_a_probe_only_from_its_leader_in_its_term(
        faulty_group: MakeGroup) -> None:
    group = faulty_group(3)
    leader = group.leader()
    commit(leader, 1, b"k")
    follower, other = [r for r in group.replicas if r is not leader]
    wait_for(lambda: follower.leader_address == leader.self_address)
    term = int(follower._group.raftCurrentTerm)
    acks = _record_sent(follower, "read_ack")

    def probe(source: str, ri: int, term_: int) -> bool:
        message = {"type": "read_probe", "ri": ri, "term": term_}
        return bool(follower.hub.call(lambda: follower.transport.deliver(source, message)))

    assert probe(leader.self_address, 1_000, term) is False  # no tick for a probe
    assert probe(leader.self_address, 1_001, term - 1) is False  # an older term
    assert probe(leader.self_address, 1_002, term + 1) is False  # a term it has not seen
    assert probe(other.self_address, 1_003, term) is False  # not its leader
    confirmed = [m["ri"] for a, m in acks if m["ri"] >= 1_000]
    assert confirmed == [1_000], acks
    assert acks[-1] == (leader.self_address, {"type": "read_ack", "ri": 1_000, "term": term})


def test_a_read_round_does_not_tick_the_leaders_group(faulty_group: MakeGroup) -> None:
    """A round's probes go out at the end of the hub's round, without a run
    of pysyncobj's tick: reads alone tick the leader's group no more than its
    heartbeats and the periodic ticks do. Those are made rare here (about 12
    ticks a second), so that a slow machine cannot make them look like one
    per round."""
    quiet = dataclasses.replace(FAST, heartbeat_period_s=0.25, tick_period_s=0.25,
                                election_timeout_s_min=1.0, election_timeout_s_max=2.0,
                                connection_timeout_s=2.0)
    group = faulty_group(3, settings=quiet)
    leader = group.leader()
    commit(leader, 1, b"k")
    rounds, ticks = leader.transport.reads.rounds, leader.hub.ticks
    for _ in range(100):
        result, error = read_index(leader)
        assert error is None and result is not None, error
    rounds, ticks = leader.transport.reads.rounds - rounds, leader.hub.ticks - ticks
    assert rounds >= 50, rounds
    assert ticks < rounds / 2, (ticks, rounds)

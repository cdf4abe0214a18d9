"""Each pysyncobj defect of DESIGN section 5, reproduced on pysyncobj itself,
and shown handled by raftkv's Replica. Real sockets on 127.0.0.1, real LevelDB."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.journal import FileJournal, ResizableFile

from raftkv.localcluster import free_port
from raftkv.replication import replica as replica_mod
from raftkv.replication.hub import RaftHub
from raftkv.replication.journal import GroupJournal, NodeLog
from raftkv.replication.replica import RaftSettings, Replica
from raftkv.statemachine import layout
from raftkv.storage.leveldb import Store, write_snapshot
from tests.replication.support import FAST, put_command, submit, wait_for

pytestmark = pytest.mark.timeout(60)
def submit_and_wait(replica: Replica, payload: bytes, timeout_s: float = 10.0) -> Any:
    result, error = submit(replica, payload, timeout_s)
    assert error is None, error
    assert result is not None, "no result"
    return result


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Callable[..., list[Replica]]]:
    made: list[Replica] = []

    def make(n: int = 3, **kwargs: Any) -> list[Replica]:
        addresses = [f"127.0.0.1:{free_port()}" for _ in range(n)]
        for i, address in enumerate(addresses):
            made.append(Replica(0, tmp_path / f"r{i}", address,
                                [a for a in addresses if a != address], "test-secret",
                                settings=kwargs.get("settings", FAST),
                                **{k: v for k, v in kwargs.items() if k != "settings"}))
        replicas = made[-n:]
        wait_for(lambda: any(r.is_leader for r in replicas))
        return replicas

    yield make
    for r in made:
        r.destroy()


def leader_of(replicas: list[Replica]) -> Replica:
    return next(r for r in replicas if r.is_leader)


# -- 1. the journal is never synced -------------------------------------------------


def test_pysyncobj_file_journal_never_syncs(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync"))
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append("fdatasync"))
    monkeypatch.setattr(ResizableFile, "flush", lambda self: calls.append("msync"))
    journal = FileJournal(str(tmp_path / "journal"))
    for i in range(1, 100):
        journal.add(b"entry", i, 1)
    journal.setRaftCommitIndex(99)
    journal.onOneSecondTimer()
    assert calls == []  # the defect: nothing reaches stable storage


def _record_unsynced_acks(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[int]]:
    """Watch the one place Raft messages leave a process (``RaftHub._transmit``):
    every follower ack (next_node_idx) whose sender's journal still holds
    unsynced entries is recorded."""
    unsynced: list[str] = []
    sent = [0]
    real_transmit = RaftHub._transmit

    def checked_transmit(self: RaftHub, out: Any, messages: list[Any]) -> None:
        for _to, source, message in messages:
            sent[0] += 1
            member = self._members.get(source)
            if (member is not None and member._journal.unsynced
                    and message.get("type") == "next_node_idx"):
                unsynced.append(source)
        real_transmit(self, out, messages)

    monkeypatch.setattr(RaftHub, "_transmit", checked_transmit)
    return unsynced, sent


def test_every_message_leaves_after_its_entries_are_synced(
        group: Callable[..., list[Replica]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit: when a follower's ack (next_node_idx) is sent, its journal
    has no unsynced entry, so an ack only ever describes entries on disk. (A
    leader may send append-entries before its own sync, as Raft allows: it
    counts itself toward a commit only after the round's sync.)"""
    unsynced, sent = _record_unsynced_acks(monkeypatch)
    replicas = group(3)
    leader = leader_of(replicas)
    for seq in range(1, 60):
        submit_and_wait(leader, put_command(seq, b"k%d" % seq))
    assert sent[0] > 100
    assert unsynced == []
    assert all(r.journal.syncs > 0 for r in replicas)


def test_the_check_above_can_fail(group: Callable[..., list[Replica]],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """If acks did not wait for the sync, the same check sees unsynced sends."""
    monkeypatch.setattr(replica_mod._HubTransport, "_WAIT_FOR_SYNC", frozenset())
    unsynced, _ = _record_unsynced_acks(monkeypatch)
    leader = leader_of(group(3))
    for seq in range(1, 20):
        submit_and_wait(leader, put_command(seq, b"k%d" % seq))
    assert unsynced


# -- 2. an exception in apply makes pysyncobj apply the entry again ----------------


class Counting(SyncObj):  # type: ignore[misc]
    def __init__(self, address: str, conf: SyncObjConf) -> None:
        self.calls: list[int] = []
        super().__init__(address, [], conf)

    @replicated
    def bump(self, n: int) -> int:
        self.calls.append(n)
        if len(self.calls) == 1:
            raise RuntimeError("apply failed once")
        return n


def test_pysyncobj_reapplies_an_entry_whose_apply_raised() -> None:
    obj = Counting(f"127.0.0.1:{free_port()}", SyncObjConf(autoTickPeriod=0.01))
    try:
        wait_for(obj._isLeader)
        obj.bump(7)
        wait_for(lambda: len(obj.calls) >= 2)
        assert obj.calls[:2] == [7, 7]  # the defect: one entry, applied twice
    finally:
        obj.destroy()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_replica_stops_instead_of_reapplying(group: Callable[..., list[Replica]]) -> None:
    exits: list[int] = []
    applied: list[int] = []

    def exit_fn(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)  # ends the Raft thread, as os._exit ends the process

    def failing_apply(read: Any, index: int, payload: bytes) -> Any:
        applied.append(index)
        raise OSError("disk gone")

    (single,) = group(1, exit_fn=exit_fn, apply_fn=failing_apply)
    single.submit(put_command(1, b"k"), lambda r, e: None)
    wait_for(lambda: bool(exits))
    time.sleep(0.3)
    assert exits == [replica_mod.EXIT_APPLY_FAILED]
    assert len(applied) == 1  # applied once, never again


def test_a_raising_result_callback_does_not_reach_pysyncobj(
        group: Callable[..., list[Replica]]) -> None:
    leader = leader_of(group(3))
    leader.submit(put_command(1, b"a"), lambda r, e: 1 / 0)
    result = submit_and_wait(leader, put_command(2, b"b"))
    assert result[-1]["r"] == [None]
    assert leader.store.applied_index == leader.store.applied_index
    assert leader.store.get(layout.data_key(0, 0, b"a")) == b"v"


# -- 3. unauthenticated pickles from the network ------------------------------------


class _Touch:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (Path.touch, (self.path,))


def _send_pysyncobj_frame(address: str, payload: Any) -> None:
    host, port = address.rsplit(":", 1)
    data = zlib.compress(pickle.dumps(payload), 3)
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.sendall(struct.pack("i", len(data)) + data)
        time.sleep(0.5)


def test_pysyncobj_without_password_runs_code_from_the_network(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    obj = SyncObj(address, [], SyncObjConf(autoTickPeriod=0.01))
    try:
        marker = tmp_path / "pwned"
        _send_pysyncobj_frame(address, _Touch(marker))
        wait_for(marker.exists, 5)  # the defect: anyone who reaches the port runs code
    finally:
        obj.destroy()


def test_replica_refuses_unauthenticated_peer_traffic(
        group: Callable[..., list[Replica]], tmp_path: Path) -> None:
    replicas = group(3)
    marker = tmp_path / "pwned"
    for r in replicas:
        _send_pysyncobj_frame(r.self_address, _Touch(marker))
    time.sleep(0.3)
    assert not marker.exists()
    # and the group still works
    submit_and_wait(leader_of(replicas), put_command(1, b"after"))


def test_raft_port_binds_only_the_configured_address(group: Callable[..., list[Replica]]) -> None:
    (single,) = group(1)
    port = int(single.self_address.rsplit(":", 1)[1])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", port), timeout=1).close()


# -- 4. the dump-loading crash window clears the journal ------------------------


def _craft_crash_window(directory: Path, position: int) -> int:
    """Write a dump covering the journal up to ``position`` without truncating
    the journal: the state after a crash between the two steps."""
    wal = NodeLog(directory / "wal")
    journal = wal.open_group(directory / "journal")
    store = Store(directory / "state")
    meta = {"last": list(journal[position]), "prev": list(journal[position - 1]),
            "cluster": []}
    applied, pairs = store.begin_dump()
    with open(directory / "snapshot.dump", "wb") as out:
        write_snapshot(out, meta, applied, pairs)
    length = len(journal)
    journal.close()
    wal.close()
    store.close()
    return length


@pytest.mark.parametrize("fixed", [True, False])
def test_dump_crash_window_keeps_the_journal_tail(tmp_path: Path, fixed: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    address = f"127.0.0.1:{free_port()}"
    settings = RaftSettings(election_timeout_s_min=0.3, election_timeout_s_max=0.6,
                            heartbeat_period_s=0.05, connection_timeout_s=1.0)
    single = Replica(0, tmp_path, address, [], "s", settings=settings)
    try:
        wait_for(lambda: single.is_leader)
        for seq in range(1, 41):
            submit_and_wait(single, put_command(seq, b"k%d" % seq))
    finally:
        single.destroy()
    length = _craft_crash_window(tmp_path, 10)
    if not fixed:
        monkeypatch.setattr(GroupJournal, "position_of", lambda self, entry: None)
    restarted = Replica(0, tmp_path, address, [], "s", settings=settings)
    try:
        wait_for(lambda: restarted.is_leader)
        if fixed:
            assert len(restarted.journal) >= length - 9  # only the covered prefix went
        else:
            assert len(restarted.journal) <= 3  # the defect: the tail was cleared
    finally:
        restarted.destroy()


# -- the first election of a new group ---------------------------------------------------


def _first_election_after_s(open_replica: Callable[[], Replica]) -> float:
    """How long after the start of its opening a replica will call an election
    (on pysyncobj's clock: CLOCK_MONOTONIC_RAW, not time.monotonic's)."""
    clock = replica_mod._pysyncobj_core.monotonicTime
    started = clock()
    replica = open_replica()
    try:
        return float(replica._group._SyncObj__raftElectionDeadline) - started
    finally:
        replica.destroy()


def test_an_empty_founding_replica_calls_its_first_election_soon(tmp_path: Path) -> None:
    """pysyncobj waits a whole election timeout (0.8-1.6 s) before a new
    group's first election, though nobody can be leader yet. A founding
    replica that starts empty waits 0.15-0.35 s; one that is not founding, or
    that has a term already (restarted), waits the usual timeout: a replica
    added to a serving group has a leader to wait for, and each early
    candidacy raises its term towards deposing that leader."""
    settings = RaftSettings()  # alone (its peers never answer): no election starts
    peers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]

    def opener(name: str, founding: bool) -> Callable[[], Replica]:
        return lambda: Replica(0, tmp_path / name, f"127.0.0.1:{free_port()}", peers,
                               "test-secret", settings=settings, founding=founding)

    # (opening a replica here takes up to a few tenths of a second)
    assert 0.15 <= _first_election_after_s(opener("new", True)) < 0.75
    assert _first_election_after_s(opener("added", False)) >= 0.8

    replica = opener("voted", True)()
    replica.journal.setCurrentTerm(3, None)
    replica.destroy()
    assert _first_election_after_s(opener("voted", True)) >= 0.8

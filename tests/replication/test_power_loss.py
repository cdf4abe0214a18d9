"""Power loss: every acknowledged write survives losing all that was not fsynced.

kill -9 cannot test this: the page cache survives a killed process. Here an
injected sync function records, for each journal file, the offset up to which
it was fdatasync'ed. After acknowledged writes, all three replicas stop with
no further sync; each journal file is cut back to its synced offset, and each
replica's LevelDB (never fsynced by design) is deleted outright. Restarted from
what is left, the group must hold every acknowledged write.

This proves the recovery path (fsynced journal bytes alone rebuild every
acknowledged write). That an ack never leaves before its sync is proved by
``test_pysyncobj_defects.test_every_message_leaves_after_its_entries_are_synced``
(and that it can fail): here, an ack racing ahead of its sync by the few
microseconds left before the end-of-tick sync would rarely be caught.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from raftkv.errors import RaftKVError
from raftkv.localcluster import free_port
from raftkv.replication.journal import GroupJournal, NodeLog
from raftkv.replication.replica import RaftSettings, Replica
from raftkv.statemachine import layout
from raftkv.statemachine.commands import Barrier, encode_commands
from tests.replication.support import FAST, put_command, submit, wait_for

pytestmark = pytest.mark.timeout(90)


class SyncRecorder:
    """A sync function that remembers how far each file is durable."""

    def __init__(self) -> None:
        self.synced: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        # The position before the fdatasync: the Raft thread may append while
        # it runs, and what it appends then is not known to be covered.
        end = os.lseek(fd, 0, os.SEEK_CUR)
        path = os.readlink(f"/proc/self/fd/{fd}")
        os.fdatasync(fd)
        with self.lock:
            self.synced[path] = end

    def cut_unsynced(self, directory: Path) -> int:
        """Truncate every journal segment to its synced length; returns bytes cut."""
        cut = 0
        for segment in directory.rglob("seg-*.log"):
            keep = self.synced.get(str(segment.resolve()), 0)
            size = segment.stat().st_size
            data = segment.read_bytes()[:keep]
            segment.write_bytes(data)
            cut += size - keep
        return cut


def start_group(base: Path, addresses: list[str], sync_fn: Callable[[int], None],
                settings: RaftSettings = FAST) -> list[Replica]:
    return [Replica(0, base / f"r{i}", a, [x for x in addresses if x != a], "secret",
                    settings=settings, sync_fn=sync_fn)
            for i, a in enumerate(addresses)]


def power_off(replicas: list[Replica], monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop every replica without the final sync a clean shutdown would do."""
    def close_without_sync(self: NodeLog) -> None:
        self._closed = True
        if self._spare is not None:
            self._spare.result()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    with monkeypatch.context() as m:
        m.setattr(GroupJournal, "_destroy", lambda self: None)
        m.setattr(NodeLog, "close", close_without_sync)
        for r in replicas:
            r.destroy()


def read_all(replicas: list[Replica], keys: list[bytes]) -> dict[bytes, bytes | None]:
    wait_for(lambda: any(r.is_leader for r in replicas), 15)
    leader = next(r for r in replicas if r.is_leader)
    _, error = submit(leader, encode_commands([Barrier()]))
    assert error is None, error
    return {k: leader.store.get(layout.data_key(0, 0, k)) for k in keys}


@pytest.mark.parametrize("rounds", [1, 2])
def test_acknowledged_writes_survive_losing_everything_unsynced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rounds: int) -> None:
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    recorder = SyncRecorder()
    acked: dict[bytes, bytes] = {}
    cut_bytes: list[int] = []
    seq = 0
    for round_ in range(rounds):
        replicas = start_group(tmp_path, addresses, recorder)
        try:
            wait_for(lambda group=replicas: any(r.is_leader for r in group), 15)
            leader = next(r for r in replicas if r.is_leader)
            # Writes keep flowing; the power goes out with entries in flight.
            lock = threading.Lock()
            powered = [True]
            acks: list[tuple[int, bytes, bytes]] = []
            total = 1500
            for i in range(total):
                seq += 1
                key, value = b"k%d" % (i % 120), b"r%d-v%d" % (round_, i)

                def on_done(result: Any, error: RaftKVError | None, i: int = i,
                            key: bytes = key, value: bytes = value,
                            lock: threading.Lock = lock, powered: list[bool] = powered,
                            acks: list[tuple[int, bytes, bytes]] = acks) -> None:
                    with lock:
                        if powered[0] and error is None:
                            acks.append((i, key, value))

                leader.submit(put_command(seq, key, value, b"p" * 16), on_done)
            wait_for(lambda seen=acks: len(seen) >= 200, 20)
            with lock:
                powered[0] = False  # acks after this instant were never seen
            # the last acknowledged value of each key (entries apply in order)
            for _, key, value in sorted(acks):
                acked[key] = value
        finally:
            power_off(replicas, monkeypatch)
        cut_bytes.append(recorder.cut_unsynced(tmp_path))
        for state in tmp_path.glob("r*/state"):
            shutil.rmtree(state)  # LevelDB is never fsynced: lose all of it
        recorder.synced.clear()

    replicas = start_group(tmp_path, addresses, recorder)
    try:
        values = read_all(replicas, list(acked))
        lost = {k: (v, values[k]) for k, v in acked.items() if values[k] is None}
        assert not lost, f"acknowledged writes lost: {lost}"
        # A later write of the same key may have committed unacknowledged;
        # a value older than the last acknowledged one is a lost write.
        for k, v in acked.items():
            got = values[k]
            assert got is not None
            assert int(got.split(b"v")[-1]) >= int(v.split(b"v")[-1]) or \
                got.split(b"-")[0] > v.split(b"-")[0], (k, v, got)
        assert sum(cut_bytes) > 0, "the power went out with nothing unsynced: no test"
    finally:
        for r in replicas:
            r.destroy()


def test_the_power_loss_check_can_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With syncs that are never recorded as durable, the same cut loses the writes."""
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    recorder = SyncRecorder()
    replicas = start_group(tmp_path, addresses, recorder)
    try:
        wait_for(lambda: any(r.is_leader for r in replicas), 15)
        leader = next(r for r in replicas if r.is_leader)
        for seq in range(1, 21):
            _, error = submit(leader, put_command(seq, b"key", b"v%d" % seq))
            assert error is None
    finally:
        power_off(replicas, monkeypatch)
    recorder.synced.clear()  # pretend no sync ever reached the disk
    recorder.cut_unsynced(tmp_path)
    for state in tmp_path.glob("r*/state"):
        shutil.rmtree(state)
    replicas = start_group(tmp_path, addresses, recorder)
    try:
        assert read_all(replicas, [b"key"])[b"key"] is None
    finally:
        for r in replicas:
            r.destroy()


def test_a_leader_counts_itself_toward_a_commit_only_once_its_journal_is_synced(
        tmp_path: Path) -> None:
    """pysyncobj counts the leader's own log toward every commit, and the
    leader sends its entries before its own sync. With the leader's disk
    slow and its followers' fast, one follower's ack alone must not commit
    an entry: at every commit, the leader's journal holds it on disk (else a
    power loss of the leader and the acking follower's later loss could lose
    an acked write). The hub's round syncs before the leader's next tick;
    a hub that stopped waiting for syncs would have to hold that tick."""
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    slow: list[str | None] = [None]

    def sync_of(address: str) -> Callable[[int], None]:
        def sync(fd: int) -> None:
            if slow[0] == address:
                time.sleep(0.2)
            os.fdatasync(fd)
        return sync

    # The leader ticks (and so heartbeats) once per slow sync: elections
    # must not start in between.
    patient = dataclasses.replace(FAST, election_timeout_s_min=1.0, election_timeout_s_max=1.5,
                                  connection_timeout_s=1.5)
    replicas = [Replica(0, tmp_path / f"r{i}", a, [x for x in addresses if x != a], "secret",
                        settings=patient, sync_fn=sync_of(a)) for i, a in enumerate(addresses)]
    try:
        wait_for(lambda: any(r.is_leader for r in replicas), 15)
        leader = next(r for r in replicas if r.is_leader)
        slow[0] = leader.self_address
        seen: list[tuple[int, int]] = []  # (commit index, durable index) at each commit
        errors: list[RaftKVError | None] = []
        for seq in range(1, 6):
            done = threading.Event()

            def on_done(result: Any, error: RaftKVError | None,
                        done: threading.Event = done) -> None:
                errors.append(error)
                seen.append((leader._group.raftCommitIndex, leader.journal.durable_index))
                done.set()

            leader.submit(put_command(seq, b"k%d" % seq), on_done)
            assert done.wait(10)
        assert errors == [None] * 5, errors
        assert all(commit <= durable for commit, durable in seen), seen
    finally:
        for r in replicas:
            r.destroy()

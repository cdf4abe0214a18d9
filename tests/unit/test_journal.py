"""The shared Raft log (NodeLog) and each group's view of it (GroupJournal):
what is on disk after each operation, torn tails, power loss, Raft's
truncation rule (identical entries are kept, conflicts truncate), segments
collected and small groups written again, and the upgrade from per-group
journals."""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.replication import journal as journal_module
from raftkv.replication.journal import (
    FIRST_SEGMENT_BYTES,
    REWRITE_SEGMENTS_MIN,
    GroupJournal,
    LogCorrupt,
    NodeLog,
    encode_record,
)
from tests.replication.test_power_loss import SyncRecorder

Entry = tuple[bytes, int, int]


def entries(journal: GroupJournal) -> list[Entry]:
    return [journal[i] for i in range(len(journal))]


def record_bytes(journal: GroupJournal, command: bytes) -> int:
    return len(encode_record(1, journal._state.key, 0, 0, command))


class Logs:
    """A NodeLog under ``root/wal`` with groups in ``root/<name>``, reopened at will."""

    def __init__(self, root: Path, **options: Any) -> None:
        self.root = root
        self.options = options
        self.log = NodeLog(root / "wal", groups_root=root, **options)
        self.groups: dict[str, GroupJournal] = {}

    def group(self, name: str = "g", **options: Any) -> GroupJournal:
        journal = self.log.open_group(self.root / name, **options)
        self.groups[name] = journal
        return journal

    def reopen(self, **options: Any) -> Logs:
        """Close cleanly (every group, then the log: all is synced) and open again."""
        for journal in self.groups.values():
            journal._destroy()
            journal.close()
        self.log.close()
        again = Logs(self.root, **(options or self.options))
        for name in self.groups:
            again.group(name)
        return again

    def kill(self) -> None:
        """Stop with no further sync (what is buffered is lost; written bytes
        may sit in the page cache)."""
        self.log._closed = True
        wait_background()
        os.close(self.log._fd)
        self.log._fd = -1

    def segments(self) -> list[Path]:
        return sorted((self.root / "wal").glob("seg-*.log"))


def test_entries_survive_reopen_after_sync(tmp_path: Path) -> None:
    logs = Logs(tmp_path)
    j = logs.group()
    for i in range(1, 6):
        j.add(b"cmd%d" % i, i, 1)
    j.sync()
    assert entries(logs.reopen().groups["g"]) == [(b"cmd%d" % i, i, 1) for i in range(1, 6)]


def test_groups_share_one_sync_and_keep_their_own_entries(tmp_path: Path) -> None:
    calls: list[int] = []
    logs = Logs(tmp_path, sync_fn=calls.append)
    a, b = logs.group("a"), logs.group("b")
    logs.log.sync()
    assert calls == []  # nothing pending: no sync
    for i in range(1, 4):
        a.add(b"a%d" % i, i, 1)
        b.add(b"b%d" % i, i, 7)
    assert a.unsynced and b.unsynced
    a.sync()
    b.sync()
    assert len(calls) == 1 and not a.unsynced and not b.unsynced
    assert a.durable_index == 3 and b.durable_index == 3
    again = logs.reopen(sync_fn=os.fdatasync)
    assert entries(again.groups["a"]) == [(b"a%d" % i, i, 1) for i in range(1, 4)]
    assert entries(again.groups["b"]) == [(b"b%d" % i, i, 7) for i in range(1, 4)]


def test_a_group_appended_after_the_sync_is_unsynced_again(tmp_path: Path) -> None:
    logs = Logs(tmp_path)
    a, b = logs.group("a"), logs.group("b")
    a.add(b"x", 1, 1)
    logs.log.sync()
    b.add(b"y", 1, 1)
    assert b.unsynced and not a.unsynced


def write_three_then_damage(root: Path, damage: Callable[[bytearray, int], None]) -> None:
    """Three records of group g on disk, then ``damage(segment bytes, end of records)``."""
    logs = Logs(root)
    j = logs.group()
    for i in range(1, 4):
        j.add(b"value-%d" % i, i, 2)
    j.sync()
    end = logs.log._fd_position
    logs.kill()
    segment = logs.segments()[-1]
    data = bytearray(segment.read_bytes())
    damage(data, end)
    segment.write_bytes(bytes(data))


def test_torn_tail_is_dropped_on_load(tmp_path: Path) -> None:
    def tear(data: bytearray, end: int) -> None:
        data[end - 3 : end] = b"\0\0\0"  # a crash mid-record: its last bytes never written

    write_three_then_damage(tmp_path, tear)
    logs = Logs(tmp_path)
    j2 = logs.group()
    assert entries(j2) == [(b"value-1", 1, 2), (b"value-2", 2, 2)]
    j2.add(b"value-3b", 3, 3)
    assert entries(logs.reopen().groups["g"])[-1] == (b"value-3b", 3, 3)


def test_corrupt_record_stops_the_log_there(tmp_path: Path) -> None:
    def flip(data: bytearray, end: int) -> None:
        data[end - 1] ^= 0xFF  # flip a bit of the last record's command

    write_three_then_damage(tmp_path, flip)
    assert [e[1] for e in entries(Logs(tmp_path).group())] == [1, 2]


def test_a_gap_in_a_groups_entries_refuses_to_start(tmp_path: Path) -> None:
    """Whole records that skip an index are no torn tail: a wrong log, refused."""
    (tmp_path / "g").mkdir()
    (tmp_path / "wal").mkdir()
    key = b"g"
    data = encode_record(1, key, 1, 1, b"a") + encode_record(1, key, 3, 1, b"c")
    (tmp_path / "wal" / "seg-00000001.log").write_bytes(data)
    with pytest.raises(LogCorrupt, match="entry 3 follows 1"):
        NodeLog(tmp_path / "wal")


def test_compaction_keeps_the_tail_across_reopen(tmp_path: Path) -> None:
    logs = Logs(tmp_path)
    j = logs.group()
    for i in range(1, 11):
        j.add(b"c", i, 1)
    j.deleteEntriesTo(6)
    assert [e[1] for e in entries(j)] == [7, 8, 9, 10]
    j.add(b"c", 11, 1)
    assert [e[1] for e in entries(logs.reopen().groups["g"])] == [7, 8, 9, 10, 11]


def test_clear_then_add(tmp_path: Path) -> None:
    logs = Logs(tmp_path)
    j = logs.group()
    for i in range(1, 5):
        j.add(b"c", i, 1)
    j.clear()
    j.add(b"dump-prev", 100, 3)
    j.add(b"dump-last", 101, 3)
    assert entries(logs.reopen().groups["g"]) == [(b"dump-prev", 100, 3),
                                                  (b"dump-last", 101, 3)]


def test_identical_entries_after_delete_from_are_kept(tmp_path: Path) -> None:
    """pysyncobj's follower calls deleteEntriesFrom for any overlapping
    append-entries and re-adds what the message carries. Entries with the same
    index and term are the same entry (log matching): nothing may be lost."""
    conflicts: list[int] = []
    logs = Logs(tmp_path)
    j = logs.group(on_conflict=conflicts.append)
    for i in range(1, 11):
        j.add(b"c%d" % i, i, 1)
    j.sync()
    j.deleteEntriesFrom(4)  # message with prevLogIdx = 4 ...
    j.add(b"c5", 5, 1)  # ... carrying only entries 5 and 6
    j.add(b"c6", 6, 1)
    assert [e[1] for e in entries(j)] == list(range(1, 11))
    assert conflicts == [] and j.truncations == 0 and not j.unsynced
    assert [e[1] for e in entries(logs.reopen().groups["g"])] == list(range(1, 11))


def test_an_append_after_a_resend_appends(tmp_path: Path) -> None:
    """After an overlapping message re-added entries 5-6 of 1-10, the next
    message may start at the end (prevLogIdx = 10): entry 11 is appended and
    nothing is truncated (a stale 'truncate from 7' marker once cut 7-10 here,
    leaving a gap)."""
    conflicts: list[int] = []
    logs = Logs(tmp_path)
    j = logs.group(on_conflict=conflicts.append)
    for i in range(1, 11):
        j.add(b"c%d" % i, i, 1)
    j.deleteEntriesFrom(4)
    j.add(b"c5", 5, 1)
    j.add(b"c6", 6, 1)
    assert j.settle() == [(b"c%d" % i, i, 1) for i in range(7, 11)]  # the kept tail
    j.add(b"c11", 11, 1)
    assert [e[1] for e in entries(j)] == list(range(1, 12))
    assert conflicts == [] and j.truncations == 0
    assert [e[1] for e in entries(logs.reopen().groups["g"])] == list(range(1, 12))


def test_an_append_after_a_resend_appends_even_unsettled(tmp_path: Path) -> None:
    j = Logs(tmp_path).group()
    for i in range(1, 11):
        j.add(b"c%d" % i, i, 1)
    j.deleteEntriesFrom(4)
    j.add(b"c5", 5, 1)
    j.add(b"c11", 11, 1)  # no settle() in between: still an append
    assert [e[1] for e in entries(j)] == list(range(1, 12))


def test_conflicting_entry_truncates_and_is_reported(tmp_path: Path) -> None:
    conflicts: list[int] = []
    logs = Logs(tmp_path)
    j = logs.group(on_conflict=conflicts.append)
    for i in range(1, 8):
        j.add(b"c%d" % i, i, 1)
    j.deleteEntriesFrom(4)
    j.add(b"c5", 5, 1)  # same
    j.add(b"new6", 6, 2)  # different term: truncate 6 and 7
    assert entries(j)[4:] == [(b"c5", 5, 1), (b"new6", 6, 2)]
    assert conflicts == [6]
    assert entries(logs.reopen().groups["g"])[4:] == [(b"c5", 5, 1), (b"new6", 6, 2)]


def test_an_append_that_skips_an_index_is_refused(tmp_path: Path) -> None:
    j = Logs(tmp_path).group()
    j.add(b"a", 1, 1)
    with pytest.raises(LogCorrupt):
        j.add(b"c", 3, 1)
    assert entries(j) == [(b"a", 1, 1)]


def test_segments_are_preallocated_and_reload_cleanly(tmp_path: Path) -> None:
    logs = Logs(tmp_path)
    j = logs.group()
    for i in range(1, 4):
        j.add(b"x" * 100, i, 1)
    j.sync()
    assert logs.segments()[-1].stat().st_size >= FIRST_SEGMENT_BYTES  # zeros to overwrite
    again = logs.reopen()
    assert [e[1] for e in entries(again.groups["g"])] == [1, 2, 3]
    again.groups["g"].add(b"y", 4, 1)
    assert [e[1] for e in entries(again.reopen().groups["g"])] == [1, 2, 3, 4]


def test_term_and_vote_are_durable(tmp_path: Path) -> None:
    logs = Logs(tmp_path)
    logs.group().setCurrentTerm(7, "127.0.0.1:5000")
    logs.kill()  # written at once, not at the next sync
    j2 = Logs(tmp_path).group()
    assert (j2.getCurrentTerm(), j2.getVotedForNodeId()) == (7, "127.0.0.1:5000")


def test_meta_write_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    j = Logs(tmp_path).group()
    synced.clear()
    j.setCurrentTerm(3, None)
    assert len(synced) >= 2  # the file, then its directory


def test_opening_a_group_twice_is_refused(tmp_path: Path) -> None:
    logs = Logs(tmp_path)
    j = logs.group()
    with pytest.raises(RuntimeError, match="already open"):
        logs.group()
    j.close()
    logs.group()  # closed: it can be opened again, with its entries


# -- groups dropped, segments collected, small groups written again --------------------------


def fill(journal: GroupJournal, first: int, count: int, size: int = 100,
         term: int = 1) -> list[Entry]:
    written = []
    for index in range(first, first + count):
        entry = (b"%06d" % index + b"." * (size - 6), index, term)
        journal.add(*entry)
        written.append(entry)
    return written


def wait_background() -> None:
    journal_module._background().submit(lambda: None).result()


def test_a_dropped_group_is_gone_after_reopen(tmp_path: Path) -> None:
    logs = Logs(tmp_path)
    a, b = logs.group("a"), logs.group("b")
    fill(a, 1, 3)
    kept = fill(b, 1, 3)
    a._destroy()
    a.close()
    logs.log.drop("a")
    del logs.groups["a"]
    assert not logs.log.unsynced  # the drop is durable before the caller deletes files
    again = logs.reopen()
    assert entries(again.groups["b"]) == kept
    assert entries(again.group("a")) == []  # a new group of the same name starts empty


def test_a_group_whose_directory_is_gone_is_dropped_at_reopen(tmp_path: Path) -> None:
    logs = Logs(tmp_path)
    fill(logs.group("a"), 1, 3)
    fill(logs.group("b"), 1, 3)
    logs.reopen()
    (tmp_path / "a" / "meta").unlink(missing_ok=True)
    (tmp_path / "a").rmdir()
    log = NodeLog(tmp_path / "wal", groups_root=tmp_path)
    assert sorted(log._groups) == [b"b"]


def test_a_dropped_group_cannot_be_open(tmp_path: Path) -> None:
    logs = Logs(tmp_path)
    logs.group("a")
    with pytest.raises(RuntimeError, match="close it first"):
        logs.log.drop("a")


def test_segments_no_group_needs_are_deleted(tmp_path: Path) -> None:
    logs = Logs(tmp_path, segment_bytes=4096, rewrite_group_bytes_max=0)  # collection alone
    a, b = logs.group("a"), logs.group("b")
    for round_ in range(20):
        if logs.log._spare is not None:
            logs.log._spare.result()
        fill(a, round_ * 10 + 1, 10)
        fill(b, round_ * 10 + 1, 10)
        logs.log.sync()
    wait_background()
    assert len(logs.segments()) > 10 and logs.log.rewritten_bytes == 0
    a.deleteEntriesTo(len(a) - 1)  # compaction keeps the last entry of each
    b.deleteEntriesTo(len(b) - 1)
    logs.log.sync()
    logs.log.sync()
    wait_background()
    assert len(logs.segments()) <= 2
    again = logs.reopen()
    assert [e[1] for e in entries(again.groups["a"])] == [200]
    assert [e[1] for e in entries(again.groups["b"])] == [200]


def churn(logs: Logs, busy: GroupJournal, index: int, count: int) -> int:
    """``count`` entries for ``busy``, compacted to its last, synced; the next index."""
    if logs.log._spare is not None:
        logs.log._spare.result()
    fill(busy, index, count)
    busy.deleteEntriesTo(len(busy) - 1)
    logs.log.sync()
    return index + count


def test_an_idle_group_pinning_old_segments_is_written_again(tmp_path: Path) -> None:
    """An idle group keeps its last entries after compaction; once more than
    REWRITE_SEGMENTS_MIN segments are kept, it is written at the head and the
    old segments go."""
    logs = Logs(tmp_path, segment_bytes=4096)
    idle, busy = logs.group("idle"), logs.group("busy")
    kept = fill(idle, 1, 2, 50)
    index = 1
    for _ in range(60):
        index = churn(logs, busy, index, 10)
    wait_background()
    assert len(logs.segments()) <= REWRITE_SEGMENTS_MIN + 2
    assert logs.log.rewritten_bytes > 0
    again = logs.reopen()
    assert entries(again.groups["idle"]) == kept
    assert [e[1] for e in entries(again.groups["busy"])] == [index - 1]


def test_a_rewrite_read_back_after_its_originals_were_collected(tmp_path: Path) -> None:
    """A group written again after its last original entry, in the same
    segment, once the segments of its first entries are gone: reading back
    meets entry 1 after entry 2, which starts the group over (it is the
    rewrite, and it is whole: segments go only once it is on disk)."""
    logs = Logs(tmp_path, segment_bytes=1024, rewrite_group_bytes_max=0)
    small, busy = logs.group("small"), logs.group("busy")
    kept = fill(small, 1, 1, 50)
    index = 1
    while len(logs.log._segments) <= REWRITE_SEGMENTS_MIN:
        index = churn(logs, busy, index, 4)
    kept += fill(small, 2, 1, 50)  # in the last segment, before the rewrite
    logs.log.sync()
    logs.log.rewrite_group_bytes_max = 1000
    fill(busy, index, 1)
    logs.log.sync()  # writes small again
    assert logs.log.rewritten_bytes > 0
    fill(busy, index + 1, 1)
    logs.log.sync()  # on disk: the old segments go
    wait_background()
    assert logs.segments()[0].name != "seg-00000001.log"
    assert entries(logs.reopen().groups["small"]) == kept


# -- the commit index hint -------------------------------------------------------------------


def test_the_commit_index_costs_no_sync_of_its_own(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """pysyncobj stores its commit index once a second on the Raft thread that
    every group shares: a hint (Raft keeps none on disk), written as a record
    that the next round's sync carries."""
    logs = Logs(tmp_path)
    j = logs.group()
    j.setRaftCommitIndex(42)
    fsyncs: list[int] = []
    monkeypatch.setattr(os, "fsync", fsyncs.append)
    monkeypatch.setattr(os, "fdatasync", fsyncs.append)
    j.onOneSecondTimer()
    assert fsyncs == []
    monkeypatch.undo()
    assert logs.reopen().groups["g"].getRaftCommitIndex() == 42


def test_an_unsynced_commit_index_is_lost_harmlessly(tmp_path: Path) -> None:
    logs = Logs(tmp_path)
    j = logs.group()
    j.setCurrentTerm(3, "a")
    fill(j, 1, 7)
    j.setRaftCommitIndex(7)
    j.onOneSecondTimer()
    logs.kill()
    again = Logs(tmp_path).group()
    assert again.getRaftCommitIndex() == 1  # the leader tells it again
    assert (again.getCurrentTerm(), again.getVotedForNodeId()) == (3, "a")


# -- power loss and kill -9 ----------------------------------------------------------------------


def test_reopening_syncs_what_a_killed_process_left_in_the_page_cache(tmp_path: Path) -> None:
    logs = Logs(tmp_path, sync_fn=lambda fd: None)  # written, never made durable
    fill(logs.group(), 1, 3)
    logs.log.sync()
    logs.kill()  # killed: the bytes sit in the page cache
    calls: list[int] = []
    again = NodeLog(tmp_path / "wal", groups_root=tmp_path,
                    sync_fn=lambda fd: calls.append(os.lseek(fd, 0, os.SEEK_CUR)))
    assert len(again.open_group(tmp_path / "g")) == 3
    assert calls and calls[-1] > 0  # synced up to the end of the records read back


def test_entries_synced_across_segments_survive_a_power_loss(tmp_path: Path) -> None:
    """Every segment cut back to what was fdatasync'ed through the log (the
    next segment's zeros, synced by the background thread, are cut as well):
    the synced entries are all there, in order."""
    recorder = SyncRecorder()
    logs = Logs(tmp_path, sync_fn=recorder, segment_bytes=2048)
    a, b = logs.group("a"), logs.group("b")
    synced: dict[str, list[Entry]] = {"a": [], "b": []}
    for i in range(1, 200):
        if i % 7 == 0:
            logs.log.sync()
            synced = {"a": entries(a), "b": entries(b)}
        if logs.log._spare is not None and i % 3:
            logs.log._spare.result()
        fill(a, i, 1, 80)
        if i % 2:
            fill(b, i // 2 + 1, 1, 60)
    logs.kill()  # power lost: nothing more is synced
    assert len(logs.segments()) > 3
    recorder.cut_unsynced(tmp_path)
    again = Logs(tmp_path)
    assert entries(again.group("a")) == synced["a"]
    assert entries(again.group("b")) == synced["b"]


def test_a_failed_sync_fails_every_later_sync(tmp_path: Path) -> None:
    """After an fdatasync error the kernel may have dropped the unwritten
    pages, and a retry can succeed without them: no later sync may pass."""
    fail = [True]

    def sync(fd: int) -> None:
        if fail[0]:
            raise OSError(5, "Input/output error")
        os.fdatasync(fd)

    j = Logs(tmp_path, sync_fn=sync).group()
    j.add(b"x", 1, 1)
    with pytest.raises(OSError):
        j.sync()
    fail[0] = False
    with pytest.raises(OSError, match="an earlier sync failed"):
        j.sync()
    assert j.unsynced and j.durable_index == 0


# -- zeros written away from the Raft thread ---------------------------------------


def writes_of_zeros_on_this_thread(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every os.pwrite made on the calling thread (the
    log writes zeros with pwrite and records with write)."""
    me = threading.get_ident()
    sizes: list[int] = []
    real = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if threading.get_ident() == me:
            sizes.append(len(data))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return sizes


def segment_sizes(logs: Logs) -> list[int]:
    return [p.stat().st_size for p in logs.segments()]


def test_a_new_log_writes_its_zeros_before_the_first_entry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = Logs(tmp_path)
    assert segment_sizes(logs) == [FIRST_SEGMENT_BYTES]
    zeros = writes_of_zeros_on_this_thread(monkeypatch)
    fill(logs.group(), 1, 99)
    logs.log.sync()
    assert zeros == []  # the Raft thread's first sync writes records, not zeros


def test_a_full_segment_continues_in_the_next_one_zeroed_in_the_background(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    segment = 4096
    logs = Logs(tmp_path, segment_bytes=segment)
    j = logs.group()
    zeros = writes_of_zeros_on_this_thread(monkeypatch)
    written = []
    for i in range(1, 400):  # about 13 segments
        if logs.log._spare is not None:
            logs.log._spare.result()  # (the Raft thread would not wait: here, it is ready)
        written += fill(j, i, 1)
        if i % 10 == 0:
            logs.log.sync()
    logs.log.sync()
    assert zeros == [] and logs.log.segments_grown_in_place == 0
    sizes = segment_sizes(logs)
    assert len(sizes) > 10 and set(sizes) == {segment}  # none grew
    assert entries(logs.reopen().groups["g"]) == written


def test_without_a_next_segment_ready_a_segment_grows_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real = journal_module._zero_filled_segment

    def slow(path: Path, size: int) -> int:
        release.wait(10)
        return real(path, size)

    monkeypatch.setattr(journal_module, "_zero_filled_segment", slow)
    logs = Logs(tmp_path, segment_bytes=1024)
    written = fill(logs.group(), 1, 29)  # 3 KB of records: past the first segment
    assert logs.log.segments_grown_in_place >= 1
    release.set()
    logs.log.sync()
    assert entries(logs.reopen().groups["g"]) == written


def test_reopening_keeps_the_zeros_after_the_last_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = Logs(tmp_path)
    fill(logs.group(), 1, 3)
    logs = logs.reopen()
    assert segment_sizes(logs) == [FIRST_SEGMENT_BYTES]
    zeros = writes_of_zeros_on_this_thread(monkeypatch)
    logs.groups["g"].add(b"y", 4, 1)
    logs.log.sync()
    assert zeros == []
    assert [e[1] for e in entries(logs.reopen().groups["g"])] == [1, 2, 3, 4]


def test_a_segment_ending_in_fewer_zeros_than_a_record_header_is_not_torn(
        tmp_path: Path) -> None:
    """Records that leave 4 bytes of zeros at a segment's end: the end of that
    segment, not a torn record that would drop every later one."""
    logs = Logs(tmp_path, segment_bytes=1004)
    j = logs.group()
    size = record_bytes(j, b"x" * 100)
    command = b"x" * (100 + (1000 // 10 - size))  # ten records fill 1000 bytes
    assert record_bytes(j, command) * 10 == 1000
    written = []
    for i in range(1, 25):
        if logs.log._spare is not None:
            logs.log._spare.result()
        written.append((command, i, 1))
        j.add(command, i, 1)
    logs.log.sync()
    assert segment_sizes(logs)[1:3] == [1004, 1004]
    assert entries(logs.reopen().groups["g"]) == written


def test_reopening_syncs_the_last_records_when_a_zeroed_next_segment_follows(
        tmp_path: Path) -> None:
    """Killed with records unsynced in one segment and the next segment already
    zero-filled: the reopened log continues in the next one, and must still
    sync the records it read back from the one before."""
    logs = Logs(tmp_path, segment_bytes=2048)
    fill(logs.group(), 1, 11)  # 1,100+ bytes of records: past half, the next one is made
    assert logs.log._spare is not None
    logs.log._spare.result()
    logs.log._write(logs.log._chunks)  # written, not synced
    logs.kill()
    recorder = SyncRecorder()
    again = NodeLog(tmp_path / "wal", groups_root=tmp_path, sync_fn=recorder)
    assert len(again.open_group(tmp_path / "g")) == 11 and again._tail_segment == 2
    first = str((tmp_path / "wal" / "seg-00000001.log").resolve())
    assert recorder.synced.get(first) == 11 * record_bytes(logs.groups["g"], b"x" * 100)


# -- the per-group journal of earlier versions -------------------------------------------------


def write_old_journal(directory: Path, entries_: list[Entry], *, first_index: int = 0,
                      commit: int = 0) -> None:
    directory.mkdir(parents=True)
    data = b""
    for command, index, term in entries_:
        body = struct.pack("<QQ", index, term) + command
        data += struct.pack("<II", len(body), zlib.crc32(body)) + body
    (directory / "seg-00000001.log").write_bytes(data + bytes(64))
    (directory / "meta").write_bytes(cbor2.dumps({
        "term": 5, "vote": "x", "commit": 1, "first_segment": 1, "first_index": first_index}))
    if commit:
        (directory / "commit").write_bytes(commit.to_bytes(8, "little"))


def test_a_journal_of_an_earlier_version_moves_into_the_log(tmp_path: Path) -> None:
    old = [(b"c%d" % i, i, 2) for i in range(1, 8)]
    write_old_journal(tmp_path / "g", old, first_index=3, commit=6)
    logs = Logs(tmp_path)
    j = logs.group()
    assert entries(j) == old[2:]
    assert (j.getCurrentTerm(), j.getVotedForNodeId(), j.getRaftCommitIndex()) == (5, "x", 6)
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["meta"]
    again = logs.reopen()
    assert entries(again.groups["g"]) == old[2:]
    assert again.groups["g"].getRaftCommitIndex() == 6


def test_an_import_cut_short_is_done_again(tmp_path: Path) -> None:
    """A crash after the entries went into the log but before the old files
    went: the next open imports again, over a CLEAR, with nothing doubled."""
    old = [(b"c%d" % i, i, 2) for i in range(1, 5)]
    write_old_journal(tmp_path / "g", old)
    logs = Logs(tmp_path)
    logs.group()
    logs.reopen()
    write_old_journal(tmp_path / "g2", old)  # the same files, again, for the same group
    for path in (tmp_path / "g2").iterdir():
        path.rename(tmp_path / "g" / path.name)
    assert entries(Logs(tmp_path).group()) == old


# -- a model: any operations on several groups, then a clean reopen or a power loss ---------------

ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "delete_from", "delete_to", "clear", "readd_same",
                         "next_ready", "sync", "reopen", "big"]),
        st.integers(0, 2),  # the group
        st.integers(0, 30),
    ),
    max_size=50,
)


@settings(max_examples=200, deadline=None)
@given(ops, st.sampled_from([journal_module.SEGMENT_BYTES, 300]), st.sampled_from([None, 900]),
       st.booleans())
def test_the_log_matches_a_model_of_lists(tmp_path_factory: pytest.TempPathFactory,
                                          operations: list[tuple[str, int, int]],
                                          segment_bytes: int, rewrite: int | None,
                                          power_loss: bool) -> None:
    """Each group's entries are what a plain list would hold. With 300-byte
    segments a few records fill one: switching segments (zero-filled in the
    background, or grown in place when not ready), collection and rewrites
    (of groups up to 900 bytes, when drawn) meet truncation, compaction and
    clear. At the end: a clean reopen gives every group's entries; a power
    loss (every file cut back to what was fdatasync'ed) gives each group's
    entries as of the last sync."""
    root = tmp_path_factory.mktemp("log")
    recorder = SyncRecorder()
    logs = Logs(root, sync_fn=recorder, segment_bytes=segment_bytes,
                rewrite_group_bytes_max=rewrite)
    names = ["g0", "g1", "g2"]
    journals = [logs.group(name) for name in names]
    model: list[list[Entry]] = [[], [], []]
    at_sync: list[list[Entry]] = [[], [], []]
    next_index = [1, 1, 1]
    for op, g, arg in operations:
        j, m = journals[g], model[g]
        if op in ("add", "big"):
            term = (m[-1][2] if m else 1) + (arg == 3)
            size = 400 if op == "big" else next_index[g] % 7
            entry = (b"e%d-%d" % (next_index[g], term) + b"." * size, next_index[g], term)
            j.add(*entry)
            m.append(entry)
            next_index[g] += 1
        elif op == "delete_from" and arg < len(m):
            # pysyncobj marks, then a conflicting add decides: emulate a new term.
            j.deleteEntriesFrom(arg)
            term = m[-1][2] + 1
            index = m[arg][1]
            entry = (b"n%d-%d" % (index, term) + b"." * (index % 5), index, term)
            j.add(*entry)
            del m[arg:]
            m.append(entry)
            next_index[g] = index + 1
        elif op == "readd_same" and arg < len(m):
            j.deleteEntriesFrom(arg)
            for entry in m[arg:]:
                j.add(*entry)
        elif op == "delete_to" and 0 < arg < len(m):
            j.deleteEntriesTo(arg)
            del m[:arg]
        elif op == "clear":
            j.clear()
            m.clear()
        elif op == "next_ready" and logs.log._spare is not None:
            logs.log._spare.result()
        elif op == "sync":
            logs.log.sync()
            at_sync = [list(x) for x in model]
        elif op == "reopen":
            logs = logs.reopen()
            journals = [logs.groups[name] for name in names]
            at_sync = [list(x) for x in model]
        assert entries(j) == m
        assert j.size_bytes == sum(record_bytes(j, command) for command, _, _ in m)
    if power_loss:
        logs.kill()
        wait_background()
        recorder.cut_unsynced(root)
        expected = at_sync
    else:
        logs.log.sync()
        logs = logs.reopen()
        expected = model
    again = Logs(root) if power_loss else logs
    for name, want in zip(names, expected, strict=True):
        journal = again.groups[name] if name in again.groups else again.group(name)
        assert entries(journal) == want
        assert journal.size_bytes == sum(record_bytes(journal, c) for c, _, _ in want)
    again.log.close()

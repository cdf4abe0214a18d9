"""DurableJournal: what is on disk after each operation, torn tails, and
Raft's truncation rule (identical entries are kept, conflicts truncate)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.replication import journal as journal_module
from raftkv.replication.journal import FIRST_SEGMENT_BYTES, PREALLOCATE_BYTES, DurableJournal
from tests.replication.test_power_loss import SyncRecorder


def entries(journal: DurableJournal) -> list[tuple[bytes, int, int]]:
    return [journal[i] for i in range(len(journal))]


def records_end(data: bytes) -> int:
    """Where the records stop and the preallocated zeros begin."""
    return data.index(b"\0" * 8, 36) if b"\0" * 8 in data[36:] else len(data)


def reopen(journal: DurableJournal) -> DurableJournal:
    journal._destroy()
    return DurableJournal(journal.directory)


def test_entries_survive_reopen_after_sync(tmp_path: Path) -> None:
    j = DurableJournal(tmp_path)
    for i in range(1, 6):
        j.add(b"cmd%d" % i, i, 1)
    j.sync()
    assert entries(reopen(j)) == [(b"cmd%d" % i, i, 1) for i in range(1, 6)]


def test_sync_calls_the_sync_function_once_per_group(tmp_path: Path) -> None:
    calls: list[int] = []
    j = DurableJournal(tmp_path, sync_fn=calls.append)
    j.sync()
    assert calls == []  # nothing pending: no sync
    for i in range(1, 4):
        j.add(b"x", i, 1)
    assert j.unsynced
    j.sync()
    j.sync()
    assert len(calls) == 1 and not j.unsynced


def write_three_then_damage(directory: Path, damage: Callable[[bytearray, int], None]) -> None:
    """Three records on disk, then ``damage(segment bytes, end of records)``."""
    j = DurableJournal(directory)
    for i in range(1, 4):
        j.add(b"value-%d" % i, i, 2)
    j._destroy()
    segment = sorted(directory.glob("seg-*.log"))[-1]
    data = bytearray(segment.read_bytes())
    damage(data, records_end(bytes(data)))
    segment.write_bytes(bytes(data))


def test_torn_tail_is_dropped_on_load(tmp_path: Path) -> None:
    def tear(data: bytearray, end: int) -> None:
        data[end - 3 : end] = b"\0\0\0"  # a crash mid-record: its last bytes never written

    write_three_then_damage(tmp_path, tear)
    j2 = DurableJournal(tmp_path)
    assert entries(j2) == [(b"value-1", 1, 2), (b"value-2", 2, 2)]
    j2.add(b"value-3b", 3, 3)
    assert entries(reopen(j2))[-1] == (b"value-3b", 3, 3)


def test_corrupt_record_stops_the_log_there(tmp_path: Path) -> None:
    def flip(data: bytearray, end: int) -> None:
        data[end - 1] ^= 0xFF  # flip a bit of the last record's command

    write_three_then_damage(tmp_path, flip)
    assert [e[1] for e in entries(DurableJournal(tmp_path))] == [1, 2]


def test_compaction_keeps_the_tail_across_reopen(tmp_path: Path) -> None:
    j = DurableJournal(tmp_path)
    for i in range(1, 11):
        j.add(b"c", i, 1)
    j.deleteEntriesTo(6)
    assert [e[1] for e in entries(j)] == [7, 8, 9, 10]
    j.add(b"c", 11, 1)
    assert [e[1] for e in entries(reopen(j))] == [7, 8, 9, 10, 11]


def test_clear_then_add(tmp_path: Path) -> None:
    j = DurableJournal(tmp_path)
    for i in range(1, 5):
        j.add(b"c", i, 1)
    j.clear()
    j.add(b"dump-prev", 100, 3)
    j.add(b"dump-last", 101, 3)
    assert entries(reopen(j)) == [(b"dump-prev", 100, 3), (b"dump-last", 101, 3)]


def test_identical_entries_after_delete_from_are_kept(tmp_path: Path) -> None:
    """pysyncobj's follower calls deleteEntriesFrom for any overlapping
    append-entries and re-adds what the message carries. Entries with the same
    index and term are the same entry (log matching): nothing may be lost."""
    conflicts: list[int] = []
    j = DurableJournal(tmp_path, on_conflict=conflicts.append)
    for i in range(1, 11):
        j.add(b"c%d" % i, i, 1)
    j.sync()
    j.deleteEntriesFrom(4)  # message with prevLogIdx = 4 ...
    j.add(b"c5", 5, 1)  # ... carrying only entries 5 and 6
    j.add(b"c6", 6, 1)
    assert [e[1] for e in entries(j)] == list(range(1, 11))
    assert conflicts == [] and j.truncations == 0
    assert [e[1] for e in entries(reopen(j))] == list(range(1, 11))


def test_an_append_after_a_resend_appends(tmp_path: Path) -> None:
    """After an overlapping message re-added entries 5-6 of 1-10, the next
    message may start at the end (prevLogIdx = 10): entry 11 is appended and
    nothing is truncated (a stale 'truncate from 7' marker once cut 7-10 here,
    leaving a gap)."""
    conflicts: list[int] = []
    j = DurableJournal(tmp_path, on_conflict=conflicts.append)
    for i in range(1, 11):
        j.add(b"c%d" % i, i, 1)
    j.deleteEntriesFrom(4)
    j.add(b"c5", 5, 1)
    j.add(b"c6", 6, 1)
    assert j.settle() == [(b"c%d" % i, i, 1) for i in range(7, 11)]  # the kept tail
    j.add(b"c11", 11, 1)
    assert [e[1] for e in entries(j)] == list(range(1, 12))
    assert conflicts == [] and j.truncations == 0
    assert [e[1] for e in entries(reopen(j))] == list(range(1, 12))


def test_an_append_after_a_resend_appends_even_unsettled(tmp_path: Path) -> None:
    j = DurableJournal(tmp_path)
    for i in range(1, 11):
        j.add(b"c%d" % i, i, 1)
    j.deleteEntriesFrom(4)
    j.add(b"c5", 5, 1)
    j.add(b"c11", 11, 1)  # no settle() in between: still an append
    assert [e[1] for e in entries(j)] == list(range(1, 12))


def test_conflicting_entry_truncates_and_is_reported(tmp_path: Path) -> None:
    conflicts: list[int] = []
    j = DurableJournal(tmp_path, on_conflict=conflicts.append)
    for i in range(1, 8):
        j.add(b"c%d" % i, i, 1)
    j.deleteEntriesFrom(4)
    j.add(b"c5", 5, 1)  # same
    j.add(b"new6", 6, 2)  # different term: truncate 6 and 7
    assert entries(j)[4:] == [(b"c5", 5, 1), (b"new6", 6, 2)]
    assert conflicts == [6]
    assert entries(reopen(j))[4:] == [(b"c5", 5, 1), (b"new6", 6, 2)]


def test_segments_are_preallocated_and_reload_cleanly(tmp_path: Path) -> None:
    j = DurableJournal(tmp_path)
    for i in range(1, 4):
        j.add(b"x" * 100, i, 1)
    j.sync()
    segment = sorted(tmp_path.glob("seg-*.log"))[-1]
    assert segment.stat().st_size >= FIRST_SEGMENT_BYTES  # zeros the records overwrite
    j2 = reopen(j)
    assert [e[1] for e in entries(j2)] == [1, 2, 3]
    j2.add(b"y", 4, 1)
    assert [e[1] for e in entries(reopen(j2))] == [1, 2, 3, 4]


def test_term_and_vote_are_durable(tmp_path: Path) -> None:
    j = DurableJournal(tmp_path)
    j.setCurrentTerm(7, "127.0.0.1:5000")
    # Written at once, not at the next one-second timer.
    j2 = DurableJournal(tmp_path)
    assert (j2.getCurrentTerm(), j2.getVotedForNodeId()) == (7, "127.0.0.1:5000")


def test_meta_write_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    j = DurableJournal(tmp_path)
    synced.clear()
    j.setCurrentTerm(3, None)
    assert len(synced) >= 2  # the file, then its directory


# A model-based property: any sequence of journal operations, then a reopen,
# gives the entries a plain list would hold (after a sync).

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 3)),
        st.tuples(st.just("delete_from"), st.integers(0, 30)),
        st.tuples(st.just("delete_to"), st.integers(0, 30)),
        st.tuples(st.just("clear"), st.just(0)),
        st.tuples(st.just("readd_same"), st.integers(0, 30)),
        # the background thread finishes the next segment (else it may not yet)
        st.tuples(st.just("next_ready"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops, st.sampled_from([PREALLOCATE_BYTES, 164]))
def test_journal_matches_a_list_model(tmp_path_factory: pytest.TempPathFactory,
                                      operations: list[tuple[str, int]],
                                      segment_bytes: int) -> None:
    """With 164-byte segments, a few entries fill one: switching to the next
    segment (zero-filled in the background, or grown in place when it is not
    ready yet) meets truncation, compaction and clear."""
    directory = tmp_path_factory.mktemp("journal")
    j = DurableJournal(directory, preallocate_bytes=segment_bytes)
    model: list[tuple[bytes, int, int]] = []
    next_index = 1
    for op, arg in operations:
        if op == "add":
            term = (model[-1][2] if model else 1) + (arg == 3)
            entry = (b"e%d-%d" % (next_index, term) + b"." * (next_index % 7), next_index, term)
            j.add(*entry)
            model.append(entry)
            next_index += 1
        elif op == "delete_from" and arg < len(model):
            # pysyncobj marks, then a conflicting add decides: emulate a new term.
            j.deleteEntriesFrom(arg)
            term = model[-1][2] + 1
            index = model[arg][1]
            entry = (b"n%d-%d" % (index, term) + b"." * (index % 5), index, term)
            j.add(*entry)
            del model[arg:]
            model.append(entry)
            next_index = index + 1
        elif op == "readd_same" and arg < len(model):
            j.deleteEntriesFrom(arg)
            for entry in model[arg:]:
                j.add(*entry)
        elif op == "delete_to" and 0 < arg < len(model):
            j.deleteEntriesTo(arg)
            del model[:arg]
        elif op == "clear":
            j.clear()
            model = []
        elif op == "next_ready" and j._spare is not None:
            j._spare.result()
        assert entries(j) == model
        assert j.bytes == sum(24 + len(command) for command, _, _ in model)
    j.sync()
    j2 = reopen(j)
    assert entries(j2) == model
    assert j2.bytes == sum(24 + len(command) for command, _, _ in model)
    j2._destroy()


def test_reopening_syncs_what_a_killed_process_left_in_the_page_cache(tmp_path: Path) -> None:
    j = DurableJournal(tmp_path)
    for i in range(1, 4):
        j.add(b"x", i, 1)
    os.close(j._fd)  # killed: no sync; the bytes sit in the page cache
    calls: list[int] = []
    again = DurableJournal(tmp_path, sync_fn=lambda fd: calls.append(os.lseek(fd, 0, os.SEEK_CUR)))
    assert len(entries(again)) == 3 and again.durable_index == 3
    assert calls and calls[-1] > 0  # synced up to the end of the records read back


def test_the_commit_index_is_kept_without_any_fsync(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """pysyncobj stores its commit index once a second on the Raft thread that
    every group shares: a hint (Raft keeps none on disk), so no fsync of a
    file or directory that could stall every group behind the disk."""
    j = DurableJournal(tmp_path)
    j.setRaftCommitIndex(42)
    fsyncs: list[int] = []
    monkeypatch.setattr(os, "fsync", fsyncs.append)
    monkeypatch.setattr(os, "fdatasync", fsyncs.append)
    j.onOneSecondTimer()
    assert fsyncs == []
    monkeypatch.undo()
    assert reopen(j).getRaftCommitIndex() == 42


def test_a_torn_commit_index_file_is_ignored(tmp_path: Path) -> None:
    j = DurableJournal(tmp_path)
    j.setCurrentTerm(3, "a")
    j.setRaftCommitIndex(7)
    j._destroy()
    (tmp_path / "commit").write_bytes(b"\x07")  # torn: a crash mid-replace
    again = DurableJournal(tmp_path)
    assert again.getRaftCommitIndex() == 1  # the leader tells it again
    assert (again.getCurrentTerm(), again.getVotedForNodeId()) == (3, "a")


# -- zeros written away from the Raft thread ---------------------------------------


def pwrites_on_this_thread(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every os.pwrite made on the calling thread (the
    journal writes zeros with pwrite and records with write)."""
    me = threading.get_ident()
    sizes: list[int] = []
    real = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if threading.get_ident() == me:
            sizes.append(len(data))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return sizes


def segment_sizes(directory: Path) -> list[int]:
    return [p.stat().st_size for p in sorted(directory.glob("seg-*.log"))]


def test_a_new_journal_writes_its_zeros_before_the_first_entry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = DurableJournal(tmp_path)
    assert segment_sizes(tmp_path) == [FIRST_SEGMENT_BYTES]
    zeros = pwrites_on_this_thread(monkeypatch)
    for i in range(1, 100):
        j.add(b"x" * 100, i, 1)
    j.sync()
    assert zeros == []  # the Raft thread's first sync flushes records, not 4 MiB of zeros


def test_a_full_segment_continues_in_the_next_one_zeroed_in_the_background(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    segment = 4096
    j = DurableJournal(tmp_path, preallocate_bytes=segment)
    zeros = pwrites_on_this_thread(monkeypatch)
    written = []
    for i in range(1, 400):  # 124-byte records: about 13 segments
        if j._spare is not None:
            j._spare.result()  # (the Raft thread would not wait: here, the next is ready)
        entry = (b"%04d" % i + b"v" * 96, i, 1)
        j.add(*entry)
        written.append(entry)
    j.sync()
    assert zeros == [] and j.segments_grown_in_place == 0
    sizes = segment_sizes(tmp_path)
    assert len(sizes) > 10 and set(sizes) == {segment}  # none grew
    assert entries(reopen(j)) == written


def test_without_a_next_segment_ready_a_segment_grows_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real = journal_module._zero_filled_segment

    def slow(path: Path, size: int) -> int:
        release.wait(10)
        return real(path, size)

    monkeypatch.setattr(journal_module, "_zero_filled_segment", slow)
    j = DurableJournal(tmp_path, preallocate_bytes=1024)
    written = []
    for i in range(1, 30):  # 3 KB of records: past the first segment
        entry = (b"e" * 100, i, 1)
        j.add(*entry)
        written.append(entry)
    assert j.segments_grown_in_place >= 1
    release.set()
    j.sync()
    assert entries(reopen(j)) == written


def test_reopening_keeps_the_zeros_after_the_last_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = DurableJournal(tmp_path)
    for i in range(1, 4):
        j.add(b"x" * 100, i, 1)
    j.sync()
    j = reopen(j)
    assert segment_sizes(tmp_path) == [FIRST_SEGMENT_BYTES]
    zeros = pwrites_on_this_thread(monkeypatch)
    j.add(b"y", 4, 1)
    j.sync()
    assert zeros == []
    assert [e[1] for e in entries(reopen(j))] == [1, 2, 3, 4]


def test_entries_synced_across_segments_survive_a_power_loss(tmp_path: Path) -> None:
    """Every segment cut back to what was fdatasync'ed through the journal
    (the next segment's zeros, synced by the background thread, are cut as
    well): the synced entries are all there, in order."""
    recorder = SyncRecorder()
    j = DurableJournal(tmp_path, sync_fn=recorder, preallocate_bytes=2048)
    synced = []
    for i in range(1, 200):
        if i % 7 == 0:
            j.sync()
            synced = [j[k] for k in range(len(j))]
        if j._spare is not None and i % 3:
            j._spare.result()
        j.add(b"p%d" % i + b"." * 80, i, 1)
    os.close(j._fd)  # power lost: nothing more is synced
    if j._spare is not None:
        j._spare.result()
    assert len(segment_sizes(tmp_path)) > 3
    recorder.cut_unsynced(tmp_path)
    again = DurableJournal(tmp_path)
    assert entries(again)[: len(synced)] == synced


def test_a_failed_sync_fails_every_later_sync(tmp_path: Path) -> None:
    """After an fdatasync error the kernel may have dropped the unwritten
    pages, and a retry can succeed without them: no later sync may pass."""
    fail = [True]

    def sync(fd: int) -> None:
        if fail[0]:
            raise OSError(5, "Input/output error")
        os.fdatasync(fd)

    j = DurableJournal(tmp_path, sync_fn=sync)
    j.add(b"x", 1, 1)
    with pytest.raises(OSError):
        j.sync()
    fail[0] = False
    with pytest.raises(OSError, match="an earlier sync failed"):
        j.sync()
    assert j.unsynced and j.durable_index == 0


def test_a_segment_ending_in_fewer_zeros_than_a_record_header_is_not_torn(
        tmp_path: Path) -> None:
    """Ten 100-byte records in a 1004-byte segment leave 4 bytes of zeros: the
    end of that segment, not a torn record that would drop every later one."""
    j = DurableJournal(tmp_path, preallocate_bytes=1004)
    written = []
    for i in range(1, 25):
        if j._spare is not None:
            j._spare.result()
        entry = (b"%076d" % i, i, 1)
        j.add(*entry)
        written.append(entry)
    j.sync()
    assert segment_sizes(tmp_path)[:2] == [1004, 1004]
    assert entries(reopen(j)) == written


def test_reopening_syncs_the_last_records_when_a_zeroed_next_segment_follows(
        tmp_path: Path) -> None:
    """Killed with records unsynced in one segment and the next segment already
    zero-filled: the reopened journal continues in the next one, and must
    still sync the records it read back from the one before."""
    j = DurableJournal(tmp_path, preallocate_bytes=2048)
    for i in range(1, 12):  # 1,100 bytes of records: past half, the next one is made
        j.add(b"z" * 76, i, 1)
    assert j._spare is not None
    j._spare.result()
    os.close(j._fd)  # killed: the records sit in the page cache
    recorder = SyncRecorder()
    again = DurableJournal(tmp_path, sync_fn=recorder)
    assert len(entries(again)) == 11 and again._segment == 2
    first = str((tmp_path / "seg-00000001.log").resolve())
    assert recorder.synced.get(first) == 11 * 100

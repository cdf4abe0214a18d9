"""The durable Raft log of a process: one write-ahead log for all its groups.

pysyncobj's own FileJournal is an mmap that is never msync'd, and its term/vote
meta file is renamed without fsync: an acknowledged write can vanish on a
crash (DESIGN section 5). Here every group of a process (a node hosts a
replica of many groups) appends to **one** log, ``NodeLog``, and sees its own
entries through a ``GroupJournal``, pysyncobj's Journal interface. This is
the multi-Raft log of TiKV's raft-engine or CockroachDB's shared engine: a
hub round that appended entries for eight groups costs one ``write`` and one
``fdatasync``, not eight of each (eight journal files cost a node three times
the fdatasyncs of one group, and the disk served each more slowly;
docs/PERFORMANCE.md, "Many physical shards").

- **Append without I/O, ``sync()`` before anything leaves the node.** Records
  are buffered; ``sync()`` writes them and fdatasyncs once (group commit).
  The hub syncs the log once per round before any ack or vote leaves
  (``hub.py``); a lone group syncs before it applies.
- **Records**: ``u32 length | u32 crc32(body) | body``, the body being
  ``u8 kind | u16 key length | u64 index | u64 term | key | command``. Kinds:
  ``ENTRY`` (a log entry of the group named by the key), ``TRUNCATE`` (the
  group's entries from ``index`` on are void: a Raft log conflict), ``START``
  (entries before ``index`` are void: compaction), ``CLEAR`` (all void: a
  snapshot was installed), ``COMMIT`` (a commit index hint) and ``DROP`` (the
  group was deleted). Replay applies them in order, so a marker always comes
  after the records it voids.
- **Segments**: records go to ``seg-NNNNNNNN.log`` files of ``segment_bytes``
  each (a record larger than that gets a segment of its own). A segment is
  fdatasynced before the next one gets any record, so a torn or corrupt
  record can only be in the last segment written, and replay stops there and
  truncates: only an unsynced tail is lost, which no one was told of.
- **Garbage**: a segment is deleted once no group has a live entry in it or
  before it (oldest first, so a crash leaves a valid suffix). A group that is
  idle keeps its last entries after compaction and would pin old segments
  for good: when more than ``REWRITE_SEGMENTS_MIN`` segments are kept, small
  groups pinning the oldest are written again at the head (an ``ENTRY`` with
  an index and term already present is the same entry: log matching).
- **Raft's truncation rule**: pysyncobj's follower deletes its whole log tail
  whenever an append-entries message starts before its last entry (which
  happens when a late reply moves the leader's nextIndex back), and re-adds
  only what the message carries: committed entries that counted toward a
  majority could vanish from disk until the next message. Here
  ``deleteEntriesFrom`` drops nothing; ``add`` places each entry by its index:
  an entry with the same index and term as the one held is kept (log
  matching), a different term truncates there, and an index past the end
  appends. ``on_conflict`` is told the index of every real truncation so the
  replica can stop if an applied entry would be replaced; ``settle()``
  reports the tail a message kept, so the replica can re-apply the membership
  changes pysyncobj reversed in it.
- **Preallocation**: records overwrite zeros written ahead of them, so an
  fdatasync flushes data only, not the file size (measured here: 0.11 ms
  instead of 0.21 ms). A zero header is the end of a segment's records. The
  zeros are written away from the Raft thread: a new log's first 256 KiB by
  its constructor (the caller's thread), each next segment by a background
  thread once the current one is half full. Only when that one is not ready
  does a segment grow in place.
- **A failed sync is final**: after an fdatasync error the kernel may have
  dropped the pages it could not write, and a retry can "succeed" without
  them, so every later ``sync()`` fails too (the node stops and replays).
- **Term and vote** are each group's own ``meta`` file, replaced with tmp +
  fsync + rename + fsync of the directory before pysyncobj sends the vote
  that depends on them.
- **The commit index** (pysyncobj stores it once a second, to apply at start
  what was committed) is only a hint: Raft keeps none on disk, and a lower
  one after a crash only means the leader tells it again. It is a ``COMMIT``
  record, synced with the next round's entries, never on its own.
- **Reopening** fdatasyncs the segment holding the last record it reads back:
  after kill -9 the page cache may hold records that never reached the disk,
  and an ack sent after the restart must not describe them.
- **Groups are keyed** by the path of their meta directory relative to the
  log's ``groups_root``; at reopen, the records of a group whose directory is
  gone (deleted while the process was down) are dropped.
- **Upgrade**: a group directory still holding the per-group journal of
  earlier versions (``seg-*.log`` beside ``meta``) is imported into the log
  when the group opens, then those files are deleted.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import cbor2
from pysyncobj.journal import Journal

from raftkv.storage.leveldb import fsync_dir, write_file_durably

log = logging.getLogger(__name__)

SEGMENT_BYTES = 4 * 1024 * 1024  # a segment's zeros (more when a record is bigger)
FIRST_SEGMENT_BYTES = 256 * 1024  # a new log's: many standalone groups start at once
REWRITE_SEGMENTS_MIN = 4  # past this many segments, small groups pinning the oldest move
# ... if their live entries are at most this (an idle group after compaction
# holds two entries; larger ones compact on their own, at the latest after
# RaftSettings.log_compaction_period_s)
REWRITE_GROUP_BYTES_MAX = 64 * 1024

_HEAD = struct.Struct("<II")  # body length, crc32(body)
_BODY = struct.Struct("<BHQQ")  # kind, key length, index, term
ENTRY, TRUNCATE, START, CLEAR, COMMIT, DROP = 1, 2, 3, 4, 5, 6
_KINDS = frozenset({ENTRY, TRUNCATE, START, CLEAR, COMMIT, DROP})

Entry = tuple[bytes, int, int]  # (command, index, term), as pysyncobj stores them
SyncFn = Callable[[int], None]


class LogCorrupt(Exception):
    """The log contradicts itself past what a torn tail explains (a group's
    entries skip an index): refuse to start rather than serve a wrong log."""


# -- zeros, written away from the Raft thread -----------------------------------------

_zeroing_lock = threading.Lock()
_zeroing: list[concurrent.futures.ThreadPoolExecutor] = []


def _background() -> concurrent.futures.ThreadPoolExecutor:
    """One thread per process zero-fills next segments and deletes old ones,
    in the order asked (the disk takes them in turn anyway)."""
    with _zeroing_lock:
        if not _zeroing:
            _zeroing.append(concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="journal-zeros"))
        return _zeroing[0]


def _write_zeros(fd: int, offset: int, size: int) -> None:
    zeros = bytes(min(size, SEGMENT_BYTES))
    done = 0
    while done < size:
        done += os.pwrite(fd, memoryview(zeros)[: min(len(zeros), size - done)], offset + done)


def _zero_filled_segment(path: Path, size: int) -> int:
    """Create ``path`` holding ``size`` zero bytes, durably (background thread).
    Nothing else uses the file meanwhile: it is the segment after the log's
    last (a file there is what an earlier, failed attempt left)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_zeros(fd, 0, size)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return size


def _delete_segments(paths: list[Path]) -> None:
    for path in paths:  # oldest first: a crash leaves a valid suffix
        path.unlink(missing_ok=True)


def encode_record(kind: int, key: bytes, index: int, term: int, command: bytes = b"") -> bytes:
    body = _BODY.pack(kind, len(key), index, term) + key + command
    return _HEAD.pack(len(body), zlib.crc32(body)) + body


class Record(NamedTuple):
    kind: int
    key: bytes
    log_index: int
    term: int
    command: bytes
    size: int  # of the whole record, header included


def parse_record(data: bytes | memoryview, offset: int) -> Record | None:
    """The record at ``offset``, or None if the bytes there are not a whole,
    intact record."""
    if offset + _HEAD.size + _BODY.size > len(data):
        return None
    length, crc = _HEAD.unpack_from(data, offset)
    start = offset + _HEAD.size
    end = start + length
    if length < _BODY.size or end > len(data):
        return None
    body = bytes(data[start:end])
    if zlib.crc32(body) != crc:
        return None
    kind, key_length, index, term = _BODY.unpack_from(body)
    if kind not in _KINDS or _BODY.size + key_length > length:
        return None
    key = body[_BODY.size : _BODY.size + key_length]
    return Record(kind, key, index, term, body[_BODY.size + key_length :], _HEAD.size + length)


# -- one group's entries ------------------------------------------------------------------


@dataclass(eq=False)
class _GroupState:
    """What the log holds for one group, open or not."""

    key: bytes
    entries: list[Entry] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)  # the segment of each entry's record
    sizes: list[int] = field(default_factory=list)  # each entry's record size
    bytes: int = 0  # record bytes of the entries held
    commit: int = 0  # the last commit index hint
    seq: int = 0  # the log sequence number of its last record
    durable_index: int = 0  # every entry up to this index is on disk
    open: bool = False

    def last_index(self) -> int:
        return self.entries[-1][1] if self.entries else 0

    def first_segment(self) -> int | None:
        return self.segments[0] if self.segments else None

    def append(self, entry: Entry, segment: int, size: int) -> None:
        self.entries.append(entry)
        self.segments.append(segment)
        self.sizes.append(size)
        self.bytes += size

    def cut_from(self, position: int) -> None:
        del self.entries[position:]
        del self.segments[position:]
        self.bytes -= sum(self.sizes[position:])
        del self.sizes[position:]
        self.durable_index = min(self.durable_index, self.last_index())

    def cut_before(self, position: int) -> None:
        del self.entries[:position]
        del self.segments[:position]
        self.bytes -= sum(self.sizes[:position])
        del self.sizes[:position]

    def replay(self, record: Record, segment: int) -> None:
        """Apply one record read back from the log."""
        kind, _, index, term, command, size = record
        if kind == ENTRY:
            if self.entries and index < self.entries[0][1]:
                # Before every entry held: a rewrite whose originals' segments
                # were collected (only once the whole rewrite was on disk). The
                # entries held are later ones that it writes again in turn.
                self.cut_from(0)
            if self.entries:
                position = index - self.entries[0][1]
                if 0 <= position < len(self.entries):
                    if self.entries[position][2] == term:
                        self.segments[position] = segment  # written again (a rewrite)
                        return
                    self.cut_from(position)
                elif position != len(self.entries):
                    raise LogCorrupt(f"group {self.key.decode()!r}: entry {index} follows "
                                     f"{self.last_index()} in the log")
            self.append((command, index, term), segment, size)
        elif kind == TRUNCATE:
            self.cut_from(max(0, index - self.entries[0][1])) if self.entries else None
        elif kind == START:
            if self.entries:
                self.cut_before(min(len(self.entries), max(0, index - self.entries[0][1])))
        elif kind == CLEAR:
            self.cut_from(0)
        elif kind == COMMIT:
            self.commit = index


class NodeLog:
    """The Raft log of one process, shared by its groups (see the module doc).

    Thread-safe: the hub thread appends and syncs; groups are opened and
    closed from other threads."""

    def __init__(self, directory: Path, *, groups_root: Path | None = None,
                 sync_fn: SyncFn = os.fdatasync, segment_bytes: int = SEGMENT_BYTES,
                 rewrite_group_bytes_max: int | None = None) -> None:
        self.directory = Path(directory)
        self.groups_root = Path(groups_root) if groups_root is not None else self.directory.parent
        self.segment_bytes = segment_bytes
        self.rewrite_group_bytes_max = (
            min(REWRITE_GROUP_BYTES_MAX, segment_bytes // 16)
            if rewrite_group_bytes_max is None else rewrite_group_bytes_max)
        self._sync_fn = sync_fn
        self._lock = threading.Lock()  # the buffer, the tail and every group's state
        self._sync_lock = threading.Lock()  # one sync at a time
        self._groups: dict[bytes, _GroupState] = {}
        self._segments: list[int] = []  # on disk, oldest first (the tail's included)
        self._chunks: list[tuple[int, int, bytearray]] = []  # (segment, offset, records)
        self._seq = 0  # records appended
        self._durable_seq = 0  # records on disk
        self._dirty: dict[_GroupState, None] = {}  # groups with records since the last sync
        self._tail_segment = 0  # where the next record goes
        self._tail_offset = 0
        self._tail_limit = 0  # the tail segment's size: past it, the next segment
        self._fd = -1  # the open segment (the last one written)
        self._fd_segment = 0
        self._fd_position = 0  # the open segment's file position
        self._fd_unsynced = False
        self._spare: concurrent.futures.Future[int] | None = None  # segment tail + 1
        self._spare_failed_at: int | None = None
        self._deleting: concurrent.futures.Future[None] | None = None  # the last deletion
        self._sync_failed = False
        self._closed = False
        self.syncs = 0
        self.segments_grown_in_place = 0
        self.rewritten_bytes = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self._load()

    # -- reading back ------------------------------------------------------------------

    def _segment_path(self, number: int) -> Path:
        return self.directory / f"seg-{number:08d}.log"

    def _segments_on_disk(self) -> list[int]:
        return sorted(int(p.name[4:12]) for p in self.directory.glob("seg-*.log"))

    def _load(self) -> None:
        segments = self._segments_on_disk()
        last_record: tuple[int, int] | None = None  # (segment, end of its last record)
        tail: tuple[int, int, int] | None = None  # (segment, offset, zeros up to)
        torn_at: int | None = None
        for number in segments:
            if torn_at is not None:
                log.warning("log %s: dropping segment %d after a torn record",
                            self.directory, number)
                self._segment_path(number).unlink()
                continue
            data = self._segment_path(number).read_bytes()
            offset = 0
            while offset < len(data):
                if not any(data[offset : offset + 8]):
                    break  # preallocated zeros: this segment's end
                record = parse_record(data, offset)
                if record is None:
                    torn_at = number
                    break
                self._replay(record, number)
                offset += record.size
                last_record = (number, offset)
            zeros = len(data) if data.count(0, offset) == len(data) - offset else offset
            self._segments.append(number)
            tail = (number, offset, zeros)
            if torn_at is not None:
                log.warning("log %s: segment %d: torn or corrupt record at byte %d; "
                            "truncating (an unsynced tail)", self.directory, number, offset)
                with open(self._segment_path(number), "r+b") as f:
                    f.truncate(offset)
                    os.fsync(f.fileno())
                tail = (number, offset, offset)
        if tail is None:
            self._open_tail(1, 0, 0, min(FIRST_SEGMENT_BYTES, self.segment_bytes))
        else:
            number, offset, zeros = tail
            self._open_tail(number, offset, zeros, max(zeros, offset))
            # What a killed process left in the page cache is read back but may
            # not be on disk: make it so before anyone is told of it. Only the
            # segment holding the last record can hold such records.
            if last_record is not None:
                self._sync_segment(*last_record)
        for state in self._groups.values():
            state.durable_index = state.last_index()
        for key in [k for k in self._groups if not (self.groups_root / k.decode()).exists()]:
            log.info("log %s: group %s is gone; dropping its records", self.directory,
                     key.decode())
            self.drop(key.decode())

    def _replay(self, record: Record, segment: int) -> None:
        if record.kind == DROP:
            self._groups.pop(record.key, None)
            return
        state = self._groups.get(record.key)
        if state is None:
            state = self._groups[record.key] = _GroupState(record.key)
        state.replay(record, segment)

    def _sync_segment(self, number: int, end: int) -> None:
        """fdatasync a segment through ``sync_fn``, positioned at ``end``."""
        fd = os.open(self._segment_path(number), os.O_RDWR)
        try:
            os.lseek(fd, end, os.SEEK_SET)
            self._sync_fn(fd)
        finally:
            os.close(fd)

    def _open_tail(self, number: int, offset: int, zeros: int, limit: int) -> None:
        """Continue in segment ``number`` at ``offset``; the bytes up to ``zeros``
        are known zeros (kept), anything else after ``offset`` is cut. A new
        first segment gets ``limit`` bytes of zeros now, on the caller's thread."""
        path = self._segment_path(number)
        existed = path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._fd_segment = number
        self._fd_position = 0
        if zeros <= offset:
            os.ftruncate(self._fd, offset)
        if not existed or zeros < limit:
            _write_zeros(self._fd, max(zeros, offset), limit - max(zeros, offset))
            os.fdatasync(self._fd)
            zeros = limit
        if not existed:
            fsync_dir(self.directory)
            self._segments.append(number)
        self._tail_segment = number
        self._tail_offset = offset
        self._tail_limit = max(zeros, offset)

    # -- groups ------------------------------------------------------------------------

    def open_group(self, meta_dir: Path, on_conflict: Callable[[int], None] | None = None
                   ) -> GroupJournal:
        """The journal of the group whose term and vote live in ``meta_dir``
        (under ``groups_root``); its entries are what the log holds for it."""
        meta_dir = Path(meta_dir)
        meta_dir.mkdir(parents=True, exist_ok=True)
        key = _group_key(meta_dir, self.groups_root)
        with self._lock:
            state = self._groups.get(key)
            if state is None:
                state = self._groups[key] = _GroupState(key, durable_index=0)
            if state.open:
                raise RuntimeError(f"group {key.decode()!r} is already open in {self.directory}")
            state.open = True
        journal = GroupJournal(self, state, meta_dir, on_conflict)
        journal._import_old_journal()
        return journal

    def _close_group(self, state: _GroupState) -> None:
        """The group stays in the log (its entries pin their segments) until dropped."""
        with self._lock:
            state.open = False

    def drop(self, group: str | Path) -> None:
        """Forget a group whose data is being deleted (its directory goes next)."""
        key = group.encode() if isinstance(group, str) else _group_key(Path(group),
                                                                          self.groups_root)
        with self._lock:
            state = self._groups.pop(key, None)
            if state is not None and state.open:
                self._groups[key] = state
                raise RuntimeError(f"group {key.decode()!r} is open: close it first")
            self._append(DROP, key)
        # Durable before the group's directory goes: a group reopened after a
        # crash with part of its records collected could act on a partial log.
        self.sync()

    # -- appending -------------------------------------------------------------------------

    def _append(self, kind: int, key: bytes, index: int = 0, term: int = 0,
                command: bytes = b"", *, state: _GroupState | None = None) -> tuple[int, int]:
        """Buffer one record (the caller holds the lock); its (segment, size).
        ``state``: the group it belongs to (made unsynced until the next sync)."""
        record = encode_record(kind, key, index, term, command)
        size = len(record)
        if self._tail_offset + size > self._tail_limit and self._tail_offset > 0:
            self._next_tail(size)
        elif self._tail_offset + size > self._tail_limit:
            self._tail_limit = self._tail_offset + max(self.segment_bytes, size)
            self.segments_grown_in_place += 1
        segment, offset = self._tail_segment, self._tail_offset
        if self._chunks and self._chunks[-1][0] == segment:
            self._chunks[-1][2].extend(record)
        else:
            self._chunks.append((segment, offset, bytearray(record)))
        self._tail_offset += size
        self._seq += 1
        if state is not None:
            state.seq = self._seq
            self._dirty[state] = None
        if self._tail_offset > self._tail_limit // 2:
            self._prepare_spare()
        return segment, size

    def _next_tail(self, size: int) -> None:
        """The tail segment is full: continue in the zero-filled next one if it is
        ready and fits, else grow this one in place."""
        spare = self._spare
        if spare is not None and spare.done():
            self._spare = None
            try:
                zeros = spare.result()
            except OSError as exc:
                log.warning("log %s: zero-filling the next segment failed (this one grows "
                            "in place instead): %s", self.directory, exc)
                self._spare_failed_at = self._tail_segment
                zeros = -1
            if zeros >= size:
                self._tail_segment += 1
                self._tail_offset = 0
                self._tail_limit = zeros
                self._segments.append(self._tail_segment)
                return
            if zeros >= 0:  # (a record larger than a segment: the next is made for it)
                self._segments.append(self._tail_segment + 1)
                self._tail_segment += 1
                self._tail_offset = 0
                self._tail_limit = size
                return
        self._tail_limit = self._tail_offset + max(self.segment_bytes, size)
        self.segments_grown_in_place += 1

    def _prepare_spare(self) -> None:
        if self._spare is None and self._spare_failed_at != self._tail_segment \
                and not self._closed:
            self._spare = _background().submit(
                _zero_filled_segment, self._segment_path(self._tail_segment + 1),
                self.segment_bytes)

    # -- durability ------------------------------------------------------------------------

    @property
    def unsynced(self) -> bool:
        return self._seq > self._durable_seq

    def sync(self) -> None:
        """Make every record appended so far durable. Cheap when nothing is pending."""
        with self._sync_lock:
            with self._lock:
                if self._sync_failed:
                    raise OSError(f"log {self.directory}: an earlier sync failed")
                if not self._chunks:
                    return
                chunks, self._chunks = self._chunks, []
                target = self._seq
                dirty = [(state, state.last_index()) for state in self._dirty]
                self._dirty = {}
                pinned = self._pinned_segment() if len(self._segments) > 1 else 0
            try:
                self._write(chunks)
            except BaseException:
                self._sync_failed = True
                raise
            with self._lock:
                self._durable_seq = target
                for state, index in dirty:
                    state.durable_index = min(index, state.last_index())
                self.syncs += 1
                self._collect(pinned)

    def _write(self, chunks: list[tuple[int, int, bytearray]]) -> None:
        for segment, offset, data in chunks:
            if segment != self._fd_segment:
                if self._fd_unsynced:
                    self._sync_fn(self._fd)  # a segment is on disk before the next gets any
                self._switch_file(segment)
            # write(), not pwrite(): the file position stays at the end of the
            # records, where a sync function (and a reader) can see it.
            if self._fd_position != offset:
                os.lseek(self._fd, offset, os.SEEK_SET)
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.write(self._fd, view[done:])
            self._fd_position = offset + done
            self._fd_unsynced = True
        self._sync_fn(self._fd)
        self._fd_unsynced = False

    def _switch_file(self, segment: int) -> None:
        os.close(self._fd)
        path = self._segment_path(segment)
        existed = path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._fd_segment = segment
        self._fd_position = 0
        if not existed:
            fsync_dir(self.directory)

    def _pinned_segment(self) -> int:
        """The oldest segment some group still needs (the caller holds the lock)."""
        firsts = [s for s in (g.first_segment() for g in self._groups.values()) if s is not None]
        return min([*firsts, self._tail_segment])

    def _collect(self, pinned_before_sync: int) -> None:
        """After a sync (the caller holds the lock): delete segments no group
        needs, by the pins of the records just made durable or later ones,
        whichever is older; then move small groups that pin the oldest."""
        if len(self._segments) <= 1:
            return
        pinned = min(pinned_before_sync, self._pinned_segment())
        doomed = [n for n in self._segments if n < pinned]
        if doomed:
            self._segments = [n for n in self._segments if n >= pinned]
            self._deleting = _background().submit(
                _delete_segments, [self._segment_path(n) for n in doomed])
        if len(self._segments) > REWRITE_SEGMENTS_MIN:
            oldest = self._segments[0]
            for state in list(self._groups.values()):
                if state.first_segment() == oldest \
                        and state.bytes <= self.rewrite_group_bytes_max:
                    self._rewrite(state)

    def _rewrite(self, state: _GroupState) -> None:
        """Write a group's live entries again at the head (the caller holds the lock)."""
        for position, (command, index, term) in enumerate(state.entries):
            segment, size = self._append(ENTRY, state.key, index, term, command, state=state)
            state.segments[position] = segment
            self.rewritten_bytes += size

    def close(self) -> None:
        """Sync what is buffered and close the files (the groups should be closed)."""
        if self._closed:
            return
        try:
            self.sync()
        finally:
            self._closed = True
            for job in (self._spare, self._deleting):  # (the same thread runs both, in turn)
                if job is not None:
                    with contextlib.suppress(OSError):
                        job.result()
            self._spare = self._deleting = None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _group_key(meta_dir: Path, root: Path) -> bytes:
    try:
        return meta_dir.resolve().relative_to(root.resolve()).as_posix().encode()
    except ValueError as exc:
        raise ValueError(f"{meta_dir} is not under the log's groups root {root}") from exc


# -- pysyncobj's Journal over the shared log ---------------------------------------------------


class GroupJournal(Journal):  # type: ignore[misc]
    """pysyncobj Journal of one group, its entries in the process's ``NodeLog``."""

    def __init__(self, node_log: NodeLog, state: _GroupState, meta_dir: Path,
                 on_conflict: Callable[[int], None] | None) -> None:
        self.log = node_log
        self._state = state
        self.directory = meta_dir
        self.on_conflict = on_conflict
        # After deleteEntriesFrom: the position from which the old tail was kept
        # (reported by settle(), so the caller can restore its side effects).
        self._kept_from: int | None = None
        self.truncations = 0
        self._meta_path = meta_dir / "meta"
        self._meta: dict[str, Any] = self._load_meta()
        self._commit = max(state.commit, int(self._meta.get("commit", 1)))
        self._commit_dirty = False

    def _load_meta(self) -> dict[str, Any]:
        try:
            meta = cbor2.loads(self._meta_path.read_bytes())
        except FileNotFoundError:
            return {"term": 0, "vote": None}
        assert isinstance(meta, dict), "journal meta is corrupt"
        return meta

    def _store_meta(self) -> None:
        write_file_durably(self._meta_path, cbor2.dumps(
            {"term": self._meta["term"], "vote": self._meta["vote"]}))

    def _import_old_journal(self) -> None:
        """Move a per-group journal of earlier versions into the log (see the
        module doc): its entries go in after a CLEAR (a crash mid-import
        imports again), are synced, and only then are its files deleted."""
        old = sorted(self.directory.glob("seg-*.log"))
        if not old:
            return
        entries = list(_read_old_segments(old, int(self._meta.get("first_index", 0))))
        with contextlib.suppress(FileNotFoundError):
            raw = (self.directory / "commit").read_bytes()
            if len(raw) == 8:
                self._commit = max(self._commit, int.from_bytes(raw, "little"))
        self._commit_dirty = True
        with self.log._lock:
            self._state.cut_from(0)
            self.log._append(CLEAR, self._state.key, state=self._state)
            for command, index, term in entries:
                segment, size = self.log._append(ENTRY, self._state.key, index, term,
                                                 command, state=self._state)
                self._state.append((command, index, term), segment, size)
        self.log.sync()
        self._store_meta()
        for path in [*old, self.directory / "commit"]:
            path.unlink(missing_ok=True)
        fsync_dir(self.directory)
        log.info("journal %s: %d entries moved into the log %s", self.directory,
                 len(entries), self.log.directory)

    # -- durability ------------------------------------------------------------------

    def sync(self) -> None:
        """Make every appended entry durable (the whole log's sync)."""
        self.log.sync()

    @property
    def unsynced(self) -> bool:
        return self._state.seq > self.log._durable_seq

    @property
    def durable_index(self) -> int:
        return self._state.durable_index

    @property
    def size_bytes(self) -> int:
        """Record bytes of the entries held (the log since compaction)."""
        return self._state.bytes

    @property
    def syncs(self) -> int:
        return self.log.syncs

    # -- pysyncobj Journal interface -----------------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        """Append an entry. An index already in the log means pysyncobj is
        re-adding after ``deleteEntriesFrom``: the same term is the same entry
        (kept); another term truncates there first. The position comes from the
        index itself, so a later append never acts on an earlier message's mark.
        """
        command = bytes(command)
        state = self._state
        if state.entries:
            position = idx - state.entries[0][1]
            if 0 <= position < len(state.entries):
                if state.entries[position][2] == term:
                    if self._kept_from is not None:
                        self._kept_from = max(self._kept_from, position + 1)
                    return  # the same entry is already in the log: keep it
                self._truncate(position)
                self._kept_from = None
                if self.on_conflict is not None:
                    self.on_conflict(idx)
            elif position != len(state.entries):
                raise LogCorrupt(f"journal {self.directory}: entry {idx} after "
                                 f"{state.last_index()}")
        with self.log._lock:
            segment, size = self.log._append(ENTRY, state.key, idx, term, command, state=state)
            state.append((command, idx, term), segment, size)

    def clear(self) -> None:
        self._kept_from = None
        with self.log._lock:
            self._state.cut_from(0)
            self.log._append(CLEAR, self._state.key, state=self._state)

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        """Keep the entries from position ``entryFrom`` on for now: ``add``
        replaces only those that conflict (see the module doc)."""
        if entryFrom < len(self._state.entries):
            self._kept_from = entryFrom

    def settle(self) -> list[Entry]:
        """End of one message: the old entries that ``deleteEntriesFrom`` would
        have dropped and that were kept (beyond what the message re-added)."""
        kept_from, self._kept_from = self._kept_from, None
        if kept_from is None:
            return []
        return self._state.entries[kept_from:]

    def _truncate(self, position: int) -> None:
        self.truncations += 1
        with self.log._lock:
            index = self._state.entries[position][1]
            self._state.cut_from(position)
            self.log._append(TRUNCATE, self._state.key, index, state=self._state)

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Drop entries before position ``entryTo`` (log compaction)."""
        self._kept_from = None
        if entryTo <= 0:
            return
        state = self._state
        if entryTo >= len(state.entries):
            self.clear()
            return
        with self.log._lock:
            state.cut_before(entryTo)
            self.log._append(START, state.key, state.entries[0][1], state=state)

    def __getitem__(self, item: Any) -> Any:
        return self._state.entries[item]

    def __len__(self) -> int:
        return len(self._state.entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._state.entries)

    def _destroy(self) -> None:
        """pysyncobj closes its journal: store the commit hint, sync."""
        if self._commit_dirty:
            self._store_commit()
        self.log.sync()

    def close(self) -> None:
        """The group is closed (its entries stay in the log, until dropped)."""
        self.log._close_group(self._state)

    def _store_commit(self) -> None:
        with self.log._lock:
            self._state.commit = self._commit
            self.log._append(COMMIT, self._state.key, self._commit)  # (no ack waits for it)
        self._commit_dirty = False

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        if self._commit != raftCommitIndex:
            self._commit = raftCommitIndex
            self._commit_dirty = True

    def getRaftCommitIndex(self) -> int:
        return self._commit

    def setCurrentTerm(self, term: int, votedForNodeId: str | None) -> None:
        self._meta["term"] = term
        self._meta["vote"] = votedForNodeId
        self._store_meta()

    def getCurrentTerm(self) -> int:
        return int(self._meta["term"])

    def getVotedForNodeId(self) -> str | None:
        vote = self._meta["vote"]
        return vote if isinstance(vote, str) else None

    def onOneSecondTimer(self) -> None:
        if self._commit_dirty:
            self._store_commit()  # a record: synced with the next round's entries

    # -- for the dump crash window -------------------------------------------

    def position_of(self, entry: Entry) -> int | None:
        """Position of ``entry`` (same index, term and command), or None."""
        entries = self._state.entries
        if not entries:
            return None
        position = entry[1] - entries[0][1]
        if 0 <= position < len(entries) and entries[position] == entry:
            return position
        return None


# -- the per-group journal of earlier versions (read once, to import) ---------------------

_OLD_HEAD = struct.Struct("<IIQQ")  # body length, crc32(body), index, term


def _read_old_segments(paths: list[Path], first_index: int) -> Iterator[Entry]:
    """The entries of a per-group journal of earlier versions, up to its first
    torn record or index gap (that journal's own reading rule)."""
    last: int | None = None
    for path in paths:
        data = path.read_bytes()
        offset = 0
        while offset + _OLD_HEAD.size <= len(data) and any(data[offset : offset + 8]):
            length, crc, index, term = _OLD_HEAD.unpack_from(data, offset)
            end = offset + 8 + length
            if length < 16 or end > len(data) or zlib.crc32(data[offset + 8 : end]) != crc:
                return
            if index >= first_index:
                if last is not None and index != last + 1:
                    return
                last = index
                yield bytes(data[offset + 24 : end]), index, term
            offset = end

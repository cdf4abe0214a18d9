"""The LevelDB adapter: one replica's state, and its snapshot files.

Only this module imports plyvel. A ``Store`` lives in a directory::

    CURRENT          name of the live database directory (written atomically)
    db-000001/       the plyvel database

Installing a snapshot builds a new ``db-N`` directory, makes it durable, then
switches ``CURRENT`` to it (tmp + fsync + rename + fsync of the directory), so
a crash at any point leaves either the old or the new database live, never a
mix. Leftover directories are removed at open.

Writes are not fsynced: the Raft journal is, and replaying it re-applies
anything LevelDB lost (every batch carries ``!applied``, so replay is
idempotent). A snapshot dump is fsynced before the journal is truncated.

Snapshot (dump) file format: frames of ``raftkv.protocol.framing`` holding cbor:
a header map (``magic``, ``meta``, ``applied``), then blocks of ``[[k, v], ...]``,
then a trailer ``{"end": true, "pairs": n}``. A file without the trailer is
incomplete and is refused.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import cbor2
import plyvel

from raftkv.protocol.framing import FrameDecoder, encode_frame
from raftkv.statemachine.layout import APPLIED_KEY, decode_index

SNAPSHOT_MAGIC = "raftkv-snapshot-1"
SNAPSHOT_BLOCK_PAIRS = 1000
SNAPSHOT_FRAME_BYTES_MAX = 64 * 1024 * 1024
# Recently read keys whose values are at most this big (or absent) are kept
# in memory: apply reads the same few records (owner, dedup floor, key count)
# for every write, and LevelDB's get costs several microseconds through plyvel.
# The budget is per replica (a node may host hundreds): keys and values, plus
# an estimate of the dict's own cost per entry.
READ_CACHE_BYTES_MAX = 256 * 1024
READ_CACHE_VALUE_BYTES_MAX = 512
READ_CACHE_ENTRY_OVERHEAD_BYTES = 100


class SnapshotError(Exception):
    """A snapshot file is incomplete or not a raftkv snapshot."""


class SnapshotCancelled(Exception):
    """A background dump was cancelled because the database is being replaced."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def open_database(path: Path, *, error_if_exists: bool = False) -> Any:
    """A plyvel database with the options every Store uses: plyvel's and
    LevelDB's defaults. ``raftkv bench ceilings`` opens its raw database here
    too, so its numbers are those of the options raftkv runs with."""
    return plyvel.DB(str(path), create_if_missing=True, error_if_exists=error_if_exists)


def _cached_size(key: bytes, value: bytes | None) -> int:
    return len(key) + (len(value) if value is not None else 0) + READ_CACHE_ENTRY_OVERHEAD_BYTES


class Store:
    """A replica's LevelDB. Thread-safe: the Raft thread writes, others read.

    ``get`` keeps what it read (small values and absent keys, up to
    ``READ_CACHE_BYTES_MAX``, then it starts over) and ``write``
    updates the kept keys it writes, under the same lock as the batch: every
    change of the database goes through ``write`` or ``replace_from``, so the
    cache always says what LevelDB would."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        current = self.directory / "CURRENT"
        if current.exists():
            name = current.read_text().strip()
        else:
            name = "db-000001"
            write_file_durably(current, name.encode())
        for stale in self.directory.glob("db-*"):
            if stale.name != name:
                shutil.rmtree(stale, ignore_errors=True)
        self._name = name
        self._db = open_database(self.directory / name)
        self._applied = decode_index(self._db.get(APPLIED_KEY))
        self._dumps_cancel = threading.Event()
        self._cache: dict[bytes, bytes | None] = {}
        self._cache_bytes = 0

    # -- reads and writes ---------------------------------------------------

    @property
    def applied_index(self) -> int:
        """Index of the last log entry whose effects are in this database."""
        return self._applied

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            cache = self._cache
            try:
                return cache[key]
            except KeyError:
                pass
            value: bytes | None = self._db.get(key)
            if value is None or len(value) <= READ_CACHE_VALUE_BYTES_MAX:
                size = _cached_size(key, value)
                if self._cache_bytes + size > READ_CACHE_BYTES_MAX:
                    cache.clear()  # (cheaper than dropping the oldest one by one)
                    self._cache_bytes = 0
                cache[key] = value
                self._cache_bytes += size
            return value

    def scan(self, start: bytes, stop: bytes, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` pairs with ``start <= key < stop``, in key order."""
        with self._lock:
            out: list[tuple[bytes, bytes]] = []
            if limit <= 0:
                return out
            for pair in self._db.iterator(start=start, stop=stop):
                out.append(pair)
                if len(out) >= limit:
                    break
            return out

    def last_key(self, start: bytes, stop: bytes) -> bytes | None:
        """The greatest key with ``start <= key < stop``, or None."""
        with self._lock:
            for key in self._db.iterator(start=start, stop=stop, reverse=True,
                                         include_value=False):
                return bytes(key)
            return None

    def write(self, writes: dict[bytes, bytes | None]) -> None:
        """Write one atomic batch (value None deletes); it must carry ``!applied``."""
        with self._lock:
            with self._db.write_batch() as batch:
                for key, value in writes.items():
                    if value is None:
                        batch.delete(key)
                    else:
                        batch.put(key, value)
            cache = self._cache
            for key, value in writes.items():
                if key in cache:
                    self._cache_bytes -= _cached_size(key, cache[key])
                    if value is None or len(value) <= READ_CACHE_VALUE_BYTES_MAX:
                        cache[key] = value
                        self._cache_bytes += _cached_size(key, value)
                    else:
                        del cache[key]
            applied = writes.get(APPLIED_KEY)
            if applied is not None:
                self._applied = decode_index(applied)

    # -- snapshots ----------------------------------------------------------

    def begin_dump(self) -> tuple[int, Iterator[tuple[bytes, bytes]]]:
        """The applied index and a consistent view of every pair, as of now.

        Iterate the view from any thread; a ``replace_from`` meanwhile cancels
        it (SnapshotCancelled) before the database it reads is closed.
        """
        with self._lock:
            self._dumps_cancel.clear()
            snapshot = self._db.snapshot()
            applied = self._applied

        def pairs() -> Iterator[tuple[bytes, bytes]]:
            try:
                for n, item in enumerate(snapshot.iterator()):
                    if n % SNAPSHOT_BLOCK_PAIRS == 0 and self._dumps_cancel.is_set():
                        raise SnapshotCancelled
                    yield item
            finally:
                snapshot.close()

        return applied, pairs()

    def replace_from(self, pairs: Iterator[tuple[bytes, bytes]]) -> None:
        """Make the database hold exactly ``pairs`` (a snapshot being installed)."""
        number = int(self._name.split("-")[1]) + 1
        name = f"db-{number:06d}"
        path = self.directory / name
        shutil.rmtree(path, ignore_errors=True)
        fresh = open_database(path, error_if_exists=True)
        try:
            batch = fresh.write_batch()
            for n, (key, value) in enumerate(pairs, 1):
                batch.put(key, value)
                if n % SNAPSHOT_BLOCK_PAIRS == 0:
                    batch.write()
                    batch = fresh.write_batch()
            batch.write()
            # A synced write makes everything before it durable in LevelDB's log.
            fresh.put(b"!installed", b"1", sync=True)
        except BaseException:
            fresh.close()
            shutil.rmtree(path, ignore_errors=True)
            raise
        with self._lock:
            self._dumps_cancel.set()
            old_name = self._name
            self._db.close()
            write_file_durably(self.directory / "CURRENT", name.encode())
            self._db = fresh
            self._cache.clear()
            self._cache_bytes = 0
            self._name = name
            self._applied = decode_index(fresh.get(APPLIED_KEY))
        shutil.rmtree(self.directory / old_name, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            self._dumps_cancel.set()
            if not self._db.closed:
                self._db.close()


def write_snapshot(
    out: BinaryIO, meta: dict[str, Any], applied: int, pairs: Iterator[tuple[bytes, bytes]]
) -> int:
    """Write a snapshot file; returns the number of pairs. The caller fsyncs."""
    header = {"magic": SNAPSHOT_MAGIC, "meta": meta, "applied": applied}
    out.write(encode_frame(cbor2.dumps(header)))
    count = 0
    block: list[list[bytes]] = []
    for key, value in pairs:
        block.append([key, value])
        count += 1
        if len(block) >= SNAPSHOT_BLOCK_PAIRS:
            out.write(encode_frame(cbor2.dumps(block)))
            block = []
    if block:
        out.write(encode_frame(cbor2.dumps(block)))
    out.write(encode_frame(cbor2.dumps({"end": True, "pairs": count})))
    return count


class SnapshotReader:
    """Reads a snapshot file: ``header`` at once, ``pairs()`` streams the data
    and raises SnapshotError if the trailer is missing or the count is wrong."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self._decoder = FrameDecoder(SNAPSHOT_FRAME_BYTES_MAX)
        self._pending: list[bytes] = []
        first = self._next_frame()
        try:
            header = cbor2.loads(first) if first is not None else None
        except Exception as exc:
            raise SnapshotError(f"{path}: header is not cbor: {exc}") from exc
        if not isinstance(header, dict) or header.get("magic") != SNAPSHOT_MAGIC:
            self.close()
            raise SnapshotError(f"{path}: not a raftkv snapshot")
        self.header: dict[str, Any] = header
        self.applied: int = int(header["applied"])
        self.meta: dict[str, Any] = header["meta"]

    def _next_frame(self) -> bytes | None:
        while not self._pending:
            chunk = self._file.read(1 << 20)
            if not chunk:
                return None
            self._decoder.feed(chunk)
            self._pending.extend(self._decoder.frames())
        return self._pending.pop(0)

    def pairs(self) -> Iterator[tuple[bytes, bytes]]:
        count = 0
        while True:
            frame = self._next_frame()
            if frame is None:
                raise SnapshotError(f"{self.path}: incomplete snapshot (no trailer)")
            body = cbor2.loads(frame)
            if isinstance(body, dict):
                if body.get("end") is not True or body.get("pairs") != count:
                    raise SnapshotError(f"{self.path}: trailer does not match the data")
                return
            for key, value in body:
                count += 1
                yield key, value

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Batching commands into Raft log entries, and read barriers (trio side).

``Proposer.propose(command, on_done)`` and ``Proposer.barrier(on_done)`` call
``on_done(result, error)`` once, in the trio thread, when the entry carrying
the command commits (or fails). No task or event per request: the server
turns the callback into a reply. Commands that arrive while ``in_flight_max`` entries are
already in flight wait and go out together in the next entry, so an idle
cluster commits each command at once (low latency) and a busy one packs many
per entry (high throughput) with no timer. One entry in flight: since every
group of a node shares one Raft log and one sync per hub round, fuller
entries beat a second one in flight (side by side, 64 clients, writes: about
10 % more on 1 and on 8 physical shards, and no loss at 1 or 16 clients;
docs/PERFORMANCE.md).

A move's steps, but its cutover, have a lane of their own (``separate``):
one entry in flight beside the window of the other commands.

A barrier is a command that changes nothing. Every read that waits for one
and arrives before an entry is proposed rides on that entry's barrier; once
the barrier is applied on this leader, every write acknowledged before those
reads began is in LevelDB. Reads that arrive while a barrier is in flight
wait for the next one. Client strong reads no longer use barriers (they take
a read index, with no log entry: ``raftkv/replication/readindex.py``); the
move steps' reads do, where a barrier also orders them after the move's own
entries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from raftkv.errors import InternalError, RaftKVError, Timeout
from raftkv.replication.replica import Replica
from raftkv.statemachine.commands import Barrier, encode_commands

log = logging.getLogger(__name__)

OnDone = Callable[[Any, RaftKVError | None], None]


@dataclass(eq=False)
class _Batch:
    commands: list[Any] = field(default_factory=list)
    waiters: list[OnDone] = field(default_factory=list)
    readers: list[OnDone] = field(default_factory=list)
    bytes: int = 0
    proposed_at: float = 0.0
    done: bool = False
    separate: bool = False  # a batch of the separate lane (see ``propose``)


class RunSoon(Protocol):
    """How results reach the trio thread: a ``hub.Relay`` (or a ``TrioToken``)."""

    def run_sync_soon(self, fn: Callable[..., object], *args: Any) -> None: ...


class Proposer:
    def __init__(self, replica: Replica, to_trio: RunSoon, *,
                 encode: Callable[[list[Any]], bytes] = encode_commands,
                 in_flight_max: int = 1, batch_commands_max: int = 2048,
                 batch_bytes_max: int = 4 * 1024 * 1024, timeout_s: float = 10.0) -> None:
        self.replica = replica
        self._encode = encode
        self.timeout_s = timeout_s
        self._in_flight_batches: set[_Batch] = set()
        self._to_trio = to_trio
        self.in_flight_max = in_flight_max
        self.batch_commands_max = batch_commands_max
        self.batch_bytes_max = batch_bytes_max
        self._pending = _Batch()
        self._in_flight = 0
        self._separate = _Batch(separate=True)
        self._separate_in_flight = 0
        self.entries_proposed = 0
        self.commands_proposed = 0
        self.urgent_proposed = 0

    def propose(self, command: Any, on_done: OnDone, size_bytes: int = 0, *,
                urgent: bool = False, separate: bool = False) -> None:
        """Replicate one command; ``on_done(apply result, None)`` or ``(None, error)``.

        ``urgent``: propose it now, with whatever is pending, even past
        ``in_flight_max`` (a move's cutover steps: the logical shard is
        unavailable until they commit, so they do not wait a round behind the
        entry in flight).

        ``separate``: in entries of their own, one in flight at a time, beside
        the window of the other commands (a move's other steps: they neither
        wait a round behind clients' writes nor hold them back one. A worker
        sends a move's steps one after the other, and they touch a logical
        shard that takes no client writes in this group, so the order between
        the two lanes does not matter)."""
        batch = self._separate if separate else self._pending
        batch.commands.append(command)
        batch.waiters.append(on_done)
        batch.bytes += size_bytes
        if separate:
            if self._separate_in_flight == 0:
                self._flush_separate()
        elif urgent:
            self.urgent_proposed += 1
            self._flush()
        else:
            self._maybe_flush()

    def barrier(self, on_done: OnDone) -> None:
        """``on_done({"i": index}, None)`` once a barrier proposed after this call
        is applied here."""
        self._pending.readers.append(on_done)
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        batch = self._pending
        full = (len(batch.commands) >= self.batch_commands_max
                or batch.bytes >= self.batch_bytes_max)
        if self._in_flight < self.in_flight_max or full:
            self._flush()

    def _flush_separate(self) -> None:
        batch = self._separate
        if not batch.commands:
            return
        self._separate = _Batch(separate=True)
        self._separate_in_flight += 1
        self._submit(batch)

    def _flush(self) -> None:
        batch = self._pending
        if not batch.commands and not batch.readers:
            return
        self._pending = _Batch()
        self._in_flight += 1
        self._submit(batch)

    def _submit(self, batch: _Batch) -> None:
        batch.proposed_at = trio.current_time()
        self._in_flight_batches.add(batch)
        commands: list[Any] = list(batch.commands)
        if batch.readers:
            commands.append(Barrier())
        self.entries_proposed += 1
        self.commands_proposed += len(commands)

        def on_done(results: Any, error: RaftKVError | None) -> None:
            # Raft thread (or this thread, for an immediate refusal).
            self._to_trio.run_sync_soon(self._complete, batch, results, error)

        self.replica.submit(self._encode(commands), on_done)

    def expire_stale(self) -> None:
        """Fail the waiters of entries that got no answer within ``timeout_s``;
        the node calls this about once a second (one timer for all requests,
        instead of a cancel scope per request). Their outcome is unknown: the
        entry may still commit."""
        self.expire(trio.current_time() - self.timeout_s, Timeout(
            f"no commit within {self.timeout_s} s; the write may still take effect"))

    def expire(self, proposed_before: float, error: RaftKVError) -> None:
        """Fail the waiters of every entry proposed before ``proposed_before``
        (``math.inf``: all, when the replica is closed)."""
        for batch in [b for b in self._in_flight_batches if b.proposed_at < proposed_before]:
            self._complete(batch, None, error)
        if proposed_before == float("inf"):
            for on_done in (self._pending.waiters + self._pending.readers
                            + self._separate.waiters):
                self._call(on_done, None, error)
            self._pending = _Batch()
            self._separate = _Batch(separate=True)

    def _complete(self, batch: _Batch, results: Any, error: RaftKVError | None) -> None:
        if batch.done:
            return  # already expired; the late answer changes nothing for the waiters
        batch.done = True
        self._in_flight_batches.discard(batch)
        if batch.separate:
            self._separate_in_flight -= 1
        else:
            self._in_flight -= 1
        expected = len(batch.commands) + bool(batch.readers)
        if error is None and not (isinstance(results, list) and len(results) == expected):
            error = InternalError(f"apply returned {results!r} for a batch of {expected}")
        for position, on_done in enumerate(batch.waiters):
            self._call(on_done, None if error else results[position], error)
        for on_done in batch.readers:
            self._call(on_done, None if error else results[-1], error)
        if batch.separate:
            self._flush_separate()
        else:
            self._maybe_flush()  # (past the window after an urgent entry: not yet)

    @staticmethod
    def _call(on_done: OnDone, result: Any, error: RaftKVError | None) -> None:
        try:
            on_done(result, error)
        except Exception:
            log.exception("a proposer callback failed")

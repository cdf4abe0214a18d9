"""Batching commands into Raft log entries, and read barriers (trio side).

``Proposer.propose(command)`` and ``Proposer.barrier()`` are awaited by
request handlers. Commands that arrive while ``in_flight_max`` entries are
already in flight wait and go out together in the next entry, so an idle
cluster commits each command at once (low latency) and a busy one packs many
per entry (high throughput) with no timer.

A barrier is a command that changes nothing. Every strong read that arrives
before an entry is proposed rides on that entry's barrier; once the barrier
is applied on this leader, every write acknowledged before those reads began
is in LevelDB, and the reads are served from it (DESIGN section 2). Reads that
arrive while a barrier is in flight wait for the next one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from raftkv.errors import InternalError, RaftKVError
from raftkv.replication.replica import Replica
from raftkv.statemachine.commands import Barrier, Command, encode_commands


@dataclass(eq=False)
class _Waiter:
    event: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: RaftKVError | None = None


@dataclass(eq=False)
class _Batch:
    commands: list[Command] = field(default_factory=list)
    waiters: list[_Waiter] = field(default_factory=list)
    readers: _Waiter | None = None
    bytes: int = 0


class Proposer:
    def __init__(self, replica: Replica, trio_token: trio.lowlevel.TrioToken,
                 in_flight_max: int = 2, batch_commands_max: int = 2048,
                 batch_bytes_max: int = 4 * 1024 * 1024) -> None:
        self.replica = replica
        self._token = trio_token
        self.in_flight_max = in_flight_max
        self.batch_commands_max = batch_commands_max
        self.batch_bytes_max = batch_bytes_max
        self._pending = _Batch()
        self._in_flight = 0
        self.entries_proposed = 0
        self.commands_proposed = 0

    async def propose(self, command: Command, size_bytes: int = 0) -> Any:
        """Replicate one command; returns its apply result or raises RaftKVError."""
        waiter = _Waiter()
        batch = self._pending
        batch.commands.append(command)
        batch.waiters.append(waiter)
        batch.bytes += size_bytes
        self._maybe_flush()
        return await self._wait(waiter)

    async def barrier(self) -> int:
        """Wait until a barrier proposed after this call is applied here."""
        batch = self._pending
        if batch.readers is None:
            batch.readers = _Waiter()
        waiter = batch.readers
        self._maybe_flush()
        result = await self._wait(waiter)
        return int(result["i"])

    async def _wait(self, waiter: _Waiter) -> Any:
        await waiter.event.wait()
        if waiter.error is not None:
            raise waiter.error
        return waiter.result

    def _maybe_flush(self) -> None:
        batch = self._pending
        full = (len(batch.commands) >= self.batch_commands_max
                or batch.bytes >= self.batch_bytes_max)
        if self._in_flight < self.in_flight_max or full:
            self._flush()

    def _flush(self) -> None:
        batch = self._pending
        if not batch.commands and batch.readers is None:
            return
        self._pending = _Batch()
        commands = list(batch.commands)
        if batch.readers is not None:
            commands.append(Barrier())
        self._in_flight += 1
        self.entries_proposed += 1
        self.commands_proposed += len(commands)

        def on_done(results: Any, error: RaftKVError | None) -> None:
            # Raft thread (or this thread, for an immediate refusal).
            self._token.run_sync_soon(self._complete, batch, results, error)

        self.replica.submit(encode_commands(commands), on_done)

    def _complete(self, batch: _Batch, results: Any, error: RaftKVError | None) -> None:
        self._in_flight -= 1
        expected = len(batch.commands) + (batch.readers is not None)
        if error is None and not (isinstance(results, list) and len(results) == expected):
            error = InternalError(f"apply returned {results!r} for a batch of {expected}")
        waiters = list(batch.waiters)
        if batch.readers is not None:
            waiters.append(batch.readers)
        for position, waiter in enumerate(waiters):
            if error is not None:
                waiter.error = error
            else:
                waiter.result = results[position]
            waiter.event.set()
        if self._pending.commands or self._pending.readers is not None:
            self._flush()

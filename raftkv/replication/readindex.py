"""Linearizable reads without a log entry: the read index of the Raft thesis
(section 6.4), as pure bookkeeping for one group's leader. No I/O, no clock.

A strong read that arrives at a leader of term T may be served from the
leader's state once

1. the leader has committed an entry of term T (pysyncobj appends a no-op when
   it becomes leader), so its commit index covers every entry committed by any
   earlier leader; the *read index* is the commit index at that point, never
   earlier than the read's arrival;
2. after the read arrived, a majority of the group (the leader counts itself)
   still acknowledged it as leader of term T: the leader started a heartbeat
   round ``r`` after the read arrived, and enough followers answered round
   ``r`` or a later one, in term T. A leader deposed before the read arrived
   cannot collect that majority: a majority has moved to a higher term and
   rejects term T's heartbeats;
3. the leader has applied its log up to the read index.

Then no write acknowledged before the read arrived is missing from the state
read, and the read is linearizable. A change of term or loss of leadership
fails every pending read (the caller retries: a read has no effects).

``ReadIndex`` holds the rounds and the pending reads; the transport
(``replica._HubTransport``) asks it which round to stamp on heartbeats, tells
it about acknowledgements, and completes the reads it hands back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

OnRead = Callable[[int | None, Any], None]
"""``on_read(read_index, None)`` when the read may be served, or
``on_read(None, error)``."""


@dataclass(slots=True)
class _Waiter:
    round: int  # the first heartbeat round started after the read arrived
    index: int | None  # the read index; None until a term-T entry is committed
    on_read: OnRead


class ReadIndex:
    """Pending strong reads of one group member, while it leads one term.

    ``voters`` is the size of the group (this member included)."""

    def __init__(self) -> None:
        self.term: int | None = None  # the term the pending reads were taken in
        self.started = 0  # the last heartbeat round started (stamped on messages)
        self._wanted = False  # a pending read waits for a round not started yet
        self._acked: dict[str, int] = {}  # peer -> highest round it acknowledged in term
        self._waiters: list[_Waiter] = []
        self.served = 0
        self.rounds = 0

    @property
    def pending(self) -> int:
        return len(self._waiters)

    def leading(self, term: int | None) -> list[OnRead]:
        """This member leads ``term`` now (None: it does not lead). Returns the
        pending reads that must fail: all of them unless they were taken in
        ``term``."""
        if term is not None and term == self.term:
            return []
        failed = self.fail_all()
        self.term = term
        self._acked = {}
        return failed

    def request(self, term: int, commit_index: int, commit_in_term: bool,
                on_read: OnRead) -> None:
        """A strong read arrived at a leader of ``term`` (``leading(term)`` was
        called first). ``commit_in_term``: the entry at ``commit_index`` is of
        ``term``."""
        if term != self.term:
            raise ValueError(f"a read of term {term} while leading term {self.term}")
        self._waiters.append(_Waiter(self.started + 1, commit_index if commit_in_term else None,
                                     on_read))
        self._wanted = True

    def start_round(self) -> int | None:
        """A heartbeat round to send now, or None if no read waits for one."""
        if not self._wanted:
            return None
        self._wanted = False
        self.started += 1
        self.rounds += 1
        return self.started

    def ack(self, peer: str, round_: int, term: int) -> None:
        """``peer`` answered round ``round_``'s heartbeat as a follower of ``term``."""
        if term == self.term and round_ > self._acked.get(peer, 0):
            self._acked[peer] = round_

    @property
    def unindexed(self) -> bool:
        """Some pending read waits for the term's first commit."""
        return any(w.index is None for w in self._waiters)

    def commit_advanced(self, term: int, commit_index: int, commit_in_term: bool) -> None:
        """The leader's commit index now; fixes the read index of reads that
        arrived before the term's first commit."""
        if term != self.term or not commit_in_term:
            return
        for waiter in self._waiters:
            if waiter.index is None:
                waiter.index = commit_index

    def ready(self, voters: int, applied: int) -> list[tuple[OnRead, int]]:
        """The reads that may be served now, removed from the pending ones."""
        if not self._waiters:
            return []
        confirmed = self._confirmed_round(voters)
        out: list[tuple[OnRead, int]] = []
        kept: list[_Waiter] = []
        for waiter in self._waiters:
            if waiter.round <= confirmed and waiter.index is not None \
                    and waiter.index <= applied:
                out.append((waiter.on_read, waiter.index))
            else:
                kept.append(waiter)
        self._waiters = kept
        self.served += len(out)
        return out

    def fail_all(self) -> list[OnRead]:
        """Every pending read, removed (leadership or the term changed)."""
        failed = [w.on_read for w in self._waiters]
        self._waiters = []
        self._wanted = False
        return failed

    def _confirmed_round(self, voters: int) -> int:
        """The latest round a majority (this member included) acknowledged."""
        needed = voters // 2  # followers needed besides this member
        if needed == 0:
            return self.started  # a lone member is its own majority
        rounds = sorted(self._acked.values(), reverse=True)
        return rounds[needed - 1] if len(rounds) >= needed else 0

"""Apply one log entry to a replica's state: pure, deterministic, no I/O.

``apply_entry(read, index, payload)`` reads the current state through ``read``
(key -> value or None) and returns the mutations to write in one batch
(including ``!applied = index``) and one result per command. Every replica
computes the same output from the same state and entry, so replicas stay
identical. Nothing here raises for bad input: a malformed entry produces an
error result and changes nothing but the applied index.

Results are plain cbor-able values:

- write ok: ``{"i": index, "r": [None | existed: bool | True, ...]}`` (put, delete, cas)
- cas mismatch: ``{"i": index, "err": "PRECONDITION_FAILED", "op": k, "cur": value-or-None}``;
  the whole write changed nothing
- retried write whose record was forgotten: ``{"err": "OUTCOME_UNKNOWN", "msg": ...}``
- barrier: ``{"i": index}``

A write's ops run in order (a cas sees the puts and deletes before it in the
same write) into a scratch overlay; the overlay is kept only if every cas
precondition held, so a write is all or nothing.

Exactly-once: a write's result is stored under ``(client_id, seq)`` in the
same batch as its effect; a retry returns the stored result without applying
again (a failed cas's stored result omits ``cur``). Each client has a floor:
results of seqs <= floor are forgotten. The floor rises to ``ack_seq`` (every
seq <= it has been answered to the client) and to ``seq - DEDUP_RESULTS_MAX``,
so every stored result lies in ``(floor, floor + DEDUP_RESULTS_MAX]``: at most
that many per client, and a rise of the floor deletes at most that many keys
(about one per write in steady state). A result is one key, so a write costs
O(1) however many of the client's requests are in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2

from raftkv.statemachine import layout
from raftkv.statemachine.commands import (
    CAS,
    DELETE,
    PUT,
    Barrier,
    MalformedEntry,
    Write,
    decode_commands,
)

DEDUP_RESULTS_MAX = 1024

ReadFn = Callable[[bytes], bytes | None]


@dataclass
class ApplyOutput:
    """What to write (key -> value, None = delete) and what to answer."""

    writes: dict[bytes, bytes | None] = field(default_factory=dict)
    results: list[Any] | None = None
    error: str | None = None


class _Overlay:
    """Reads see earlier writes of the same entry."""

    def __init__(self, read: ReadFn, writes: dict[bytes, bytes | None]) -> None:
        self._read = read
        self.writes = writes

    def get(self, key: bytes) -> bytes | None:
        if key in self.writes:
            return self.writes[key]
        return self._read(key)


def apply_entry(read: ReadFn, index: int, payload: bytes) -> ApplyOutput:
    out = ApplyOutput()
    out.writes[layout.APPLIED_KEY] = layout.encode_index(index)
    try:
        commands = decode_commands(payload)
    except MalformedEntry as exc:
        out.error = f"malformed log entry at index {index}: {exc}"
        return out
    state = _Overlay(read, out.writes)
    out.results = [
        {"i": index} if isinstance(c, Barrier) else _apply_write(state, index, c)
        for c in commands
    ]
    return out


def _apply_write(state: _Overlay, index: int, write: Write) -> dict[str, Any]:
    cid = write.client_id
    floor_key = layout.dedup_key(cid)
    floor = layout.decode_index(state.get(floor_key))
    if write.seq <= floor:
        return {"err": "OUTCOME_UNKNOWN",
                "msg": f"seq {write.seq} is older than this client's dedup window"}
    result_key = layout.dedup_result_key(cid, write.seq)
    stored = state.get(result_key)
    if stored is not None:
        previous: dict[str, Any] = cbor2.loads(stored)
        return previous

    result = _apply_mutations(state, index, write)
    state.writes[result_key] = cbor2.dumps({k: v for k, v in result.items() if k != "cur"})
    new_floor = max(floor, min(write.ack_seq, write.seq - 1), write.seq - DEDUP_RESULTS_MAX)
    if new_floor > floor:
        # Stored results lie in (floor, floor + MAX]: this loop is bounded.
        for seq in range(floor + 1, min(new_floor, floor + DEDUP_RESULTS_MAX) + 1):
            state.writes[layout.dedup_result_key(cid, seq)] = None
        state.writes[floor_key] = layout.encode_index(new_floor)
    return result


def _apply_mutations(state: _Overlay, index: int, write: Write) -> dict[str, Any]:
    scratch = _Overlay(state.get, {})
    per_op: list[Any] = []
    for position, m in enumerate(write.mutations):
        key = layout.data_key(write.keyspace_id, m.logical_shard, m.key)
        if m.kind == PUT:
            scratch.writes[key] = m.value
            per_op.append(None)
        elif m.kind == DELETE:
            per_op.append(scratch.get(key) is not None)
            scratch.writes[key] = None
        else:
            assert m.kind == CAS
            current = scratch.get(key)
            if current != m.expected:
                return {"i": index, "err": "PRECONDITION_FAILED", "op": position, "cur": current}
            scratch.writes[key] = m.value
            per_op.append(True)
    state.writes.update(scratch.writes)
    return {"i": index, "r": per_op}

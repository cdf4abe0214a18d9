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

Exactly-once: a write's ``(client_id, seq)`` and its result are stored in the
client's dedup record in the same batch as its effect; a retry returns the
stored result without applying again. ``ack_seq`` (every seq <= it has been
answered to the client) lets the record forget old results; at most
``DEDUP_RESULTS_MAX`` results are kept per client.
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
    record_key = layout.dedup_key(write.client_id)
    raw_record = state.get(record_key)
    record: dict[str, Any] = cbor2.loads(raw_record) if raw_record else {"f": 0, "d": {}}
    done: dict[int, Any] = record["d"]
    if write.seq in done:
        return dict(done[write.seq])
    if write.seq <= record["f"]:
        return {"err": "OUTCOME_UNKNOWN",
                "msg": f"seq {write.seq} is older than this client's dedup window"}

    result = _apply_mutations(state, index, write)
    stored = {k: v for k, v in result.items() if k != "cur"}
    done[write.seq] = stored
    floor = record["f"]
    for seq in [s for s in done if s <= floor]:
        del done[seq]
    if len(done) > DEDUP_RESULTS_MAX:
        for seq in sorted(done)[: len(done) - DEDUP_RESULTS_MAX]:
            floor = max(floor, seq)
            del done[seq]
    record["f"] = floor
    state.writes[record_key] = cbor2.dumps(record)
    return result


def _apply_mutations(state: _Overlay, index: int, write: Write) -> dict[str, Any]:
    keys = [layout.data_key(write.keyspace_id, m.logical_shard, m.key) for m in write.mutations]
    # Check every precondition first: the write is all or nothing.
    for position, (m, key) in enumerate(zip(write.mutations, keys, strict=True)):
        if m.kind == CAS:
            current = state.get(key)
            if current != m.expected:
                return {"i": index, "err": "PRECONDITION_FAILED", "op": position, "cur": current}
    per_op: list[Any] = []
    for m, key in zip(write.mutations, keys, strict=True):
        if m.kind == PUT:
            state.writes[key] = m.value
            per_op.append(None)
        elif m.kind == DELETE:
            per_op.append(state.get(key) is not None)
            state.writes[key] = None
        else:
            assert m.kind == CAS
            state.writes[key] = m.value
            per_op.append(True)
    return {"i": index, "r": per_op}

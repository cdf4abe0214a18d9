"""Apply one log entry to a replica's state: pure, deterministic, no I/O.

``apply_entry(state, index, payload)`` reads the current state through
``state.get`` (key -> value or None) and ``state.scan`` and returns the
mutations to write in one batch
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
- a write to a logical shard this group does not serve (no owner record, or
  one moved away: then ``dest`` names the group it went to):
  ``{"i": index, "err": "WRONG_SHARD", "ks": ks, "ls": ls}``; nothing changes
  and nothing is stored for the retry (it definitely did not happen)
- a write to a logical shard in the middle of a move (incoming here, or
  frozen for its cutover): ``{"i": index, "err": "SHARD_MOVING", ...}``, the
  same way
- own: ``{"i": index}``; drop: ``{"i": index, "deleted": n, "more": bool}``
- a move step: see ``moves.py``

Ownership is checked here, at apply time, on every replica (DESIGN section
4): whatever map a client or node routed by, a write lands only in the group
that owns its logical shard when the write is applied.

A write's ops run in order (a cas sees the puts and deletes before it in the
same write) into a scratch overlay; the overlay is kept only if every cas
precondition held, so a write is all or nothing.

Exactly-once: a write's result is stored under ``(client_id, seq)``, in the
write's logical shard, in the same batch as its effect; a retry returns the
stored result without applying again (a failed cas's stored result omits
``cur``), also from another group after the logical shard moved there. Each
client has a floor per logical shard: results of seqs <= floor are forgotten.
The floor rises to ``ack_seq`` (every seq <= it has been answered to the
client) and to ``seq - DEDUP_RESULTS_MAX``,
so every stored result lies in ``(floor, floor + DEDUP_RESULTS_MAX]``: at most
that many per client, and a rise of the floor deletes at most that many keys
(about one per write in steady state). A result is one key, so a write costs
O(1) however many of the client's requests are in flight. The floor record
also lists the seqs whose results are stored while there are at most
``DEDUP_TRACKED_MAX``: a new seq then needs no read of its result key, and a
rising floor no scan for the results to delete (a scan finds them when the
record lists none: more were stored, or an earlier version wrote it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import cbor2

from raftkv.statemachine import layout
from raftkv.statemachine.commands import (
    CAS,
    DELETE,
    PUT,
    Barrier,
    Command,
    DropKeyspace,
    MalformedEntry,
    Own,
    Write,
    decode_commands,
)
from raftkv.statemachine.moves import (
    MoveState,
    MoveStep,
    apply_move,
    client_refusal,
    decode_owner,
    record_effects,
)

DEDUP_RESULTS_MAX = 1024
# The floor record lists the seqs with a stored result while there are at most
# this many (a write then needs no read of its result key and no scan).
DEDUP_TRACKED_MAX = 64

ReadFn = Callable[[bytes], bytes | None]


class StateView(Protocol):
    """Read access to a replica's state (the Store, or a dict in tests)."""

    def get(self, key: bytes) -> bytes | None: ...

    def scan(self, start: bytes, stop: bytes, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` pairs with ``start <= key < stop``, in key order."""
        ...


class MemoryState:
    """A StateView over a dict (tests, and pure callers)."""

    def __init__(self, data: dict[bytes, bytes] | None = None) -> None:
        self.data = data if data is not None else {}

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def scan(self, start: bytes, stop: bytes, limit: int) -> list[tuple[bytes, bytes]]:
        return sorted((k, v) for k, v in self.data.items() if start <= k < stop)[:limit]

    def commit(self, writes: dict[bytes, bytes | None]) -> None:
        for key, value in writes.items():
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value


ApplyFn = Callable[[StateView, int, bytes], "ApplyOutput"]


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
        # (ks, ls, client) -> seqs whose results this entry stored
        self.fresh_results: dict[tuple[int, int, bytes], list[int]] = {}
        self.keys_added = 0
        """Change of the user key count, written once per entry."""

    def get(self, key: bytes) -> bytes | None:
        if key in self.writes:
            return self.writes[key]
        return self._read(key)


def apply_entry(view: StateView, index: int, payload: bytes) -> ApplyOutput:
    out = ApplyOutput()
    out.writes[layout.APPLIED_KEY] = layout.encode_index(index)
    try:
        commands = decode_commands(payload)
    except MalformedEntry as exc:
        out.error = f"malformed log entry at index {index}: {exc}"
        return out
    state = _Overlay(view.get, out.writes)
    out.results = [_apply_command(state, view, index, c) for c in commands]
    if state.keys_added:
        count = layout.decode_index(state.get(layout.KEY_COUNT_KEY)) + state.keys_added
        out.writes[layout.KEY_COUNT_KEY] = layout.encode_index(max(0, count))
    return out


def _apply_command(state: _Overlay, view: StateView, index: int,
                   command: Command) -> dict[str, Any]:
    if isinstance(command, Write):
        return _apply_write(state, view, index, command)
    if isinstance(command, Own):
        state.writes[layout.keyspace_key(command.keyspace)] = layout.encode_keyspace(
            command.keyspace_id, command.logical_shards_total)
        for ls in command.logical_shards:
            key = layout.owner_key(command.keyspace_id, ls)
            if state.get(key) is None:
                state.writes[key] = layout.OWNER_ACTIVE
        return {"i": index}
    if isinstance(command, DropKeyspace):
        return _drop_keyspace(state, view, index, command)
    if isinstance(command, MoveStep):
        move_state = MoveState(state.get, view.scan, state.writes)
        result = apply_move(move_state, index, command)
        state.keys_added += move_state.keys_added
        return result
    assert isinstance(command, Barrier)
    return {"i": index}


def _drop_keyspace(state: _Overlay, view: StateView, index: int,
                   drop: DropKeyspace) -> dict[str, Any]:
    """Stop serving the keyspace (no owner records: every later write and read
    of it is refused) and delete a bounded chunk of its keys. Keys written by
    earlier commands of this same entry are not seen by the scan; the next
    chunk deletes them (no write of the keyspace is applied after this one)."""
    name_key = layout.keyspace_key(drop.keyspace)
    raw = state.get(name_key)
    if raw is not None and layout.decode_keyspace(raw)[0] == drop.keyspace_id:
        state.writes[name_key] = None
    owners = layout.owner_prefix(drop.keyspace_id)
    for key, _ in view.scan(owners, layout.prefix_end(owners), 1 << 32):
        state.writes[key] = None
    data = layout.data_prefix(drop.keyspace_id)
    chunk = view.scan(data, layout.prefix_end(data), drop.keys_max + 1)
    doomed = [key for key, _ in chunk[:drop.keys_max] if state.writes.get(key, b"") is not None]
    for key in doomed:
        state.writes[key] = None
    state.keys_added -= len(doomed)
    return {"i": index, "deleted": len(doomed), "more": len(chunk) > drop.keys_max}


def _apply_write(state: _Overlay, view: StateView, index: int, write: Write) -> dict[str, Any]:
    cid, ks = write.client_id, write.keyspace_id
    # A write stays within one logical shard (the node checks it); its dedup
    # records live under that logical shard, so they move with it.
    ls = write.mutations[0].logical_shard if write.mutations else 0
    floor_key = layout.dedup_key(ks, ls, cid)
    floor, stored = layout.decode_dedup_floor(state.get(floor_key))
    if write.seq <= floor:
        return {"err": "OUTCOME_UNKNOWN",
                "msg": f"seq {write.seq} is older than this client's dedup window"}
    result_key = layout.dedup_result_key(ks, ls, cid, write.seq)
    if stored is None or write.seq in stored:  # (a new seq of a tracked client: no read)
        previous_raw = state.get(result_key)
        if previous_raw is not None:
            previous: dict[str, Any] = cbor2.loads(previous_raw)
            return previous

    home_owner = b""
    for m in {m.logical_shard for m in write.mutations}:
        raw_owner = state.get(layout.owner_key(ks, m))
        if m == ls:
            home_owner = raw_owner or b""
        if raw_owner != layout.OWNER_ACTIVE:
            refusal = client_refusal(decode_owner(raw_owner), ks, m)
            if refusal is not None:
                return {"i": index, **refusal}
    effects: dict[bytes, bytes | None] = {}
    write_state = _Overlay(state.get, effects)
    result = _apply_mutations(write_state, index, write)
    effects[result_key] = cbor2.dumps(
        {k: v for k, v in result.items() if k != "cur"} if "cur" in result else result)
    new_floor = max(floor, min(write.ack_seq, write.seq - 1), write.seq - DEDUP_RESULTS_MAX)
    if stored is None:
        stored = _stored_seqs(state, view, (ks, ls, cid), floor)
    # Forget the stored results at or below the new floor. The client's seqs are
    # spread over every logical shard it writes, so the floor of one logical
    # shard jumps: the floor record names the few stored there.
    kept = []
    for seq in stored:
        if seq <= new_floor:
            effects[layout.dedup_result_key(ks, ls, cid, seq)] = None
        elif seq != write.seq:
            kept.append(seq)
    kept.append(write.seq)
    effects[floor_key] = layout.encode_dedup_floor(
        new_floor, kept if len(kept) <= DEDUP_TRACKED_MAX else None)
    state.fresh_results.setdefault((ks, ls, cid), []).append(write.seq)
    state.writes.update(effects)
    state.keys_added += write_state.keys_added
    if home_owner != layout.OWNER_ACTIVE:
        # While a move copies this logical shard away, its changelog gets the effects.
        record_effects(MoveState(state.get, _no_scan, state.writes), ks, ls, effects)
    return result


def _stored_seqs(state: _Overlay, view: StateView, client: tuple[int, int, bytes],
                 floor: int) -> list[int]:
    """The seqs with a stored result of a client in one logical shard whose
    floor record does not list them (written by an earlier version, or more
    than DEDUP_TRACKED_MAX): a scan (they all lie in (floor, floor + MAX]),
    plus those written earlier in this entry (not in the view yet)."""
    ks, ls, cid = client
    start = layout.dedup_result_key(ks, ls, cid, floor + 1)
    stop = layout.prefix_end(layout.dedup_key(ks, ls, cid))
    found = {layout.dedup_result_seq(key) for key, _ in view.scan(start, stop,
                                                                  DEDUP_RESULTS_MAX + 1)}
    found.update(s for s in state.fresh_results.get(client, []) if s > floor)
    return sorted(s for s in found if state.get(layout.dedup_result_key(ks, ls, cid, s)))


def _no_scan(start: bytes, stop: bytes, limit: int) -> list[tuple[bytes, bytes]]:
    raise AssertionError("recording a write's effects scans nothing")


def _apply_mutations(state: _Overlay, index: int, write: Write) -> dict[str, Any]:
    scratch = _Overlay(state.get, {})
    per_op: list[Any] = []
    keys_added = 0
    for position, m in enumerate(write.mutations):
        key = layout.data_key(write.keyspace_id, m.logical_shard, m.key)
        existed = scratch.get(key) is not None
        if m.kind == PUT:
            scratch.writes[key] = m.value
            per_op.append(None)
            keys_added += not existed
        elif m.kind == DELETE:
            per_op.append(existed)
            scratch.writes[key] = None
            keys_added -= existed
        else:
            assert m.kind == CAS
            current = scratch.get(key)
            if current != m.expected:
                return {"i": index, "err": "PRECONDITION_FAILED", "op": position, "cur": current}
            scratch.writes[key] = m.value
            per_op.append(True)
            keys_added += not existed
    state.writes.update(scratch.writes)
    state.keys_added += keys_added
    return {"i": index, "r": per_op}

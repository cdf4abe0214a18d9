"""Moving a logical shard between groups: the group side (DESIGN section 7).
Pure: owner records, the steps a move applies in each group, and the
changelog a source group keeps while a move captures.

A group's part in logical shard L is its owner record ``o|ks|L``:

========= ======================================================================
ACTIVE    the group serves L. With ``capturing``, move ``move`` is copying L
          away: every write of L also appends its effects to the changelog
          ``c|move|seq`` (``seq`` = the last record written), in the same batch.
INCOMING  L is being copied in by move ``move``: ``cursor`` is the last key
          copied, ``seq`` the last changelog record applied. Client reads and
          writes of L get SHARD_MOVING.
FROZEN    (source) the move is cutting over: ``seq`` is final; reads and writes
          of L get SHARD_MOVING.
MOVED     (source) L lives in group ``dest`` now: WRONG_SHARD with that hint.
          The record stays as a tombstone after L's keys are deleted.
ABORTED   (destination) move ``move`` was aborted here: it can never be
          activated, and its partial copy is purged.
========= ======================================================================

(no record: the group has no part in L: WRONG_SHARD.)

Every step is conditional on the move id and the state, and idempotent: a
step re-issued by a new coordinator or worker after a crash either finds its
work done (and says so) or is refused with the state it found. Activate and
abort both run in the destination's log, and the first applied wins, so L
can never have two owners.

Steps (``MoveStep.step``), in the order a move uses them:

- destination ``prepare`` {name, total}: no record (or an earlier move's
  MOVED or ABORTED tombstone, once none of L's keys are left) -> INCOMING;
- source ``capture``: ACTIVE -> ACTIVE capturing;
- destination ``ingest`` {cursor, next, kvs}: bulk copy; applied only if
  ``cursor`` is the stored one (else the answer holds the stored cursor);
- destination ``delta`` {from, records, [activate]}: changelog records
  ``from`` ... in order; applied only if ``from`` = stored seq + 1; with
  ``activate`` equal to the seq reached, also activates (as ``activate``);
- source ``freeze`` {[dest], [from]}: capturing -> FROZEN, answers the final
  seq (and the changelog records from ``from``); clients of L get
  SHARD_MOVING with ``dest``, where L is served once activated;
- destination ``activate`` {seq}: INCOMING with exactly ``seq`` applied ->
  ACTIVE (the cutover);
- source ``moved`` {dest}: FROZEN -> MOVED;
- source ``cleanup`` {n}: MOVED: delete up to n keys of L and its changelog;
- destination ``abort``: INCOMING (or nothing, or an earlier move's tombstone)
  -> ABORTED; refused once active;
- source ``unfreeze``: capturing or FROZEN -> ACTIVE, changelog dropped; the
  record keeps the move's id as ``ended``, and a late ``capture`` of it is
  refused;
- destination ``purge`` {n}: ABORTED: delete up to n keys of the partial copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import cbor2

from raftkv.statemachine import layout

ACTIVE, INCOMING, FROZEN, MOVED, ABORTED = "ACTIVE", "INCOMING", "FROZEN", "MOVED", "ABORTED"
STATES = (ACTIVE, INCOMING, FROZEN, MOVED, ABORTED)
STEPS = ("prepare", "capture", "ingest", "delta", "freeze", "activate", "moved", "cleanup",
         "abort", "unfreeze", "purge")


def is_cutover(step: str, data: Any) -> bool:
    """A step inside the freeze-to-activation window, while the logical shard
    takes no writes: the freeze, and the delta (or activate) that activates."""
    return step in ("freeze", "activate") or (
        step == "delta" and isinstance(data, dict) and "activate" in data)


@dataclass(frozen=True, slots=True)
class Owner:
    state: str
    move: int | None = None
    seq: int = 0
    cursor: bytes = b""
    dest: int | None = None
    capturing: bool = False
    via: int | None = None  # the move that activated this group's copy
    ended: int = 0
    """(source) The greatest move id turned back here: a step of it that
    arrives late (from a worker that lost the move) cannot capture again."""

    def encode(self) -> bytes:
        if self == Owner(ACTIVE):
            return layout.OWNER_ACTIVE  # the same bytes as before moves existed
        out: dict[str, Any] = {"state": self.state}
        for name in ("move", "dest", "via"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.seq:
            out["seq"] = self.seq
        if self.cursor:
            out["cursor"] = self.cursor
        if self.capturing:
            out["capturing"] = True
        if self.ended:
            out["ended"] = self.ended
        return cbor2.dumps(out)


_ACTIVE = Owner(ACTIVE)


def decode_owner(raw: bytes | None) -> Owner | None:
    if raw is None:
        return None
    if raw == layout.OWNER_ACTIVE:
        return _ACTIVE  # the common case, read on every write: no decoding
    data = cbor2.loads(raw)
    return Owner(data["state"], data.get("move"), data.get("seq", 0), data.get("cursor", b""),
                 data.get("dest"), data.get("capturing", False), data.get("via"),
                 data.get("ended", 0))


@dataclass(frozen=True, slots=True)
class MoveStep:
    """One step of move ``move_id`` of logical shard ``logical_shard``."""

    step: str
    keyspace_id: int
    logical_shard: int
    move_id: int
    data: dict[str, Any]


def client_refusal(owner: Owner | None, ks: int, ls: int) -> dict[str, Any] | None:
    """Why a client read or write of the logical shard is refused here (an
    apply result's error fields), or None if this group serves it."""
    if owner is not None and owner.state == ACTIVE:
        return None
    if owner is not None and owner.state in (INCOMING, FROZEN):
        moving: dict[str, Any] = {"err": "SHARD_MOVING", "ks": ks, "ls": ls}
        if owner.state == FROZEN and owner.dest is not None:
            moving["dest"] = owner.dest  # where it will be served in a moment
        return moving
    refusal: dict[str, Any] = {"err": "WRONG_SHARD", "ks": ks, "ls": ls}
    if owner is not None and owner.state == MOVED:
        refusal["dest"] = owner.dest
    return refusal


Get = Callable[[bytes], bytes | None]
Scan = Callable[[bytes, bytes, int], list[tuple[bytes, bytes]]]


class MoveState:
    """What a step sees and changes: reads through ``get`` and ``scan`` (the
    entry's overlay and the stored state), writes into ``writes``, and the
    change of the user key count in ``keys_added``."""

    def __init__(self, get: Get, scan: Scan, writes: dict[bytes, bytes | None]) -> None:
        self.get = get
        self.scan = scan
        self.writes = writes
        self.keys_added = 0

    def delete_stored(self, key: bytes) -> None:
        """Delete a key known to exist (a scan found it, and this entry did not
        delete it): no read to learn whether it did."""
        if key.startswith(layout.DATA_PREFIX):
            self.keys_added -= 1
        self.writes[key] = None

    def put(self, key: bytes, value: bytes | None) -> None:
        """Write or delete a key, keeping the user key count right."""
        if key.startswith(layout.DATA_PREFIX):
            existed = self.get(key) is not None
            self.keys_added += (value is not None) - existed
        self.writes[key] = value


def record_effects(state: MoveState, ks: int, ls: int,
                   effects: dict[bytes, bytes | None]) -> None:
    """After a write of ``ls`` was applied: if a move captures ``ls``, append
    the write's effects on the logical shard's keys to the changelog."""
    key = layout.owner_key(ks, ls)
    raw = state.get(key)
    if raw == layout.OWNER_ACTIVE:
        return  # no move captures this logical shard
    owner = decode_owner(raw)
    if owner is None or not owner.capturing or owner.move is None:
        return
    moved = [[k, v] for k, v in effects.items() if layout.in_shard(k, ks, ls)]
    if not moved:
        return
    seq = owner.seq + 1
    state.writes[layout.changelog_key(owner.move, seq)] = cbor2.dumps(moved)
    state.writes[key] = replace(owner, seq=seq).encode()


def apply_move(state: MoveState, index: int, step: MoveStep) -> dict[str, Any]:
    key = layout.owner_key(step.keyspace_id, step.logical_shard)
    owner = decode_owner(state.get(key))
    handler = _STEPS[step.step]
    result = handler(state, step, owner, key)
    result["i"] = index
    return result


def _refused(owner: Owner | None, why: str) -> dict[str, Any]:
    return {"err": "MOVE_REFUSED", "msg": why,
            "state": None if owner is None else owner.state,
            "move": None if owner is None else owner.move}


def _mine(owner: Owner | None, step: MoveStep, *states: str) -> bool:
    return owner is not None and owner.state in states and owner.move == step.move_id


# -- destination -----------------------------------------------------------------------


def _prepare(state: MoveState, step: MoveStep, owner: Owner | None,
             key: bytes) -> dict[str, Any]:
    if _mine(owner, step, INCOMING):
        return {"cursor": owner.cursor, "seq": owner.seq}  # type: ignore[union-attr]
    if owner is not None and owner.state == ACTIVE and owner.via == step.move_id:
        return {"active": True}
    if owner is not None and not _tombstone(state, step, owner):
        return _refused(owner, "the destination already has a part in this logical shard")
    state.writes[layout.keyspace_key(step.data["name"])] = layout.encode_keyspace(
        step.keyspace_id, step.data["total"])
    state.writes[key] = Owner(INCOMING, step.move_id).encode()
    return {"cursor": b"", "seq": 0}


def _tombstone(state: MoveState, step: MoveStep, owner: Owner) -> bool:
    """An earlier move's record that a new move into this group may replace:
    MOVED (the logical shard left, and comes back now) or ABORTED (a copy in
    that was given up), with none of the logical shard's keys left here (the
    earlier move's cleanup or purge finished)."""
    if owner.state not in (MOVED, ABORTED) or owner.move is None \
            or step.move_id <= owner.move:  # a late prepare of an older move
        return False
    return not any(state.scan(start, stop, 1)
                   for start, stop in layout.shard_ranges(step.keyspace_id, step.logical_shard))


def _activated(owner: Owner | None, step: MoveStep) -> bool:
    """This move already activated its copy here: a worker that redoes an
    earlier phase (its predecessor died before reporting) is told so."""
    return owner is not None and owner.state == ACTIVE and owner.via == step.move_id


def _ingest(state: MoveState, step: MoveStep, owner: Owner | None,
            key: bytes) -> dict[str, Any]:
    if _activated(owner, step):
        return {"active": True}
    if not _mine(owner, step, INCOMING):
        return _refused(owner, "ingest needs the move's INCOMING record")
    assert owner is not None
    if step.data["cursor"] != owner.cursor:
        return {"cursor": owner.cursor, "stale": True}
    inside = _in_shard(step)
    for k, _ in step.data["kvs"]:
        if not inside(k):
            return _refused(owner, f"key {k!r} is not in the moving logical shard")
    for k, v in step.data["kvs"]:
        state.put(k, v)
    state.writes[key] = replace(owner, cursor=step.data["next"]).encode()
    return {"cursor": step.data["next"]}


def _delta(state: MoveState, step: MoveStep, owner: Owner | None,
           key: bytes) -> dict[str, Any]:
    if _activated(owner, step):
        return {"active": True}
    if not _mine(owner, step, INCOMING):
        return _refused(owner, "delta needs the move's INCOMING record")
    assert owner is not None
    if step.data["from"] != owner.seq + 1:
        return {"seq": owner.seq, "stale": True}
    inside = _in_shard(step)
    for record in step.data["records"]:
        for k, v in record:
            if inside(k):
                state.put(k, v)
    seq = owner.seq + len(step.data["records"])
    if step.data.get("activate") == seq:  # the last records, and the cutover with them
        state.writes[key] = Owner(ACTIVE, via=step.move_id).encode()
        return {"seq": seq, "active": True}
    state.writes[key] = replace(owner, seq=seq).encode()
    return {"seq": seq}


def _activate(state: MoveState, step: MoveStep, owner: Owner | None,
              key: bytes) -> dict[str, Any]:
    if owner is not None and owner.state == ACTIVE and owner.via == step.move_id:
        return {"active": True}
    if not _mine(owner, step, INCOMING):
        return _refused(owner, "activate needs the move's INCOMING record (aborted?)")
    assert owner is not None
    if owner.seq != step.data["seq"]:
        return {"seq": owner.seq, "stale": True}
    state.writes[key] = Owner(ACTIVE, via=step.move_id).encode()
    return {"active": True}


def _abort(state: MoveState, step: MoveStep, owner: Owner | None,
           key: bytes) -> dict[str, Any]:
    if _mine(owner, step, ABORTED):
        return {"aborted": True}
    if owner is not None and owner.state == ACTIVE and owner.via == step.move_id:
        return _refused(owner, "the move was activated here: too late to abort")
    if owner is None or _mine(owner, step, INCOMING) or (
            owner.move != step.move_id and owner.state in (MOVED, ABORTED)):
        state.writes[key] = Owner(ABORTED, step.move_id).encode()
        return {"aborted": True}
    return _refused(owner, "abort: the record belongs to another move")


# -- source ------------------------------------------------------------------------------


def _capture(state: MoveState, step: MoveStep, owner: Owner | None,
             key: bytes) -> dict[str, Any]:
    if _mine(owner, step, FROZEN, MOVED) or (_mine(owner, step, ACTIVE)
                                             and owner.capturing):  # type: ignore[union-attr]
        return {"seq": owner.seq}  # type: ignore[union-attr]
    if owner is None or owner.state != ACTIVE or owner.capturing:
        return _refused(owner, "capture needs an ACTIVE record with no move")
    if step.move_id <= max(owner.ended, owner.via or 0):  # move ids only grow
        return _refused(owner, f"move {step.move_id} was turned back here; it cannot capture")
    state.writes[key] = Owner(ACTIVE, step.move_id, 0, capturing=True, via=owner.via,
                              ended=owner.ended).encode()
    return {"seq": 0}


def _freeze(state: MoveState, step: MoveStep, owner: Owner | None,
            key: bytes) -> dict[str, Any]:
    if _mine(owner, step, FROZEN, MOVED):
        assert owner is not None
        return _with_records(state, step, {"seq": owner.seq}, owner.seq)
    if not (_mine(owner, step, ACTIVE) and owner.capturing):  # type: ignore[union-attr]
        return _refused(owner, "freeze needs the move's capture")
    assert owner is not None
    state.writes[key] = Owner(FROZEN, step.move_id, owner.seq,
                              dest=step.data.get("dest")).encode()
    return _with_records(state, step, {"seq": owner.seq}, owner.seq)


FREEZE_RECORDS_MAX = 1000
FREEZE_RECORD_BYTES_MAX = 1 << 19


def _with_records(state: MoveState, step: MoveStep, result: dict[str, Any],
                  seq: int) -> dict[str, Any]:
    """With ``from`` in the step: the changelog records from there to ``seq``
    in the answer (``more`` if they did not all fit), so the cutover needs no
    separate read of them."""
    start = step.data.get("from")
    if start is None:
        return result
    records: list[Any] = []
    budget = FREEZE_RECORD_BYTES_MAX
    for n in range(start, seq + 1):
        raw = state.get(layout.changelog_key(step.move_id, n))
        if raw is None or len(records) >= FREEZE_RECORDS_MAX or budget <= 0:
            result["more"] = True
            break
        records.append(cbor2.loads(raw))
        budget -= len(raw)
    result["records"], result["from"] = records, start
    return result


def _moved(state: MoveState, step: MoveStep, owner: Owner | None,
           key: bytes) -> dict[str, Any]:
    if _mine(owner, step, MOVED):
        return {"moved": True}
    if not _mine(owner, step, FROZEN):
        return _refused(owner, "moved needs the move's FROZEN record")
    assert owner is not None
    state.writes[key] = Owner(MOVED, step.move_id, owner.seq, dest=step.data["dest"]).encode()
    return {"moved": True}


def _deleting(required: str, *, changelog: bool) -> Callable[
        [MoveState, MoveStep, Owner | None, bytes], dict[str, Any]]:
    """``cleanup`` (source, MOVED: L's keys and the changelog) and ``purge``
    (destination, ABORTED: the partial copy): up to ``n`` keys per entry."""
    def delete(state: MoveState, step: MoveStep, owner: Owner | None,
               key: bytes) -> dict[str, Any]:
        if not _mine(owner, step, required):
            return _refused(owner, f"{step.step} needs the move's {required} record")
        return _delete_chunk(state, step, step.data["n"], changelog=changelog)
    return delete


_cleanup = _deleting(MOVED, changelog=True)
_purge = _deleting(ABORTED, changelog=False)


def _unfreeze(state: MoveState, step: MoveStep, owner: Owner | None,
              key: bytes) -> dict[str, Any]:
    if owner is not None and owner.state == ACTIVE and not (
            owner.capturing and owner.move == step.move_id):
        # Already unfrozen, or never captured: a capture of this move still on
        # its way (from a worker that lost the move) must not start later.
        if owner.ended < step.move_id:
            state.writes[key] = replace(owner, ended=step.move_id).encode()
        return {"active": True}
    if not _mine(owner, step, ACTIVE, FROZEN):
        return _refused(owner, "unfreeze: the move is past its cutover, or not this move's")
    assert owner is not None
    state.writes[key] = Owner(ACTIVE, via=owner.via,
                              ended=max(owner.ended, step.move_id)).encode()
    result = _delete_chunk(state, step, step.data.get("n", 10_000), changelog=True,
                           data=False)
    return {"active": True, "more": result["more"]}


def _delete_chunk(state: MoveState, step: MoveStep, n: int, *, changelog: bool,
                  data: bool = True) -> dict[str, Any]:
    """Delete up to ``n`` keys: the logical shard's data and dedup records (if
    ``data``), then the move's changelog (if ``changelog``)."""
    ranges = layout.shard_ranges(step.keyspace_id, step.logical_shard) if data else []
    if changelog:
        prefix = layout.changelog_prefix(step.move_id)
        ranges.append((prefix, layout.prefix_end(prefix)))
    deleted = 0
    for start, stop in ranges:
        chunk = state.scan(start, stop, n - deleted + 1)
        doomed = [k for k, _ in chunk if state.writes.get(k, b"") is not None][:n - deleted]
        for k in doomed:
            state.delete_stored(k)
        deleted += len(doomed)
        if deleted >= n and len(chunk) > len(doomed):
            return {"deleted": deleted, "more": True}
    return {"deleted": deleted, "more": False}


def _in_shard(step: MoveStep) -> Callable[[bytes], bool]:
    """Whether a key is the moving logical shard's (its ranges computed once)."""
    ranges = layout.shard_ranges(step.keyspace_id, step.logical_shard)
    return lambda key: any(start <= key < stop for start, stop in ranges)


def _is_bytes_pairs(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], bytes)
        and (p[1] is None or isinstance(p[1], bytes)) for p in value)


def _nat(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# The data each step needs, checked when an entry is decoded.
DATA_CHECKS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "prepare": lambda d: isinstance(d.get("name"), str) and _nat(d.get("total")),
    "capture": lambda d: True,
    "ingest": lambda d: (isinstance(d.get("cursor"), bytes) and isinstance(d.get("next"), bytes)
                         and _is_bytes_pairs(d.get("kvs"))),
    "delta": lambda d: (_nat(d.get("from")) and isinstance(d.get("records"), list)
                        and all(_is_bytes_pairs(r) for r in d["records"])
                        and ("activate" not in d or _nat(d["activate"]))),
    "freeze": lambda d: (("dest" not in d or _nat(d["dest"]))
                         and ("from" not in d or (_nat(d["from"]) and d["from"] > 0))),
    "activate": lambda d: _nat(d.get("seq")),
    "moved": lambda d: _nat(d.get("dest")),
    "cleanup": lambda d: _nat(d.get("n")) and d["n"] > 0,
    "abort": lambda d: True,
    "unfreeze": lambda d: "n" not in d or (_nat(d["n"]) and d["n"] > 0),
    "purge": lambda d: _nat(d.get("n")) and d["n"] > 0,
}


_STEPS: dict[str, Callable[[MoveState, MoveStep, Owner | None, bytes], dict[str, Any]]] = {
    "prepare": _prepare, "capture": _capture, "ingest": _ingest, "delta": _delta,
    "freeze": _freeze, "activate": _activate, "moved": _moved, "cleanup": _cleanup,
    "abort": _abort, "unfreeze": _unfreeze, "purge": _purge,
}

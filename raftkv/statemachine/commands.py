"""Commands that go through the Raft log, and their byte encoding.

One log entry carries a batch of commands, encoded with cbor as a list:

- ``["w", ks, cid, seq, ack, ops]``: an atomic client write; ``ops`` is a list of
  ``[0, ls, key, value]`` (put), ``[1, ls, key]`` (delete) or
  ``[2, ls, key, expected-or-null, value]`` (cas).
- ``["b"]``: a read barrier; changes nothing, answers the index it was applied at.
- ``["own", ks, name, L, [ls, ...]]``: from the shard manager: this group serves
  these logical shards of keyspace ``name`` (id ``ks``, ``L`` logical shards).
- ``["drop", ks, name, n]``: keyspace ``ks`` was dropped: stop serving it and
  delete up to ``n`` of its keys (repeated until none is left).
- ``["mv", step, ks, ls, move_id, data]``: a step of moving logical shard ``ls``
  between groups (``raftkv/statemachine/moves.py``); ``data`` is a map whose
  fields depend on the step.

The wire schema is ours; pysyncobj only sees opaque bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import cbor2

from raftkv.statemachine.moves import DATA_CHECKS, MoveStep

PUT, DELETE, CAS = 0, 1, 2
U32_MAX = 2**32 - 1  # keyspace ids and logical shards are stored as 4-byte big-endian


@dataclass(frozen=True, slots=True)
class Mutation:
    """One op of a write, already routed to its logical shard."""

    kind: int
    logical_shard: int
    key: bytes
    value: bytes | None = None
    expected: bytes | None = None


@dataclass(frozen=True, slots=True)
class Write:
    keyspace_id: int
    client_id: bytes
    seq: int
    ack_seq: int
    mutations: tuple[Mutation, ...]


@dataclass(frozen=True, slots=True)
class Barrier:
    pass


@dataclass(frozen=True, slots=True)
class Own:
    """The shard manager assigns logical shards of a keyspace to this group."""

    keyspace_id: int
    keyspace: str
    logical_shards_total: int
    logical_shards: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DropKeyspace:
    """Stop serving a dropped keyspace and delete up to ``keys_max`` of its keys."""

    keyspace_id: int
    keyspace: str
    keys_max: int


Command = Write | Barrier | Own | DropKeyspace | MoveStep


class MalformedEntry(Exception):
    """A log entry's bytes do not decode into commands (a bug, or a foreign entry)."""


def _encode_mutation(m: Mutation) -> list[object]:
    if m.kind == PUT:
        return [PUT, m.logical_shard, m.key, m.value]
    if m.kind == DELETE:
        return [DELETE, m.logical_shard, m.key]
    return [CAS, m.logical_shard, m.key, m.expected, m.value]


def encode_commands(commands: list[Command]) -> bytes:
    out: list[object] = []
    for c in commands:
        if isinstance(c, Write):
            out.append(["w", c.keyspace_id, c.client_id, c.seq, c.ack_seq,
                        [_encode_mutation(m) for m in c.mutations]])
        elif isinstance(c, Own):
            out.append(["own", c.keyspace_id, c.keyspace, c.logical_shards_total,
                        list(c.logical_shards)])
        elif isinstance(c, DropKeyspace):
            out.append(["drop", c.keyspace_id, c.keyspace, c.keys_max])
        elif isinstance(c, MoveStep):
            out.append(["mv", c.step, c.keyspace_id, c.logical_shard, c.move_id, c.data])
        else:
            out.append(["b"])
    return cbor2.dumps(out)


def _decode_mutation(raw: object) -> Mutation:
    if not isinstance(raw, list) or len(raw) < 3:
        raise MalformedEntry(f"bad mutation {raw!r}")
    kind, ls, key = raw[0], raw[1], raw[2]
    if not isinstance(ls, int) or not 0 <= ls <= U32_MAX or not isinstance(key, bytes):
        raise MalformedEntry(f"bad mutation {raw!r}")
    if kind == PUT and len(raw) == 4 and isinstance(raw[3], bytes):
        return Mutation(PUT, ls, key, raw[3])
    if kind == DELETE and len(raw) == 3:
        return Mutation(DELETE, ls, key)
    if kind == CAS and len(raw) == 5 and isinstance(raw[4], bytes) and (
        raw[3] is None or isinstance(raw[3], bytes)
    ):
        return Mutation(CAS, ls, key, raw[4], raw[3])
    raise MalformedEntry(f"bad mutation {raw!r}")


def decode_commands(payload: bytes) -> list[Command]:
    try:
        raw = cbor2.loads(payload)
    except Exception as exc:
        raise MalformedEntry(f"entry is not cbor: {exc}") from exc
    if not isinstance(raw, list):
        raise MalformedEntry("entry is not a list of commands")
    commands: list[Command] = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 6 and item[0] == "w"):
            commands.append(_decode_other(item))
            continue
        _, ks, cid, seq, ack, muts = item
        if not (isinstance(ks, int) and 0 <= ks <= U32_MAX
                and isinstance(cid, bytes) and isinstance(seq, int)
                and isinstance(ack, int) and isinstance(muts, list)):
            raise MalformedEntry(f"bad write {item!r}")
        commands.append(Write(ks, cid, seq, ack, tuple(_decode_mutation(m) for m in muts)))
    return commands


def _decode_other(item: object) -> Command:
    """A command other than a write (those are decoded first: most are writes)."""
    if item == ["b"]:
        return Barrier()
    if isinstance(item, list) and item and item[0] in ("own", "drop"):
        return _decode_admin(item)
    if isinstance(item, list) and item and item[0] == "mv":
        return _decode_move(item)
    raise MalformedEntry(f"unknown command {item!r}")


def _u32(value: object) -> bool:
    return isinstance(value, int) and 0 <= value <= U32_MAX


def _decode_admin(item: list[object]) -> Own | DropKeyspace:
    if item[0] == "own" and len(item) == 5:
        _, ks, name, total, shards = item
        if (_u32(ks) and isinstance(name, str) and _u32(total) and isinstance(shards, list)
                and all(_u32(ls) for ls in shards)):
            assert isinstance(ks, int) and isinstance(total, int)
            return Own(ks, name, total, tuple(ls for ls in shards if isinstance(ls, int)))
    if item[0] == "drop" and len(item) == 4:
        _, ks, name, keys_max = item
        if _u32(ks) and isinstance(name, str) and _u32(keys_max):
            assert isinstance(ks, int) and isinstance(keys_max, int)
            return DropKeyspace(ks, name, keys_max)
    raise MalformedEntry(f"bad admin command {item!r}")


def _decode_move(item: list[object]) -> MoveStep:
    if len(item) == 6:
        _, step, ks, ls, move_id, data = item
        if (isinstance(step, str) and step in DATA_CHECKS and _u32(ks) and _u32(ls)
                and isinstance(move_id, int) and 0 < move_id < 2**63
                and isinstance(data, dict) and DATA_CHECKS[step](data)):
            assert isinstance(ks, int) and isinstance(ls, int)
            return MoveStep(step, ks, ls, move_id, data)
    raise MalformedEntry(f"bad move step {item!r}")

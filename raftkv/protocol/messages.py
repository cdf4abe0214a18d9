"""Client <-> node messages: typed requests, validated decoding, cbor encoding.

A request frame body is a cbor map with at least ``id`` (an unsigned integer
the client chooses; the reply carries it back) and ``op``. Replies are
``{"id": n, "ok": result}`` or ``{"id": n, "err": {"code", "definite", "msg", ...}}``.

Wire fields (all keys are text):

======== =====================================================================
op       fields
======== =====================================================================
get      shard, key, [ks], [cons = "strong" | "eventual"]
put      shard, key, value, cid, seq, ack, [ks]
delete   shard, key, cid, seq, ack, [ks]
cas      shard, key, expect (bytes or null = expect absent), value, cid, seq, ack, [ks]
batch    shard, ops: [{op: put|delete|cas, key, value?, expect?}], cid, seq, ack, [ks]
scan     shard, ls, [ks], [prefix], [after], [limit <= 10000], [cons]
own      shard, ks, ks_id, L, ls: [logical shards]      (from the shard manager)
drop     shard, ks, ks_id, n                            (from the shard manager)
transfer shard, to (Raft address of a replica)          (leader balancing)
move     shard, step, ks_id, ls, move, data: {...}      (a step of moving logical shard ls)
move_read shard, ks_id, ls, after, limit                (a page of ls's keys, for a move)
         | shard, move, from, limit                     (changelog records from seq ``from``)
         [min_index]: no barrier once the leader applied that index
fault    spec (a ``raftkv.faults.FaultSpec`` as json)   (fault injection)
status   (none)
ping     (none)
======== =====================================================================

``scan`` returns up to ``limit`` pairs of one logical shard whose keys start with
``prefix`` and sort after ``after``; ``{"items": [[key, value], ...], "more": bool}``.

``cid`` is the client's 16-byte id, ``seq`` the operation's sequence number
(unique per client, reused on retry), ``ack`` the highest seq below which the
client has seen every reply (lets the node forget dedup records).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import cbor2

from raftkv.errors import BadRequest, RaftKVError, TooLarge
from raftkv.statemachine.moves import DATA_CHECKS as MOVE_DATA_CHECKS


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits enforced on every request before it reaches Raft."""

    key_bytes_max: int = 4 * 1024
    value_bytes_max: int = 1024 * 1024
    batch_ops_max: int = 1000
    batch_bytes_max: int = 4 * 1024 * 1024
    frame_bytes_max: int = 8 * 1024 * 1024


DEFAULT_LIMITS = Limits()
CLIENT_ID_BYTES = 16
DEFAULT_KEYSPACE = "default"
U64_MAX = 2**64 - 1

Consistency = Literal["strong", "eventual"]


@dataclass(frozen=True, slots=True)
class PutOp:
    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class DeleteOp:
    key: bytes


@dataclass(frozen=True, slots=True)
class CasOp:
    """Set ``key`` to ``value`` only if it currently holds ``expected``
    (``expected=None``: only if the key is absent)."""

    key: bytes
    expected: bytes | None
    value: bytes


WriteOp = PutOp | DeleteOp | CasOp


@dataclass(frozen=True, slots=True)
class GetRequest:
    id: int
    shard: int
    keyspace: str
    key: bytes
    consistency: Consistency = "strong"


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """put, delete, cas and batch: one atomic group of write ops."""

    id: int
    shard: int
    keyspace: str
    client_id: bytes
    seq: int
    ack_seq: int
    ops: tuple[WriteOp, ...]
    kind: str = "batch"


@dataclass(frozen=True, slots=True)
class StatusRequest:
    id: int


@dataclass(frozen=True, slots=True)
class PingRequest:
    id: int


@dataclass(frozen=True, slots=True)
class ScanRequest:
    id: int
    shard: int
    keyspace: str
    logical_shard: int
    prefix: bytes
    after: bytes | None
    limit: int
    consistency: Consistency = "strong"


@dataclass(frozen=True, slots=True)
class OwnRequest:
    id: int
    shard: int
    keyspace: str
    keyspace_id: int
    logical_shards_total: int
    logical_shards: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DropRequest:
    id: int
    shard: int
    keyspace: str
    keyspace_id: int
    keys_max: int


@dataclass(frozen=True, slots=True)
class TransferRequest:
    id: int
    shard: int
    to: str


@dataclass(frozen=True, slots=True)
class FaultRequest:
    id: int
    spec: dict[str, Any]


@dataclass(frozen=True, slots=True)
class MoveRequest:
    id: int
    shard: int
    step: str
    keyspace_id: int
    logical_shard: int
    move_id: int
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class MoveReadRequest:
    """A page of a moving logical shard's raw keys after ``after`` (when
    ``move_id`` is None), or changelog records of ``move_id`` from seq
    ``from_seq``; read on the leader behind a barrier."""

    id: int
    shard: int
    keyspace_id: int
    logical_shard: int
    after: bytes
    move_id: int | None
    from_seq: int
    limit: int
    min_index: int = 0
    """With it, a leader whose applied index reached it answers without a
    barrier (the caller knows its state must include that entry)."""


Request = (GetRequest | WriteRequest | ScanRequest | OwnRequest | DropRequest
           | TransferRequest | FaultRequest | StatusRequest | PingRequest | MoveRequest
           | MoveReadRequest)
SCAN_LIMIT_MAX = 10_000


# ---------------------------------------------------------------------------
# decoding


def _field(msg: dict[str, Any], name: str, context: str) -> Any:
    try:
        return msg[name]
    except KeyError:
        raise BadRequest(f"{context}: missing field '{name}'") from None


def _uint(msg: dict[str, Any], name: str, context: str) -> int:
    value = _field(msg, name, context)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U64_MAX:
        raise BadRequest(f"{context}: field '{name}' must be an unsigned 64-bit integer")
    return value


def _bytes(msg: dict[str, Any], name: str, context: str, limit: int, what: str) -> bytes:
    value = _field(msg, name, context)
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes):
        raise BadRequest(f"{context}: field '{name}' must be bytes or text")
    if len(value) > limit:
        raise TooLarge(f"{context}: {what} of {len(value)} bytes is over the limit of {limit}")
    return value


def _key(msg: dict[str, Any], context: str, limits: Limits) -> bytes:
    key = _bytes(msg, "key", context, limits.key_bytes_max, "key")
    if not key:
        raise BadRequest(f"{context}: key must not be empty")
    return key


def _keyspace(msg: dict[str, Any], context: str) -> str:
    ks = msg.get("ks", DEFAULT_KEYSPACE)
    if not isinstance(ks, str) or not ks or len(ks) > 64:
        raise BadRequest(f"{context}: field 'ks' must be a keyspace name of 1 to 64 characters")
    return ks


def _write_op(msg: Any, context: str, limits: Limits) -> WriteOp:
    if not isinstance(msg, dict):
        raise BadRequest(f"{context}: each op must be a map")
    op = msg.get("op")
    key = _key(msg, context, limits)
    if op == "put":
        return PutOp(key, _bytes(msg, "value", context, limits.value_bytes_max, "value"))
    if op == "delete":
        return DeleteOp(key)
    if op == "cas":
        expected_raw = _field(msg, "expect", context)
        expected = (
            None
            if expected_raw is None
            else _bytes(msg, "expect", context, limits.value_bytes_max, "expected value")
        )
        return CasOp(key, expected, _bytes(msg, "value", context, limits.value_bytes_max, "value"))
    raise BadRequest(f"{context}: unknown write op {op!r} (expected put, delete or cas)")


def decode_envelope(body: bytes) -> tuple[dict[str, Any], int]:
    """A request's cbor map and its ``id``; BadRequest if it is neither."""
    try:
        msg = cbor2.loads(body)
    except Exception as exc:
        raise BadRequest(f"frame is not valid cbor: {exc}") from exc
    if not isinstance(msg, dict):
        raise BadRequest("request must be a cbor map")
    request_id = msg.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, int) or request_id < 0:
        raise BadRequest("request: field 'id' must be an unsigned integer")
    return msg, request_id


def decode_request(body: bytes, limits: Limits = DEFAULT_LIMITS) -> Request:
    """Decode one frame body. Raises BadRequest or TooLarge naming the problem.

    If the error is raised after ``id`` was read, ``exc.details['request_id']``
    holds it so the server can address its error reply.
    """
    msg, request_id = decode_envelope(body)
    try:
        return _decode_fields(msg, request_id, limits)
    except RaftKVError as exc:
        exc.details["request_id"] = request_id
        raise


def _consistency(msg: dict[str, Any], context: str) -> Consistency:
    cons = msg.get("cons", "strong")
    if cons not in ("strong", "eventual"):
        raise BadRequest(f"{context}: field 'cons' must be 'strong' or 'eventual'")
    return cons  # type: ignore[no-any-return]


def _u32(msg: dict[str, Any], name: str, context: str) -> int:
    value = _uint(msg, name, context)
    if value > 2**32 - 1:
        raise BadRequest(f"{context}: field '{name}' must be below 2**32")
    return value


def _decode_admin(msg: dict[str, Any], op: Any, request_id: int, context: str,
                  limits: Limits) -> Request:
    if op == "scan":
        after = msg.get("after")
        limit = msg.get("limit", 1000)
        if isinstance(limit, bool) or not isinstance(limit, int) or not (
                1 <= limit <= SCAN_LIMIT_MAX):
            raise BadRequest(f"{context}: field 'limit' must be an integer from 1 to "
                             f"{SCAN_LIMIT_MAX}")
        return ScanRequest(
            request_id, _uint(msg, "shard", context), _keyspace(msg, context),
            _u32(msg, "ls", context),
            _bytes(msg, "prefix", context, limits.key_bytes_max, "prefix")
            if "prefix" in msg else b"",
            None if after is None else _bytes(msg, "after", context, limits.key_bytes_max,
                                              "after key"),
            limit, _consistency(msg, context))
    if op == "own":
        shards = _field(msg, "ls", context)
        if not isinstance(shards, list) or not all(
                isinstance(ls, int) and not isinstance(ls, bool) and 0 <= ls < 2**32
                for ls in shards):
            raise BadRequest(f"{context}: field 'ls' must be a list of logical shards")
        return OwnRequest(request_id, _uint(msg, "shard", context), _keyspace(msg, context),
                          _u32(msg, "ks_id", context), _u32(msg, "L", context), tuple(shards))
    if op == "drop":
        return DropRequest(request_id, _uint(msg, "shard", context), _keyspace(msg, context),
                           _u32(msg, "ks_id", context), _u32(msg, "n", context))
    if op == "transfer":
        to = _field(msg, "to", context)
        if not isinstance(to, str):
            raise BadRequest(f"{context}: field 'to' must be a Raft address host:port")
        return TransferRequest(request_id, _uint(msg, "shard", context), to)
    assert op == "fault"
    spec = _field(msg, "spec", context)
    if not isinstance(spec, dict):
        raise BadRequest(f"{context}: field 'spec' must be a map")
    return FaultRequest(request_id, spec)


def _decode_move(msg: dict[str, Any], op: str, request_id: int, context: str,
                 limits: Limits) -> Request:
    shard = _uint(msg, "shard", context)
    if op == "move":
        step = _field(msg, "step", context)
        data = _field(msg, "data", context)
        if step not in MOVE_DATA_CHECKS:
            raise BadRequest(f"{context}: field 'step' must be one of "
                             f"{', '.join(MOVE_DATA_CHECKS)}")
        if not isinstance(data, dict) or not MOVE_DATA_CHECKS[step](data):
            raise BadRequest(f"{context}: field 'data' does not fit step {step!r}")
        move_id = _uint(msg, "move", context)
        if not 0 < move_id < 2**63:
            raise BadRequest(f"{context}: field 'move' must be from 1 to 2**63-1")
        return MoveRequest(request_id, shard, step, _u32(msg, "ks_id", context),
                           _u32(msg, "ls", context), move_id, data)
    limit = msg.get("limit", 1000)
    if isinstance(limit, bool) or not isinstance(limit, int) or not (
            1 <= limit <= SCAN_LIMIT_MAX):
        raise BadRequest(f"{context}: field 'limit' must be an integer from 1 to "
                         f"{SCAN_LIMIT_MAX}")
    changelog_of = _uint(msg, "move", context) if "move" in msg else None
    after = _bytes(msg, "after", context, limits.key_bytes_max + 64, "after key") \
        if "after" in msg else b""
    return MoveReadRequest(request_id, shard, _u32(msg, "ks_id", context),
                           _u32(msg, "ls", context), after, changelog_of,
                           _uint(msg, "from", context) if "from" in msg else 1, limit,
                           _uint(msg, "min_index", context) if "min_index" in msg else 0)


def _decode_fields(msg: dict[str, Any], request_id: int, limits: Limits) -> Request:
    op = msg.get("op")
    context = f"request {request_id} ({op})"
    if op == "get":
        return GetRequest(
            request_id, _uint(msg, "shard", context), _keyspace(msg, context),
            _key(msg, context, limits), _consistency(msg, context),
        )
    if op in ("scan", "own", "drop", "transfer", "fault"):
        return _decode_admin(msg, op, request_id, context, limits)
    if op in ("move", "move_read"):
        return _decode_move(msg, op, request_id, context, limits)
    if op in ("put", "delete", "cas", "batch"):
        if op == "batch":
            raw_ops = _field(msg, "ops", context)
            if not isinstance(raw_ops, list) or not raw_ops:
                raise BadRequest(f"{context}: field 'ops' must be a non-empty list")
            if len(raw_ops) > limits.batch_ops_max:
                raise TooLarge(
                    f"{context}: batch of {len(raw_ops)} ops is over the limit of "
                    f"{limits.batch_ops_max}"
                )
            ops = tuple(_write_op(raw, context, limits) for raw in raw_ops)
        else:
            ops = (_write_op(msg, context, limits),)
        total = sum(len(o.key) + len(getattr(o, "value", b"")) for o in ops)
        if total > limits.batch_bytes_max:
            raise TooLarge(
                f"{context}: {total} bytes of keys and values is over the limit of "
                f"{limits.batch_bytes_max}"
            )
        client_id = _field(msg, "cid", context)
        if not isinstance(client_id, bytes) or len(client_id) != CLIENT_ID_BYTES:
            raise BadRequest(f"{context}: field 'cid' must be {CLIENT_ID_BYTES} bytes")
        seq = _uint(msg, "seq", context)
        ack = _uint(msg, "ack", context)
        if ack >= seq:
            raise BadRequest(f"{context}: field 'ack' must be below 'seq'")
        return WriteRequest(
            request_id, _uint(msg, "shard", context), _keyspace(msg, context),
            client_id, seq, ack, ops, op,
        )
    if op == "status":
        return StatusRequest(request_id)
    if op == "ping":
        return PingRequest(request_id)
    raise BadRequest(f"{context}: unknown op {op!r}")


# ---------------------------------------------------------------------------
# encoding (client side builds plain maps; these helpers keep field names in one place)


def encode_op(op: WriteOp) -> dict[str, Any]:
    if isinstance(op, PutOp):
        return {"op": "put", "key": op.key, "value": op.value}
    if isinstance(op, DeleteOp):
        return {"op": "delete", "key": op.key}
    return {"op": "cas", "key": op.key, "expect": op.expected, "value": op.value}


def encode_request(request: Request) -> bytes:
    msg: dict[str, Any]
    if isinstance(request, GetRequest):
        msg = {"id": request.id, "op": "get", "shard": request.shard, "ks": request.keyspace,
               "key": request.key, "cons": request.consistency}
    elif isinstance(request, WriteRequest):
        msg = {"id": request.id, "shard": request.shard, "ks": request.keyspace,
               "cid": request.client_id, "seq": request.seq, "ack": request.ack_seq}
        if request.kind == "batch" or len(request.ops) != 1:
            msg["op"] = "batch"
            msg["ops"] = [encode_op(o) for o in request.ops]
        else:
            msg.update(encode_op(request.ops[0]))
    elif isinstance(request, StatusRequest):
        msg = {"id": request.id, "op": "status"}
    else:
        msg = {"id": request.id, "op": "ping"}
    return cbor2.dumps(msg)


def encode_ok(request_id: int, result: Any) -> bytes:
    return cbor2.dumps({"id": request_id, "ok": result})


def encode_error(request_id: int | None, error: RaftKVError) -> bytes:
    wire = error.to_wire()
    wire.pop("request_id", None)
    return cbor2.dumps({"id": request_id, "err": wire})

"""Request decoding: round trips, and only BadRequest/TooLarge on junk."""

from __future__ import annotations

import math
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftkv import errors
from raftkv.errors import BadRequest, RaftKVError, TooLarge, error_from_wire
from raftkv.protocol.messages import (
    CLIENT_ID_BYTES,
    DEFAULT_LIMITS,
    U64_MAX,
    CasOp,
    DeleteOp,
    GetRequest,
    Limits,
    PingRequest,
    PutOp,
    StatusRequest,
    WriteRequest,
    decode_request,
    encode_error,
    encode_op,
    encode_request,
)

SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
SMALL = Limits(
    key_bytes_max=8, value_bytes_max=8, batch_ops_max=3, batch_bytes_max=20, frame_bytes_max=64
)

u64 = st.integers(min_value=0, max_value=U64_MAX)
keyspaces = st.text(min_size=1, max_size=64)
keys = st.binary(min_size=1, max_size=40)
values = st.binary(max_size=60)
cids = st.binary(min_size=CLIENT_ID_BYTES, max_size=CLIENT_ID_BYTES)

put_ops = st.builds(PutOp, keys, values)
delete_ops = st.builds(DeleteOp, keys)
cas_ops = st.builds(CasOp, keys, st.none() | values, values)
write_ops = st.one_of(put_ops, delete_ops, cas_ops)


@st.composite
def write_requests(draw: st.DrawFn) -> WriteRequest:
    kind = draw(st.sampled_from(["put", "delete", "cas", "batch"]))
    ops: tuple[Any, ...]
    if kind == "batch":
        ops = tuple(draw(st.lists(write_ops, min_size=1, max_size=6)))
    else:
        ops = (draw({"put": put_ops, "delete": delete_ops, "cas": cas_ops}[kind]),)
    seq = draw(st.integers(min_value=1, max_value=U64_MAX))
    ack = draw(st.integers(min_value=0, max_value=seq - 1))
    return WriteRequest(
        id=draw(u64), shard=draw(u64), keyspace=draw(keyspaces), client_id=draw(cids),
        seq=seq, ack_seq=ack, ops=ops, kind=kind,
    )


requests = st.one_of(
    st.builds(GetRequest, u64, u64, keyspaces, keys, st.sampled_from(["strong", "eventual"])),
    write_requests(),
    st.builds(StatusRequest, u64),
    st.builds(PingRequest, u64),
)


@SETTINGS
@given(request=requests)
def test_round_trip(request: Any) -> None:
    assert decode_request(encode_request(request)) == request


def test_round_trip_at_the_limits() -> None:
    limits = DEFAULT_LIMITS
    key = b"k" * limits.key_bytes_max
    value = b"v" * limits.value_bytes_max
    request = WriteRequest(U64_MAX, U64_MAX, "k" * 64, b"c" * 16, U64_MAX, U64_MAX - 1,
                           (PutOp(key, value),), "put")
    assert decode_request(encode_request(request)) == request
    ops = tuple(DeleteOp(str(i).encode()) for i in range(limits.batch_ops_max))
    batch = WriteRequest(0, 0, "default", b"c" * 16, 1, 0, ops, "batch")
    assert decode_request(encode_request(batch)) == batch


def test_defaults_for_optional_fields() -> None:
    get = decode_request(cbor2.dumps({"id": 1, "op": "get", "shard": 2, "key": b"k"}))
    assert get == GetRequest(1, 2, "default", b"k", "strong")
    put = decode_request(cbor2.dumps({"id": 1, "op": "put", "shard": 2, "key": "k",
                                      "value": "v", "cid": b"c" * 16, "seq": 1, "ack": 0}))
    assert put == WriteRequest(1, 2, "default", b"c" * 16, 1, 0, (PutOp(b"k", b"v"),), "put")


# ---------------------------------------------------------------------------
# junk in: BadRequest or TooLarge out, never anything else

FIELD_NAMES = ["id", "op", "shard", "key", "value", "expect", "ks", "cons", "cid", "seq",
               "ack", "ops"]
OP_NAMES = ["get", "put", "delete", "cas", "batch", "status", "ping"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.binary(max_size=20)
    | st.text(max_size=20)
    | st.sampled_from(OP_NAMES)
)
map_keys = (
    st.sampled_from(FIELD_NAMES) | st.text(max_size=5) | st.integers() | st.binary(max_size=4)
)
junk = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(map_keys, children, max_size=6),
    max_leaves=25,
)


def _valid_id(msg: Any) -> int | None:
    if not isinstance(msg, dict):
        return None
    value = msg.get("id")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _check_decode(body: bytes, limits: Limits, request_id: int | None) -> None:
    try:
        request = decode_request(body, limits)
    except RaftKVError as exc:
        assert type(exc) in (BadRequest, TooLarge), repr(exc)
        assert exc.definite is True
        assert exc.message
        if request_id is None:
            assert "request_id" not in exc.details
        else:
            assert exc.details.get("request_id") == request_id
            assert isinstance(exc.details["request_id"], int)
        return
    # accepted: it must be a well-formed request that survives a round trip
    assert isinstance(request, (GetRequest, WriteRequest, StatusRequest, PingRequest))
    assert request.id == request_id
    if isinstance(request, WriteRequest):
        assert len(request.client_id) == CLIENT_ID_BYTES
        assert 0 <= request.ack_seq < request.seq <= U64_MAX
        assert 1 <= len(request.ops) <= limits.batch_ops_max
    if isinstance(request, (GetRequest, WriteRequest)):
        assert 1 <= len(request.keyspace) <= 64
        assert 0 <= request.shard <= U64_MAX
    for op in getattr(request, "ops", ()):
        assert 1 <= len(op.key) <= limits.key_bytes_max
        assert len(getattr(op, "value", b"")) <= limits.value_bytes_max
    assert decode_request(encode_request(request), limits) == request


@SETTINGS
@given(body=st.binary(max_size=200), small=st.booleans())
def test_arbitrary_bytes(body: bytes, small: bool) -> None:
    try:
        msg = cbor2.loads(body)
    except Exception:
        msg = None
    _check_decode(body, SMALL if small else DEFAULT_LIMITS, _valid_id(msg))


@SETTINGS
@given(msg=junk, small=st.booleans())
def test_arbitrary_cbor_structures(msg: Any, small: bool) -> None:
    _check_decode(cbor2.dumps(msg), SMALL if small else DEFAULT_LIMITS, _valid_id(msg))


# plausible requests: a valid request with a few fields removed, set just out of
# range, or replaced by junk
EDGE_VALUES: dict[str, list[Any]] = {
    "id": [0, U64_MAX, U64_MAX + 1, 2**70],
    "op": ["frobnicate", "PUT", "", "get", "put", "delete", "cas", "batch", "status"],
    "shard": [-1, U64_MAX + 1, True, 1.0, "0"],
    "key": [b"", "", b"k" * 9, "k" * 9, "\u00e9" * 5, None],
    "value": [b"", b"v" * 9, "v" * 9, None, 1],
    "expect": [None, b"", b"e" * 9, 0],
    "ks": ["", "k" * 64, "k" * 65, b"ks", None],
    "cons": ["weak", None, "STRONG"],
    "cid": [b"c" * 15, b"c" * 17, "c" * 16, b""],
    "seq": [0, 1, -1, U64_MAX, U64_MAX + 1, False],
    "ack": [0, -1, U64_MAX, U64_MAX + 1, True],
    "ops": [[], None, {}, [{"op": "delete", "key": b"k"}] * 4, [None]],
}
OP_FIELDS = ["op", "key", "value", "expect"]


@st.composite
def plausible_requests(draw: st.DrawFn) -> dict[Any, Any]:
    msg: dict[Any, Any] = cbor2.loads(encode_request(draw(requests)))
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        target = msg
        names = FIELD_NAMES
        if isinstance(msg.get("ops"), list) and msg["ops"] and draw(st.booleans()):
            target = draw(st.sampled_from(msg["ops"]))
            if not isinstance(target, dict):
                continue
            names = OP_FIELDS
        name = draw(st.sampled_from(names))
        action = draw(st.sampled_from(["delete", "edge", "edge", "junk"]))
        if action == "delete":
            target.pop(name, None)
        elif action == "edge":
            target[name] = draw(st.sampled_from(EDGE_VALUES[name]))
        else:
            target[name] = draw(junk)
    return msg


@SETTINGS
@given(msg=plausible_requests(), small=st.booleans())
def test_plausible_requests(msg: dict[Any, Any], small: bool) -> None:
    _check_decode(cbor2.dumps(msg), SMALL if small else DEFAULT_LIMITS, _valid_id(msg))


# ---------------------------------------------------------------------------
# explicit cases


def _write(**fields: Any) -> dict[str, Any]:
    msg = {"id": 7, "op": "put", "shard": 0, "key": b"k", "value": b"v",
           "cid": b"c" * 16, "seq": 5, "ack": 4}
    msg.update(fields)
    return msg


def _raises(exc_type: type[RaftKVError], msg: dict[str, Any], limits: Limits = SMALL
            ) -> RaftKVError:
    with pytest.raises(exc_type) as info:
        decode_request(cbor2.dumps(msg), limits)
    assert type(info.value) is exc_type
    assert info.value.definite is True
    assert info.value.details["request_id"] == msg["id"]
    return info.value


def test_valid_base_message_decodes() -> None:
    assert isinstance(decode_request(cbor2.dumps(_write()), SMALL), WriteRequest)


def test_oversized_key() -> None:
    exc = _raises(TooLarge, _write(key=b"k" * 9))
    assert "key" in exc.message and "limit of 8" in exc.message
    exc = _raises(TooLarge, {"id": 3, "op": "get", "shard": 0, "key": "k" * 9})
    assert "key" in exc.message and "limit of 8" in exc.message
    # exactly at the limit is fine
    decode_request(cbor2.dumps(_write(key=b"k" * 8)), SMALL)


def test_oversized_value() -> None:
    exc = _raises(TooLarge, _write(value=b"v" * 9))
    assert "value" in exc.message and "limit of 8" in exc.message
    exc = _raises(TooLarge, _write(op="cas", expect=b"e" * 9))
    assert "expected value" in exc.message and "limit of 8" in exc.message
    decode_request(cbor2.dumps(_write(value=b"v" * 8)), SMALL)


def test_oversized_batch() -> None:
    op = {"op": "delete", "key": b"k"}
    exc = _raises(TooLarge, _write(op="batch", ops=[op] * 4))
    assert "batch of 4 ops" in exc.message and "limit of 3" in exc.message
    decode_request(cbor2.dumps(_write(op="batch", ops=[op] * 3)), SMALL)
    big = {"op": "put", "key": b"k" * 8, "value": b"v" * 8}  # 16 bytes each, limit 20
    exc = _raises(TooLarge, _write(op="batch", ops=[big, big]))
    assert "32 bytes" in exc.message and "limit of 20" in exc.message


def test_empty_key() -> None:
    assert "empty" in _raises(BadRequest, _write(key=b"")).message
    assert "empty" in _raises(BadRequest, _write(key="")).message
    _raises(BadRequest, {"id": 1, "op": "get", "shard": 0, "key": b""})
    _raises(BadRequest, _write(op="batch", ops=[{"op": "put", "key": b"", "value": b""}]))


@pytest.mark.parametrize(("seq", "ack"), [(5, 5), (5, 6), (0, 0), (1, U64_MAX)])
def test_ack_must_be_below_seq(seq: int, ack: int) -> None:
    exc = _raises(BadRequest, _write(seq=seq, ack=ack))
    assert "ack" in exc.message


@pytest.mark.parametrize("cid", [b"", b"c" * 15, b"c" * 17, "c" * 16, 16, None])
def test_client_id_must_be_16_bytes(cid: Any) -> None:
    assert "cid" in _raises(BadRequest, _write(cid=cid)).message


def test_unknown_op_is_named() -> None:
    exc = _raises(BadRequest, {"id": 9, "op": "frobnicate"})
    assert "frobnicate" in exc.message
    exc = _raises(BadRequest, _write(op="batch", ops=[{"op": "zap", "key": b"k"}]))
    assert "zap" in exc.message


def test_missing_field_is_named() -> None:
    msg = _write()
    del msg["seq"]
    assert "'seq'" in _raises(BadRequest, msg).message


def test_bad_ids_carry_no_request_id() -> None:
    for request_id in (-1, True, "1", None, 1.0):
        with pytest.raises(BadRequest) as info:
            decode_request(cbor2.dumps({"id": request_id, "op": "ping"}))
        assert "request_id" not in info.value.details


def test_encode_error_drops_request_id() -> None:
    exc = _raises(BadRequest, {"id": 9, "op": "frobnicate"})
    reply = cbor2.loads(encode_error(9, exc))
    assert reply["id"] == 9
    assert reply["err"]["code"] == "BAD_REQUEST"
    assert reply["err"]["definite"] is True
    assert "request_id" not in reply["err"]


def test_encode_op_shapes() -> None:
    assert encode_op(PutOp(b"k", b"v")) == {"op": "put", "key": b"k", "value": b"v"}
    assert encode_op(DeleteOp(b"k")) == {"op": "delete", "key": b"k"}
    assert encode_op(CasOp(b"k", None, b"v")) == {"op": "cas", "key": b"k", "expect": None,
                                                  "value": b"v"}


# ---------------------------------------------------------------------------
# errors


def _all_error_classes() -> list[type[RaftKVError]]:
    found: list[type[RaftKVError]] = []
    todo = list(RaftKVError.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: c.__name__)


ERROR_CLASSES = _all_error_classes()


def test_error_codes_are_unique_and_all_known() -> None:
    codes = [cls.code for cls in ERROR_CLASSES]
    assert len(codes) == len(set(codes)) == len(ERROR_CLASSES) >= 14
    for cls in ERROR_CLASSES:
        assert type(error_from_wire({"code": cls.code})) is cls


def test_definite_flags() -> None:
    # CLUSTER_UNAVAILABLE is definite: the SDK raises it only when no attempt
    # may have taken effect (otherwise it raises that attempt's indefinite error)
    indefinite = {"TIMEOUT", "CONNECTION_LOST", "OUTCOME_UNKNOWN", "INTERNAL"}
    for cls in ERROR_CLASSES:
        assert cls.definite is (cls.code not in indefinite), cls


details_strategy = st.dictionaries(
    st.text(min_size=1, max_size=10).filter(lambda k: k not in ("code", "definite", "msg")),
    st.none() | st.booleans() | st.integers() | st.text(max_size=10) | st.binary(max_size=10),
    max_size=4,
)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=20, deadline=None)
@given(message=st.text(min_size=1, max_size=30), details=details_strategy)
def test_error_wire_round_trip(cls: type[RaftKVError], message: str,
                               details: dict[str, Any]) -> None:
    if "message" in details:  # the constructor's own parameter name
        details = {k: v for k, v in details.items() if k != "message"}
    original = cls(message, **details)
    for wire in (original.to_wire(), cbor2.loads(cbor2.dumps(original.to_wire()))):
        back = error_from_wire(wire)
        assert type(back) is cls
        assert back.code == original.code
        assert back.definite is original.definite
        assert back.message == message
        assert back.details == details


def test_not_leader_hint_survives_the_wire() -> None:
    back = error_from_wire(errors.NotLeader("go there", leader="10.0.0.2:7000").to_wire())
    assert isinstance(back, errors.NotLeader)
    assert back.leader == "10.0.0.2:7000"
    back = error_from_wire(errors.NotLeader("x").to_wire())
    assert isinstance(back, errors.NotLeader)
    assert back.leader is None


@pytest.mark.parametrize(
    "wire",
    [
        {"code": "NO_SUCH_CODE", "definite": True, "msg": "x"},
        {"code": 42, "msg": "x"},
        {"code": None},
        {},
        {"definite": True},
        "not a map",
        None,
        [1, 2],
        42,
    ],
)
def test_unknown_or_malformed_becomes_internal(wire: Any) -> None:
    err = error_from_wire(wire)
    assert type(err) is errors.InternalError
    assert err.code == "INTERNAL"
    assert err.definite is False  # an unknown failure may have happened


@SETTINGS
@given(wire=st.dictionaries(map_keys | st.just("message"), junk, max_size=6)
       | st.fixed_dictionaries({"code": st.sampled_from([c.code for c in ERROR_CLASSES])},
                               optional={"msg": junk, "message": junk, "definite": junk,
                                         "leader": junk}))
def test_error_from_wire_never_raises(wire: dict[Any, Any]) -> None:
    """A client must turn any err map a server sends into a RaftKVError."""
    err = error_from_wire(wire)
    assert isinstance(err, RaftKVError)
    assert isinstance(err.message, str)
    code = wire.get("code")
    known = {c.code for c in ERROR_CLASSES}
    if isinstance(code, str) and code in known:
        assert err.code == code
    else:
        assert type(err) is errors.InternalError
    if isinstance(wire.get("msg"), str):
        assert err.message == wire["msg"] or not wire["msg"]


def test_float_nan_id_is_bad_request() -> None:
    with pytest.raises(BadRequest):
        decode_request(cbor2.dumps({"id": math.nan, "op": "ping"}))

"""etcd's native gRPC API for the benchmark: ``KV/Put``, linearizable
``KV/Range``, and ``Maintenance/Status`` (to find the leader and the version).

No protoc and no generated files: the few messages the benchmark needs are
described in a ``FileDescriptorProto`` built here, with etcd's field numbers
(etcd 3.4, ``etcdserver/etcdserverpb/rpc.proto`` and ``mvcc/mvccpb/kv.proto``),
and their classes made at import time by protobuf's message factory in a
private descriptor pool. Fields left out are skipped on decoding, as proto3
does with any unknown field.

``RangeRequest.serializable`` (field 7) is never set: false, so every read is
linearizable (etcd confirms its leadership with a ReadIndex round first).

The HTTP JSON gateway (what ``jepsen_lite.etcd`` uses) is not used here: it is
one more hop inside the server, and would handicap etcd in a throughput
comparison.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

REQUEST_TIMEOUT_S: Final = 10.0
_PACKAGE: Final = "etcdserverpb"

_F = descriptor_pb2.FieldDescriptorProto
# (message, [(field, number, type, label, message type name or None)])
_MESSAGES: Final[list[tuple[str, list[tuple[str, int, int, int, str | None]]]]] = [
    ("ResponseHeader", [("member_id", 2, _F.TYPE_UINT64, _F.LABEL_OPTIONAL, None),
                        ("revision", 3, _F.TYPE_INT64, _F.LABEL_OPTIONAL, None)]),
    ("KeyValue", [("key", 1, _F.TYPE_BYTES, _F.LABEL_OPTIONAL, None),
                  ("value", 5, _F.TYPE_BYTES, _F.LABEL_OPTIONAL, None)]),
    ("PutRequest", [("key", 1, _F.TYPE_BYTES, _F.LABEL_OPTIONAL, None),
                    ("value", 2, _F.TYPE_BYTES, _F.LABEL_OPTIONAL, None)]),
    ("PutResponse", [("header", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "ResponseHeader")]),
    ("RangeRequest", [("key", 1, _F.TYPE_BYTES, _F.LABEL_OPTIONAL, None),
                      ("serializable", 7, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None)]),
    ("RangeResponse", [("header", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "ResponseHeader"),
                       ("kvs", 2, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "KeyValue")]),
    ("StatusRequest", []),
    ("StatusResponse", [("header", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "ResponseHeader"),
                        ("version", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
                        ("leader", 4, _F.TYPE_UINT64, _F.LABEL_OPTIONAL, None)]),
]


def _message_classes() -> dict[str, Any]:
    proto = descriptor_pb2.FileDescriptorProto(
        name="raftkv_bench_etcd_kv.proto", package=_PACKAGE, syntax="proto3")
    for name, fields in _MESSAGES:
        message = proto.message_type.add(name=name)
        for field, number, type_, label, type_name in fields:
            f = message.field.add(name=field, number=number, type=type_, label=label)
            if type_name is not None:
                f.type_name = f".{_PACKAGE}.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {name: message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"{_PACKAGE}.{name}")) for name, _ in _MESSAGES}


MESSAGES: Final = _message_classes()


class EtcdKV:
    """Puts and linearizable gets over one gRPC channel per endpoint.

    Requests go to the endpoints in turn, one request each (round-robin, as
    clientv3's default balancer does over its endpoints). A follower forwards
    a put to the leader and asks it for a read index before a read; given
    only the leader's endpoint, every request goes straight to it. Use inside
    a running asyncio loop; `close` the channels at the end. Failed calls
    raise ``grpc.aio.AioRpcError``.
    """

    def __init__(self, endpoints: list[str], request_timeout_s: float = REQUEST_TIMEOUT_S
                 ) -> None:
        if not endpoints:
            raise ValueError("EtcdKV needs at least one endpoint (host:port)")
        self.endpoints = list(endpoints)
        self.request_timeout_s = request_timeout_s
        self._channels = [grpc.aio.insecure_channel(e) for e in self.endpoints]
        put_request, range_request = MESSAGES["PutRequest"], MESSAGES["RangeRequest"]
        self._put = [c.unary_unary(
            f"/{_PACKAGE}.KV/Put", request_serializer=put_request.SerializeToString,
            response_deserializer=MESSAGES["PutResponse"].FromString) for c in self._channels]
        self._range = [c.unary_unary(
            f"/{_PACKAGE}.KV/Range", request_serializer=range_request.SerializeToString,
            response_deserializer=MESSAGES["RangeResponse"].FromString) for c in self._channels]
        self._next = itertools.cycle(range(len(self._channels)))

    async def put(self, key: bytes, value: bytes) -> int:
        """Store ``value`` under ``key``; returns the revision of the put."""
        reply = await self._put[next(self._next)](
            MESSAGES["PutRequest"](key=key, value=value), timeout=self.request_timeout_s)
        return int(reply.header.revision)

    async def get(self, key: bytes) -> bytes | None:
        """The value of ``key`` (linearizable read), None when it is absent."""
        reply = await self._range[next(self._next)](
            MESSAGES["RangeRequest"](key=key), timeout=self.request_timeout_s)
        return bytes(reply.kvs[0].value) if reply.kvs else None

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


def endpoint_of(client_url: str) -> str:
    """``http://127.0.0.1:2379`` -> ``127.0.0.1:2379`` (what grpc dials)."""
    return client_url.split("://", 1)[-1].rstrip("/")


@dataclass(frozen=True)
class MemberStatus:
    endpoint: str
    member_id: int
    leader_id: int
    version: str


async def member_status(endpoint: str, timeout_s: float = 2.0) -> MemberStatus:
    """One member's ``Maintenance/Status``; raises ``grpc.aio.AioRpcError``."""
    async with grpc.aio.insecure_channel(endpoint) as channel:
        call = channel.unary_unary(
            f"/{_PACKAGE}.Maintenance/Status",
            request_serializer=MESSAGES["StatusRequest"].SerializeToString,
            response_deserializer=MESSAGES["StatusResponse"].FromString)
        reply = await call(MESSAGES["StatusRequest"](), timeout=timeout_s)
    return MemberStatus(endpoint, int(reply.header.member_id), int(reply.leader),
                        str(reply.version))


async def find_leader(endpoints: list[str], timeout_s: float = 10.0) -> MemberStatus:
    """The status of the member every member names as leader; waits (up to
    ``timeout_s``, then TimeoutError) until they agree on one that is among
    ``endpoints``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            statuses = [await member_status(e) for e in endpoints]
        except grpc.aio.AioRpcError:
            statuses = []
        leaders = {s.leader_id for s in statuses}
        for s in statuses:
            if leaders == {s.member_id}:
                return s
        if time.monotonic() > deadline:
            raise TimeoutError(f"etcd members {', '.join(endpoints)} did not agree on a "
                               f"leader within {timeout_s} s")
        await asyncio.sleep(0.1)

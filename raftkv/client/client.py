"""The trio-native client SDK.

    async with open_client(["127.0.0.1:7001", "127.0.0.1:7002"]) as kv:
        await kv.put("greeting", "hello")
        assert await kv.get("greeting") == b"hello"

Retries: definite refusals (NOT_LEADER, UNAVAILABLE, OVERLOADED, SHARD_MOVING,
a refused connection) are retried at the leader hint or the next node, with
jittered backoff. Indefinite failures (TIMEOUT, CONNECTION_LOST,
OUTCOME_UNKNOWN) are retried with the **same** ``(client_id, seq)``, which the
replicated dedup table turns into exactly-once. When the retry budget runs
out, the error raised is indefinite if any attempt's outcome was unknown.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import cbor2
import trio

from raftkv.errors import (
    ClusterUnavailable,
    ConnectionLost,
    NotLeader,
    Overloaded,
    RaftKVError,
    ShardMoving,
    Timeout,
    Unavailable,
    error_from_wire,
)
from raftkv.protocol.framing import FrameDecoder, encode_frame
from raftkv.protocol.messages import (
    CLIENT_ID_BYTES,
    DEFAULT_KEYSPACE,
    CasOp,
    DeleteOp,
    PutOp,
    WriteOp,
    encode_op,
)

Bytesish = bytes | str


def _b(value: Bytesish) -> bytes:
    return value.encode() if isinstance(value, str) else value


_RETRY_DEFINITE = (NotLeader, Unavailable, Overloaded, ShardMoving)


@dataclass(frozen=True)
class WriteResult:
    """Where the write landed in the shard's log, and per-op results
    (put: None, delete: whether the key existed, cas: True)."""

    index: int
    results: list[Any]


class _Connection:
    """One TCP connection with many requests in flight, matched by id."""

    def __init__(self, address: str, stream: trio.SocketStream) -> None:
        self.address = address
        self._stream = stream
        self._next_id = 0
        self._waiters: dict[int, tuple[trio.Event, list[Any]]] = {}
        self._send_lock = trio.Lock()
        self.closed = False

    async def run(self) -> None:
        decoder = FrameDecoder()
        try:
            while True:
                data = await self._stream.receive_some(256 * 1024)
                if not data:
                    break
                decoder.feed(data)
                for body in decoder.frames():
                    msg = cbor2.loads(body)
                    waiter = self._waiters.pop(msg.get("id"), None)
                    if waiter is not None:
                        waiter[1].append(msg)
                        waiter[0].set()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ValueError):
            pass
        finally:
            self._fail_all()

    def _fail_all(self) -> None:
        self.closed = True
        for event, slot in self._waiters.values():
            slot.append(None)
            event.set()
        self._waiters.clear()

    async def request(self, msg: dict[str, Any], timeout_s: float) -> Any:
        if self.closed:
            raise ConnectionLost(f"connection to {self.address} is closed")
        self._next_id += 1
        request_id = self._next_id
        msg["id"] = request_id
        event = trio.Event()
        slot: list[Any] = []
        self._waiters[request_id] = (event, slot)
        try:
            async with self._send_lock:
                await self._stream.send_all(encode_frame(cbor2.dumps(msg)))
            with trio.move_on_after(timeout_s):
                await event.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._waiters.pop(request_id, None)
            raise ConnectionLost(f"connection to {self.address} failed: {exc}") from exc
        if not slot:
            self._waiters.pop(request_id, None)
            raise Timeout(f"no reply from {self.address} in {timeout_s} s")
        reply = slot[0]
        if reply is None:
            raise ConnectionLost(f"connection to {self.address} closed with the request in flight")
        if "err" in reply:
            raise error_from_wire(reply["err"])
        return reply["ok"]

    async def aclose(self) -> None:
        await self._stream.aclose()


class AsyncClient:
    """Use ``open_client`` to make one."""

    def __init__(self, nursery: trio.Nursery, addresses: list[str], *, shard: int = 0,
                 keyspace: str = DEFAULT_KEYSPACE, request_timeout_s: float = 5.0,
                 retry_budget_s: float = 20.0, connect_timeout_s: float = 2.0) -> None:
        if not addresses:
            raise ValueError("a client needs at least one node address")
        self._nursery = nursery
        self.addresses = list(addresses)
        self.shard = shard
        self.keyspace = keyspace
        self.request_timeout_s = request_timeout_s
        self.retry_budget_s = retry_budget_s
        self.connect_timeout_s = connect_timeout_s
        self.client_id = os.urandom(CLIENT_ID_BYTES)
        self._connections: dict[str, _Connection] = {}
        self._connecting: dict[str, trio.Event] = {}
        self._leader: str | None = None
        self._rotation = random.randrange(len(self.addresses))
        self._seq = 0
        self._outstanding: set[int] = set()
        self.retries = 0

    # -- public API -----------------------------------------------------------

    async def get(self, key: Bytesish, *, consistency: str = "strong") -> bytes | None:
        """The value of ``key``, or None. ``strong`` (default) is linearizable;
        ``eventual`` may be stale (any replica)."""
        msg = {"op": "get", "shard": self.shard, "ks": self.keyspace, "key": _b(key),
               "cons": consistency}
        result = await self._call(msg, leader_only=consistency == "strong")
        value = result["value"]
        return value if value is None else bytes(value)

    async def put(self, key: Bytesish, value: Bytesish) -> WriteResult:
        return await self.batch([PutOp(_b(key), _b(value))], kind="put")

    async def delete(self, key: Bytesish) -> bool:
        """Delete ``key``; returns whether it existed."""
        result = await self.batch([DeleteOp(_b(key))], kind="delete")
        return bool(result.results[0])

    async def cas(self, key: Bytesish, expected: Bytesish | None, value: Bytesish) -> WriteResult:
        """Set ``key`` to ``value`` if it holds ``expected`` (None: if absent).
        Raises PreconditionFailed (with ``details['current']``) otherwise."""
        return await self.batch(
            [CasOp(_b(key), None if expected is None else _b(expected), _b(value))], kind="cas")

    async def batch(self, ops: list[WriteOp], *, kind: str = "batch") -> WriteResult:
        """Apply ``ops`` atomically: all or (if any cas fails) none."""
        self._seq += 1
        seq = self._seq
        self._outstanding.add(seq)
        try:
            msg: dict[str, Any] = {"shard": self.shard, "ks": self.keyspace,
                                   "cid": self.client_id, "seq": seq}
            if kind == "batch":
                msg.update(op="batch", ops=[encode_op(o) for o in ops])
            else:
                msg.update(encode_op(ops[0]))
            result = await self._call(msg, leader_only=True, seq=seq)
            return WriteResult(int(result["index"]), list(result["results"]))
        finally:
            self._outstanding.discard(seq)

    async def status(self, address: str) -> dict[str, Any]:
        """One node's status (no retries)."""
        conn = await self._connection(address)
        result: dict[str, Any] = await conn.request({"op": "status"}, self.request_timeout_s)
        return result

    async def aclose(self) -> None:
        for conn in list(self._connections.values()):
            await conn.aclose()
        self._connections.clear()

    # -- machinery ------------------------------------------------------------

    def _ack(self) -> int:
        return min(self._outstanding) - 1 if self._outstanding else self._seq

    async def _connection(self, address: str) -> _Connection:
        while True:
            conn = self._connections.get(address)
            if conn is not None and not conn.closed:
                return conn
            pending = self._connecting.get(address)
            if pending is None:
                break
            await pending.wait()
        event = self._connecting[address] = trio.Event()
        try:
            host, port = address.rsplit(":", 1)
            try:
                with trio.fail_after(self.connect_timeout_s):
                    stream = await trio.open_tcp_stream(host, int(port))
            except (OSError, trio.TooSlowError) as exc:
                raise Unavailable(f"cannot connect to {address}: {exc}") from exc
            conn = _Connection(address, stream)
            self._connections[address] = conn
            self._nursery.start_soon(conn.run)
            return conn
        finally:
            del self._connecting[address]
            event.set()

    def _pick(self) -> str:
        if self._leader is not None:
            return self._leader
        address = self.addresses[self._rotation % len(self.addresses)]
        return address

    def _rotate(self) -> None:
        self._leader = None
        self._rotation += 1

    async def _call(self, msg: dict[str, Any], *, leader_only: bool, seq: int | None = None) -> Any:
        deadline = trio.current_time() + self.retry_budget_s
        maybe_happened: RaftKVError | None = None
        last: RaftKVError | None = None
        backoff_s = 0.01
        while True:
            address = self._pick()
            try:
                if seq is not None:
                    msg["ack"] = self._ack()
                conn = await self._connection(address)
                result = await conn.request(msg, self.request_timeout_s)
                if leader_only:
                    self._leader = address
                return result
            except NotLeader as exc:
                last = exc
                hint = exc.leader
                if hint is not None and hint != address:
                    self._leader = hint
                    continue  # a hint is worth one immediate retry
                self._rotate()
            except _RETRY_DEFINITE as exc:
                last = exc
                self._rotate()
            except RaftKVError as exc:
                if exc.definite:
                    raise
                last = maybe_happened = exc
                self._rotate()
            if trio.current_time() + backoff_s > deadline:
                if maybe_happened is not None:
                    raise maybe_happened
                raise ClusterUnavailable(
                    f"no leader reachable within {self.retry_budget_s} s (last error: {last})")
            self.retries += 1
            await trio.sleep(backoff_s * (0.5 + random.random()))
            backoff_s = min(backoff_s * 2, 0.5)


@asynccontextmanager
async def open_client(addresses: list[str], **options: Any) -> AsyncIterator[AsyncClient]:
    """Open a client; connections are closed when the block exits."""
    async with trio.open_nursery() as nursery:
        client = AsyncClient(nursery, addresses, **options)
        try:
            yield client
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()

"""The SDK's connection: requests issued together share one write, replies
are matched by id, and a connection that breaks fails its requests in flight
as CONNECTION_LOST (indefinite) instead of leaving them to time out.

Real TCP sockets on loopback; the server side is a few lines of the wire
protocol."""

from __future__ import annotations

import functools
import socket
import struct
from typing import Any

import cbor2
import pytest
import trio

from raftkv.client.client import _Connection
from raftkv.errors import ConnectionLost
from raftkv.protocol.framing import FrameDecoder, encode_frame

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


async def echo_ids(stream: trio.SocketStream) -> None:
    """Answer every request with its own ``n``."""
    decoder = FrameDecoder()
    while data := await stream.receive_some(65536):
        decoder.feed(data)
        replies = [encode_frame(cbor2.dumps({"id": r["id"], "ok": r["n"]}))
                   for r in map(cbor2.loads, decoder.frames())]
        await stream.send_all(b"".join(replies))


async def reset_at_once(stream: trio.SocketStream) -> None:
    """Read a little, then reset the connection (SO_LINGER 0: an RST)."""
    await stream.receive_some(1)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def serve(nursery: trio.Nursery, handler: Any) -> tuple[str, int]:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0,
                                                      host="127.0.0.1"))
    return "127.0.0.1", listeners[0].socket.getsockname()[1]


async def connect(nursery: trio.Nursery, handler: Any) -> tuple[_Connection, list[int]]:
    """A client connection to a fresh server, and the sizes of its writes."""
    host, port = await serve(nursery, handler)
    stream = await trio.open_tcp_stream(host, port)
    writes: list[int] = []
    send_all = stream.send_all

    async def counted(data: bytes | bytearray | memoryview) -> None:
        writes.append(len(data))
        await send_all(data)

    stream.send_all = counted  # type: ignore[method-assign]
    conn = _Connection(f"{host}:{port}", stream)
    conn.start(nursery)
    return conn, writes


async def test_requests_issued_together_share_one_write() -> None:
    answers: dict[int, Any] = {}

    async def ask(conn: _Connection, n: int) -> None:
        answers[n] = await conn.request({"op": "ping", "n": n}, 5.0)

    async with trio.open_nursery() as nursery:
        conn, writes = await connect(nursery, echo_ids)
        async with trio.open_nursery() as callers:
            for n in range(200):
                callers.start_soon(ask, conn, n)
        assert answers == {n: n for n in range(200)}  # every reply to its own caller
        # 200 requests issued in one pass of the scheduler: one write (a write
        # per request costs a system call each, on both sides).
        assert len(writes) <= 2, writes
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_a_reset_connection_fails_requests_in_flight_as_connection_lost() -> None:
    async with trio.open_nursery() as nursery:
        conn, _ = await connect(nursery, reset_at_once)
        outcomes: list[BaseException] = []

        async def ask(n: int) -> None:
            try:
                await conn.request({"op": "ping", "n": n}, 10.0)
            except ConnectionLost as exc:
                outcomes.append(exc)

        with trio.fail_after(5):  # long before the 10 s request timeout
            async with trio.open_nursery() as callers:
                for n in range(20):
                    callers.start_soon(ask, n)
        assert len(outcomes) == 20
        assert all(exc.definite is False for exc in outcomes)  # they may have arrived
        with pytest.raises(ConnectionLost):  # and the connection stays closed
            await conn.request({"op": "ping", "n": 99}, 1.0)
        nursery.cancel_scope.cancel()

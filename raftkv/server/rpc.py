"""Request/reply over framed cbor on TCP: the server side shared by the node
and the shard manager.

One connection carries many requests at once: a reader decodes frames and
dispatches each (at most ``IN_FLIGHT_PER_CONNECTION_MAX`` unanswered; past
that the reader stops reading, which pushes back on the client). Replies go
out in completion order, each tagged with its request id, and a single writer
task sends everything queued in one write.

Bad input never takes the server down: an undecodable request gets a
BAD_REQUEST / TOO_LARGE reply naming the problem; a frame over the limit gets
a TOO_LARGE reply and the connection is closed (its framing is lost). Other
connections are not affected.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

import trio

from raftkv.errors import InternalError, RaftKVError, TooLarge
from raftkv.protocol.framing import FrameDecoder, FrameTooLarge, encode_frame
from raftkv.protocol.messages import encode_error, encode_ok

log = logging.getLogger(__name__)

IN_FLIGHT_PER_CONNECTION_MAX = 4096
READ_CHUNK_BYTES = 256 * 1024

Reply = Callable[[Any, RaftKVError | None], None]
Decode = Callable[[bytes], Any]
"""Frame body -> request with an ``id``; raises RaftKVError (with
``details['request_id']`` when known) for bad input."""
Dispatch = Callable[[Any, Reply], None]
"""Answer the request through ``reply(result, error)``, now or later; may raise
RaftKVError for a refusal known at once."""


class _Connection:
    """A client connection's reply side: replies are queued by callbacks and a
    single writer task sends everything queued in one write."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.unsent: list[bytes] = []
        self.in_flight = 0
        self._wakeup = trio.Event()
        self._room = trio.Event()

    def send(self, body: bytes) -> None:
        self.unsent.append(encode_frame(body))
        self._wakeup.set()
        if self.in_flight < IN_FLIGHT_PER_CONNECTION_MAX:
            self._room.set()

    async def write_replies(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            while self.unsent:
                data = b"".join(self.unsent)
                self.unsent.clear()
                await self.stream.send_all(data)

    async def wait_for_room(self) -> None:
        self._room = trio.Event()
        await self._room.wait()

    async def drain(self, timeout_s: float) -> None:
        """After the peer stopped sending: wait (bounded) for replies in flight."""
        with trio.move_on_after(timeout_s):
            while self.in_flight or self.unsent:
                await trio.sleep(0.01)


def request_kind(request: Any) -> str:
    """A request's kind for the counters: its ``op`` (the shard manager's
    requests), else its class without "Request", lowercase (``GetRequest``
    -> ``get``); a move's step after a colon."""
    op = getattr(request, "op", None)
    name = op if isinstance(op, str) else type(request).__name__.removesuffix("Request").lower()
    step = getattr(request, "step", None)
    return name if step is None else f"{name}:{step}"


class RpcServer:
    def __init__(self, decode: Decode, dispatch: Dispatch, *, frame_bytes_max: int,
                 drain_timeout_s: float) -> None:
        self._decode = decode
        self._dispatch = dispatch
        self._frame_bytes_max = frame_bytes_max
        self._drain_timeout_s = drain_timeout_s
        # Requests taken, by kind, and error replies, by code: for status.
        self.requests: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        conn = _Connection(stream)
        decoder = FrameDecoder(self._frame_bytes_max)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.write_replies)
                while True:
                    while conn.in_flight >= IN_FLIGHT_PER_CONNECTION_MAX:
                        await conn.wait_for_room()  # backpressure: stop reading
                    data = await stream.receive_some(READ_CHUNK_BYTES)
                    if not data:
                        break
                    decoder.feed(data)
                    try:
                        for body in decoder.frames():
                            self._handle_frame(body, conn)
                    except FrameTooLarge as exc:
                        conn.send(encode_error(None, TooLarge(str(exc))))
                        break
                await conn.drain(self._drain_timeout_s)
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            # The peer went away (reset, or closed while a reply was being sent).
            # Errors from the nursery arrive in an ExceptionGroup; a plain
            # ``except`` would miss them and the error would stop the whole server.
            pass
        finally:
            await stream.aclose()

    def _handle_frame(self, body: bytes, conn: _Connection) -> None:
        try:
            request = self._decode(body)
        except RaftKVError as exc:
            self.requests["undecodable"] += 1
            self.errors[exc.code] += 1
            conn.send(encode_error(exc.details.get("request_id"), exc))
            return
        self.requests[request_kind(request)] += 1
        conn.in_flight += 1
        request_id = request.id
        answered = False

        def reply(result: Any, error: RaftKVError | None) -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            conn.in_flight -= 1
            if error is None:
                conn.send(encode_ok(request_id, result))
            else:
                self.errors[error.code] += 1
                conn.send(encode_error(request_id, error))

        try:
            self._dispatch(request, reply)
        except RaftKVError as exc:
            reply(None, exc)
        except Exception as exc:  # a bug: answer, log, keep serving
            log.exception("request %r failed", request)
            reply(None, InternalError(f"{type(exc).__name__}: {exc}"))

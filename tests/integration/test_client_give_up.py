"""What the SDK raises when its retry budget runs out: an indefinite error if
any attempt may have taken effect, CLUSTER_UNAVAILABLE (definite) if none could.

A fake shard manager (a real TCP server speaking the wire protocol) hands out
a map whose only shard lives at the address under test."""

from __future__ import annotations

import functools
from typing import Any

import cbor2
import pytest
import trio

from raftkv.client import open_client
from raftkv.errors import ClusterUnavailable, ConnectionLost, Timeout
from raftkv.localcluster import free_port
from raftkv.protocol.framing import FrameDecoder, encode_frame

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


def one_shard_map(node_address: str) -> dict[str, Any]:
    return {"version": 1,
            "keyspaces": {"default": {"id": 0, "logical_shards": 4, "replication_factor": 1,
                                      "state": "active", "map": [1, 1, 1, 1]}},
            "shards": {"1": [{"node": "n1", "address": node_address,
                              "raft_address": "127.0.0.1:1"}]}}


async def serve_map(document: dict[str, Any], stream: trio.SocketStream) -> None:
    decoder = FrameDecoder()
    while data := await stream.receive_some(65536):
        decoder.feed(data)
        for body in decoder.frames():
            request = cbor2.loads(body)
            await stream.send_all(encode_frame(cbor2.dumps({"id": request["id"],
                                                            "ok": document})))


async def swallow(stream: trio.SocketStream) -> None:
    while await stream.receive_some(65536):
        pass  # reads the request, never answers


async def serve(nursery: trio.Nursery, handler: Any) -> str:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0,
                                                      host="127.0.0.1"))
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def test_a_silent_server_gives_an_indefinite_timeout() -> None:
    async with trio.open_nursery() as nursery:
        node = await serve(nursery, swallow)
        manager = await serve(nursery, functools.partial(serve_map, one_shard_map(node)))
        async with open_client([manager], request_timeout_s=0.2, retry_budget_s=1.0,
                               watch_map=False) as kv:
            with pytest.raises(Timeout) as raised:
                await kv.put("k", "v")
        assert raised.value.definite is False  # the write may have happened
        nursery.cancel_scope.cancel()


async def test_nothing_listening_gives_a_definite_cluster_unavailable() -> None:
    refused = f"127.0.0.1:{free_port()}"  # free: connections are refused
    async with trio.open_nursery() as nursery:
        manager = await serve(nursery, functools.partial(serve_map, one_shard_map(refused)))
        async with open_client([manager], retry_budget_s=0.5, watch_map=False) as kv:
            with pytest.raises(ClusterUnavailable) as raised:
                await kv.put("k", "v")
        assert raised.value.definite is True
        nursery.cancel_scope.cancel()


async def test_no_shard_manager_gives_a_definite_cluster_unavailable() -> None:
    async with open_client([f"127.0.0.1:{free_port()}"], retry_budget_s=0.5) as kv:
        with pytest.raises(ClusterUnavailable) as raised:
            await kv.put("k", "v")
    assert raised.value.definite is True


async def answer_garbage(stream: trio.SocketStream) -> None:
    await stream.receive_some(65536)
    await stream.send_all(b"RKR1" + bytes(16))  # a Raft hub's hello, say: not a reply
    await stream.receive_some(65536)


async def test_a_server_that_is_not_raftkv_fails_its_requests_not_the_client() -> None:
    """A node address that reaches something else (a port taken by another
    program): that connection's requests fail, the client goes on."""
    async with trio.open_nursery() as nursery:
        node = await serve(nursery, answer_garbage)
        manager = await serve(nursery, functools.partial(serve_map, one_shard_map(node)))
        async with open_client([manager], request_timeout_s=0.5, retry_budget_s=1.0,
                               watch_map=False) as kv:
            with pytest.raises(ConnectionLost) as raised:  # sent, then the stream broke
                await kv.put("k", "v")
            assert raised.value.definite is False
            assert (await kv.shard_map()).version == 1  # the client still works
        nursery.cancel_scope.cancel()

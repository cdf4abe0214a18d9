"""What the SDK raises when its retry budget runs out: an indefinite error if
any attempt may have taken effect, CLUSTER_UNAVAILABLE (definite) if none could."""

from __future__ import annotations

import functools

import pytest
import trio

from raftkv.client import open_client
from raftkv.errors import ClusterUnavailable, Timeout
from raftkv.localcluster import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


async def test_a_silent_server_gives_an_indefinite_timeout() -> None:
    async def swallow(stream: trio.SocketStream) -> None:
        while await stream.receive_some(65536):
            pass  # reads the request, never answers

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, swallow, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with open_client([f"127.0.0.1:{port}"], request_timeout_s=0.2,
                               retry_budget_s=1.0) as kv:
            with pytest.raises(Timeout) as raised:
                await kv.put("k", "v")
        assert raised.value.definite is False  # the write may have happened
        nursery.cancel_scope.cancel()


async def test_nothing_listening_gives_a_definite_cluster_unavailable() -> None:
    address = f"127.0.0.1:{free_port()}"  # free: connections are refused
    async with open_client([address], retry_budget_s=0.5) as kv:
        with pytest.raises(ClusterUnavailable) as raised:
            await kv.put("k", "v")
    assert raised.value.definite is True

"""Helpers shared by the integration tests (imported as ``integration_support``)."""

from __future__ import annotations

import contextlib
import os
import signal
import struct
from collections.abc import Callable
from typing import Any

import cbor2
import trio

from raftkv.localcluster import LocalCluster

SHARD = 1
"""The physical shard of a test cluster with one (shard ids start at 1)."""


def _kill_everything(cluster: LocalCluster) -> None:
    pids: set[int] = set()
    for node_id in cluster.process_ids:
        pid = cluster.pid(node_id)
        if pid is not None:
            pids.add(pid)
    children = getattr(cluster, "_children", {})
    for child in children.values():
        if child.poll() is None:
            pids.add(child.pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for child in children.values():
        with contextlib.suppress(Exception):
            child.wait(timeout=10)


def shutdown_cluster(cluster: LocalCluster) -> None:
    """Stop every node of ``cluster``; never raises, never leaves a process."""
    try:
        for node_id in cluster.process_ids:
            cluster.resume_node(node_id)  # a paused node cannot handle SIGTERM
        cluster.stop()
    except Exception as exc:  # still kill below
        print(f"cluster.stop() failed: {exc!r}")
    finally:
        _kill_everything(cluster)


def print_logs(cluster: LocalCluster, lines: int = 40) -> None:
    for node_id in cluster.process_ids:
        path = cluster.node_dir(node_id) / "node.log"
        with contextlib.suppress(OSError):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            if tail:
                print(f"----- {node_id} node.log (last {len(tail)} lines) -----")
                print("\n".join(tail))


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking cluster operation without blocking the trio loop."""
    return await trio.to_thread.run_sync(lambda: fn(*args))


async def wait_leader(cluster: LocalCluster, timeout_s: float = 15.0,
                      exclude: str | None = None, shard: int = SHARD) -> str:
    """The node id of ``shard``'s leader (not ``exclude``), waiting for one."""
    with trio.fail_after(timeout_s):
        while True:
            leaders = await in_thread(cluster.leaders)
            leader = leaders.get(shard)
            if leader is not None and leader != exclude:
                return leader
            await trio.sleep(0.05)


class RawConnection:
    """A raw client connection speaking the wire protocol (4-byte big-endian
    length + cbor body), for tests that need exact control of the bytes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    @classmethod
    async def open(cls, address: str) -> RawConnection:
        host, port = address.rsplit(":", 1)
        return cls(await trio.open_tcp_stream(host, int(port)))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send(self, msg: Any) -> None:
        body = cbor2.dumps(msg)
        await self.stream.send_all(struct.pack(">I", len(body)) + body)

    async def receive(self, timeout_s: float = 10.0) -> Any:
        """The next reply (decoded); raises EOFError if the node closed the connection."""
        with trio.fail_after(timeout_s):
            while True:
                if len(self._buffer) >= 4:
                    (length,) = struct.unpack_from(">I", self._buffer)
                    if len(self._buffer) >= 4 + length:
                        body = bytes(self._buffer[4 : 4 + length])
                        del self._buffer[: 4 + length]
                        return cbor2.loads(body)
                data = await self.stream.receive_some(1 << 20)
                if not data:
                    raise EOFError("connection closed by the node")
                self._buffer += data

    async def request(self, msg: Any, timeout_s: float = 10.0) -> Any:
        await self.send(msg)
        return await self.receive(timeout_s)

    async def expect_closed(self, timeout_s: float = 10.0) -> None:
        """Assert the node closes the connection (after any buffered replies)."""
        with trio.fail_after(timeout_s):
            while True:
                try:
                    data = await self.stream.receive_some(1 << 20)
                except (trio.BrokenResourceError, OSError):
                    return
                if not data:
                    return
                self._buffer += data

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.stream.aclose()

    async def __aenter__(self) -> RawConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def local_values(cluster: LocalCluster, node_id: str, keys: list[bytes],
                       shard: int = SHARD, keyspace: str = "default") -> list[bytes | None]:
    """What ``node_id``'s own replica of ``shard`` holds for ``keys`` (eventual
    reads sent to that node alone)."""
    async with await RawConnection.open(cluster.address(node_id)) as conn:
        values = []
        for i, key in enumerate(keys):
            reply = await conn.request({"id": i, "op": "get", "shard": shard, "key": key,
                                        "ks": keyspace, "cons": "eventual"})
            assert "ok" in reply, reply
            values.append(reply["ok"]["value"])
        return values

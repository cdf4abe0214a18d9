"""Bad input on one connection gets an error reply (or a closed connection)
and never disturbs the node or its other clients."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import cbor2
import pytest
import trio
from integration_support import SHARD, RawConnection, in_thread, wait_leader

from raftkv.client import open_client
from raftkv.localcluster import LocalCluster
from raftkv.protocol.messages import DEFAULT_LIMITS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FRAME_MAX = DEFAULT_LIMITS.frame_bytes_max
assert FRAME_MAX == 8 * 1024 * 1024


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


class Bystander:
    """A well-behaved client doing put/get on the leader throughout the test."""

    def __init__(self) -> None:
        self.ops = 0
        self.failure: BaseException | None = None

    async def run(self, managers: list[str], stop: trio.Event) -> None:
        try:
            async with open_client(managers, retry_budget_s=10.0) as kv:
                n = 0
                while not stop.is_set():
                    key, value = f"bystander-{n % 50}", f"value-{n}".encode()
                    await kv.put(key, value)
                    got = await kv.get(key)
                    assert got == value, (key, got, value)
                    n += 1
                    self.ops += 1
        except BaseException as exc:
            self.failure = exc
            raise


@asynccontextmanager
async def bystander_running(cluster: LocalCluster, node: str) -> AsyncIterator[Bystander]:
    bystander = Bystander()
    stop = trio.Event()
    pid = cluster.pid(node)
    async with trio.open_nursery() as nursery:
        # The cluster's one shard is led by ``node``: the bystander's ops go there.
        nursery.start_soon(bystander.run, cluster.client_addresses(), stop)
        with trio.fail_after(10):
            while bystander.ops < 5:
                await trio.sleep(0.01)
        yield bystander
        before = bystander.ops
        with trio.fail_after(10):  # it still makes progress at the end
            while bystander.ops < before + 5:
                await trio.sleep(0.01)
        stop.set()
    assert bystander.failure is None
    assert cluster.pid(node) == pid, "the node restarted or died"
    status = (await in_thread(cluster.statuses))[node]
    assert status is not None and status["pid"] == pid


def assert_error(reply: Any, code: str, request_id: Any, *, mentions: str | None = None) -> None:
    assert isinstance(reply, dict), reply
    assert set(reply) == {"id", "err"}, reply
    assert reply["id"] == request_id, reply
    assert reply["err"]["code"] == code, reply
    assert reply["err"]["definite"] is True, reply
    if mentions is not None:
        assert mentions in reply["err"]["msg"], reply


async def assert_usable(conn: RawConnection, request_id: int = 4242) -> None:
    reply = await conn.request({"id": request_id, "op": "ping"})
    assert reply["id"] == request_id and "ok" in reply, reply


def put_msg(request_id: int = 1, **overrides: Any) -> dict[str, Any]:
    msg = {"id": request_id, "op": "put", "shard": SHARD, "key": b"k", "value": b"v",
           "cid": os.urandom(16), "seq": 1, "ack": 0}
    msg.update(overrides)
    return msg


async def test_bad_requests_get_error_replies(cluster: LocalCluster) -> None:
    leader = await wait_leader(cluster)
    address = cluster.address(leader)
    before = (await in_thread(cluster.statuses))[leader]
    assert before is not None
    async with bystander_running(cluster, leader) as bystander:
        async with await RawConnection.open(address) as conn:
            # Not cbor at all: no id could be read.
            await conn.send_raw(frame(b"\xff\xfe\xfd garbage"))
            assert_error(await conn.receive(), "BAD_REQUEST", None, mentions="cbor")
            await assert_usable(conn)

            # An empty body, a cbor value that is not a map, a map without a usable id.
            for body in (b"", cbor2.dumps([1, 2, 3]), cbor2.dumps("ping"),
                         cbor2.dumps({"op": "ping"}), cbor2.dumps({"id": -1, "op": "ping"}),
                         cbor2.dumps({"id": "7", "op": "ping"}),
                         cbor2.dumps({"id": True, "op": "ping"})):
                await conn.send_raw(frame(body))
                assert_error(await conn.receive(), "BAD_REQUEST", None)
            await assert_usable(conn)

            # Decoder bombs: deep nesting, huge declared lengths.
            for body in (b"\x81" * 100_000 + b"\x00",
                         b"\x5b" + struct.pack(">Q", 2**62),
                         b"\x9b" + struct.pack(">Q", 2**62),
                         b"\xbb" + struct.pack(">Q", 2**62)):
                await conn.send_raw(frame(body))
                assert_error(await conn.receive(), "BAD_REQUEST", None)
            await assert_usable(conn)

            # Unknown op: the reply carries the request's id.
            reply = await conn.request({"id": 17, "op": "frobnicate"})
            assert_error(reply, "BAD_REQUEST", 17, mentions="frobnicate")
            reply = await conn.request({"id": 18})
            assert_error(reply, "BAD_REQUEST", 18)

            # Wrong field types: the message names the field.
            bad_fields = {
                "seq": put_msg(20, seq="one"),
                "ack": put_msg(21, ack=-1),
                "shard": put_msg(22, shard="zero"),
                "key": put_msg(23, key=12345),
                "value": put_msg(24, value=[b"v"]),
                "cid": put_msg(25, cid=b"short"),
                "ks": put_msg(26, ks=7),
                "ops": {"id": 27, "op": "batch", "shard": SHARD, "ops": "not a list",
                        "cid": os.urandom(16), "seq": 1, "ack": 0},
                "cons": {"id": 28, "op": "get", "shard": SHARD, "key": b"k", "cons": "maybe"},
                "expect": {"id": 29, "op": "cas", "shard": SHARD, "key": b"k", "value": b"v",
                           "cid": os.urandom(16), "seq": 1, "ack": 0},
            }
            for name, msg in bad_fields.items():
                reply = await conn.request(msg)
                assert_error(reply, "BAD_REQUEST", msg["id"], mentions=f"'{name}'")
            reply = await conn.request(put_msg(30, seq=5, ack=5))
            assert_error(reply, "BAD_REQUEST", 30, mentions="'ack'")
            reply = await conn.request(put_msg(31, key=b""))
            assert_error(reply, "BAD_REQUEST", 31, mentions="key")
            reply = await conn.request({"id": 32, "op": "get", "shard": SHARD, "key": b"k",
                                        "ks": "no-such-keyspace"})
            assert_error(reply, "WRONG_SHARD", 32, mentions="no-such-keyspace")
            reply = await conn.request({"id": 33, "op": "get", "shard": 99, "key": b"k"})
            assert_error(reply, "UNKNOWN_SHARD", 33)

            # Over-limit values and keys inside a valid frame: TOO_LARGE, connection kept.
            big = b"x" * (DEFAULT_LIMITS.value_bytes_max + 1)
            reply = await conn.request(put_msg(40, value=big))
            assert_error(reply, "TOO_LARGE", 40)
            reply = await conn.request(put_msg(41, key=b"k" * (DEFAULT_LIMITS.key_bytes_max + 1)))
            assert_error(reply, "TOO_LARGE", 41)
            too_many = [{"op": "delete", "key": b"k%d" % i}
                        for i in range(DEFAULT_LIMITS.batch_ops_max + 1)]
            reply = await conn.request({"id": 42, "op": "batch", "shard": SHARD, "ops": too_many,
                                        "cid": os.urandom(16), "seq": 1, "ack": 0})
            assert_error(reply, "TOO_LARGE", 42)
            await assert_usable(conn)

            # None of the refused writes took effect.
            async with open_client(cluster.client_addresses()) as kv:
                assert await kv.get("k") is None

            # Several requests in one send (and a bad one among them) are all answered.
            burst = b"".join(frame(cbor2.dumps({"id": i, "op": "ping"})) for i in range(100, 150))
            burst += frame(b"\xff") + frame(cbor2.dumps({"id": 150, "op": "ping"}))
            await conn.send_raw(burst)
            replies = [await conn.receive() for _ in range(52)]
            assert sorted(r["id"] for r in replies if "ok" in r) == list(range(100, 151))
            assert [r["id"] for r in replies if "err" in r] == [None]
        assert bystander.failure is None

    # The node's status counts what it was sent and how it answered.
    after = (await in_thread(cluster.statuses))[leader]
    assert after is not None

    def grew(field: str, name: str) -> int:
        return int(after[field].get(name, 0) - before[field].get(name, 0))

    assert grew("errors", "BAD_REQUEST") == 27
    assert grew("errors", "TOO_LARGE") == 3
    assert grew("errors", "UNKNOWN_SHARD") == 1
    assert grew("errors", "WRONG_SHARD") == 1
    # Each BAD_REQUEST and TOO_LARGE above is found while decoding: no request to count.
    assert grew("requests", "undecodable") == 27 + 3
    assert grew("requests", "ping") == 4 + 51
    assert grew("requests", "write") >= 5 and grew("requests", "get") >= 5  # the bystander


async def test_broken_connections_do_not_disturb_the_node(cluster: LocalCluster) -> None:
    leader = await wait_leader(cluster)
    address = cluster.address(leader)
    async with bystander_running(cluster, leader):
        # A header announcing more than the frame limit: TOO_LARGE, then closed.
        async with await RawConnection.open(address) as conn:
            await conn.send_raw(struct.pack(">I", FRAME_MAX + 1) + b"\x00" * 100)
            assert_error(await conn.receive(), "TOO_LARGE", None)
            await conn.expect_closed()

        async with await RawConnection.open(address) as conn:
            await conn.send_raw(struct.pack(">I", 0xFFFFFFFF))
            assert_error(await conn.receive(), "TOO_LARGE", None)
            await conn.expect_closed()

        # A valid request before the oversized header is still answered.
        async with await RawConnection.open(address) as conn:
            await conn.send_raw(frame(cbor2.dumps({"id": 1, "op": "ping"}))
                                + struct.pack(">I", FRAME_MAX + 1))
            replies = [await conn.receive(), await conn.receive()]
            assert {"id": 1, "ok": {"node": leader}} in replies, replies
            assert any("err" in r and r["err"]["code"] == "TOO_LARGE" for r in replies)
            await conn.expect_closed()

        # Exactly at the frame limit is allowed (the value inside is over its own limit).
        async with await RawConnection.open(address) as conn:
            base = 100_000  # same cbor length header as the final value
            padding = FRAME_MAX - len(cbor2.dumps(put_msg(2, value=b"x" * base)))
            body = cbor2.dumps(put_msg(2, value=b"x" * (base + padding)))
            assert len(body) == FRAME_MAX
            await conn.send_raw(frame(body))
            assert_error(await conn.receive(timeout_s=30), "TOO_LARGE", 2, mentions="value")
            await assert_usable(conn)

        # Half a header, half a body, then gone; and a request whose reply is
        # never read because the client disconnects at once.
        for data in (b"\x00\x00",
                     struct.pack(">I", 100) + b"\x00" * 10,
                     struct.pack(">I", FRAME_MAX) + b"\x01" * 1000,
                     frame(cbor2.dumps({"id": 3, "op": "get", "shard": SHARD, "key": b"k"}))):
            conn = await RawConnection.open(address)
            await conn.send_raw(data)
            await conn.aclose()

        # A connection reset (RST) mid-frame.
        host, port = address.rsplit(":", 1)
        raw = socket.create_connection((host, int(port)))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.sendall(struct.pack(">I", 50) + b"\x00" * 5)
        raw.close()

        # A client that sends many requests and closes without reading the
        # replies: the node's sends fail (reset / broken pipe).
        raw = socket.create_connection((host, int(port)))
        raw.sendall(b"".join(frame(cbor2.dumps({"id": i, "op": "status"})) for i in range(500)))
        raw.close()
        await trio.sleep(0.3)

        # A client that pipelines many requests and reads the replies late.
        async with await RawConnection.open(address) as conn:
            count = 3000
            await conn.send_raw(b"".join(
                frame(cbor2.dumps({"id": i, "op": "status"})) for i in range(count)))
            await trio.sleep(0.5)
            seen = set()
            for _ in range(count):
                reply = await conn.receive()
                assert "ok" in reply, reply
                seen.add(reply["id"])
            assert seen == set(range(count))

        # Many connections opened and dropped.
        for _ in range(50):
            conn = await RawConnection.open(address)
            await conn.aclose()

        # After all that, a fresh connection works.
        async with await RawConnection.open(address) as conn:
            await assert_usable(conn)

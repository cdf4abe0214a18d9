"""Single-client round trips through the SDK against a real 3-node cluster."""

from __future__ import annotations

import pytest
import trio
from integration_support import SHARD, RawConnection, wait_leader

from raftkv.client import open_client
from raftkv.errors import BadRequest, PreconditionFailed, TooLarge, UnknownKeyspace
from raftkv.localcluster import LocalCluster
from raftkv.protocol.messages import DEFAULT_LIMITS, CasOp, DeleteOp, PutOp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def cluster(shared_cluster: LocalCluster) -> LocalCluster:
    """One cluster for this module: its tests stop nothing, and each uses keys
    no other test here writes."""
    return shared_cluster


async def test_put_get_delete_round_trip(cluster: LocalCluster) -> None:
    async with open_client(cluster.client_addresses()) as kv:
        assert await kv.get("missing") is None
        first = await kv.put("k", "v1")
        assert first.results == [None]
        assert await kv.get("k") == b"v1"
        second = await kv.put("k", "v2")
        assert second.index > first.index
        assert await kv.get("k") == b"v2"
        assert await kv.get("k", consistency="eventual") in (b"v1", b"v2")

        assert await kv.delete("k") is True
        assert await kv.get("k") is None
        assert await kv.delete("k") is False
        assert await kv.get("k") is None
        # str and bytes name the same key
        await kv.put(b"k", b"bytes")
        assert await kv.get("k") == b"bytes"


async def test_cas(cluster: LocalCluster) -> None:
    async with open_client(cluster.client_addresses()) as kv:
        result = await kv.cas("c", None, "1")
        assert result.results == [True]
        assert await kv.get("c") == b"1"

        with pytest.raises(PreconditionFailed) as info:
            await kv.cas("c", None, "other")
        assert info.value.definite
        assert info.value.details["current"] == b"1"
        assert await kv.get("c") == b"1"

        with pytest.raises(PreconditionFailed) as info:
            await kv.cas("c", "0", "2")
        assert info.value.details["current"] == b"1"

        await kv.cas("c", "1", "2")
        assert await kv.get("c") == b"2"

        await kv.delete("c")
        with pytest.raises(PreconditionFailed) as info:
            await kv.cas("c", "2", "3")
        assert info.value.details["current"] is None
        assert await kv.get("c") is None


async def test_batch_applies_all_ops(cluster: LocalCluster) -> None:
    async with open_client(cluster.client_addresses()) as kv:
        await kv.put("{t}b-del", "x")
        await kv.put("{t}b-cas", "old")
        result = await kv.batch([
            PutOp(b"{t}b-put", b"p"),
            DeleteOp(b"{t}b-del"),
            CasOp(b"{t}b-cas", b"old", b"new"),
            CasOp(b"{t}b-new", None, b"created"),
            DeleteOp(b"{t}b-never"),
        ])
        assert result.results == [None, True, True, True, False]
        assert await kv.get("{t}b-put") == b"p"
        assert await kv.get("{t}b-del") is None
        assert await kv.get("{t}b-cas") == b"new"
        assert await kv.get("{t}b-new") == b"created"

        # Later ops of a batch see the effects of earlier ones.
        result = await kv.batch(
            [PutOp(b"{t}seq", b"1"), DeleteOp(b"{t}seq"), PutOp(b"{t}seq2", b"2")])
        assert result.results == [None, True, None]
        assert await kv.get("{t}seq") is None
        assert await kv.get("{t}seq2") == b"2"


async def test_batch_with_failing_cas_changes_nothing(cluster: LocalCluster) -> None:
    async with open_client(cluster.client_addresses()) as kv:
        await kv.put("{t}a", "a0")
        await kv.put("{t}guard", "g0")
        with pytest.raises(PreconditionFailed) as info:
            await kv.batch([
                PutOp(b"{t}a", b"a1"),
                DeleteOp(b"{t}guard-delete-me"),
                PutOp(b"{t}fresh", b"f"),
                CasOp(b"{t}guard", b"wrong", b"g1"),
                PutOp(b"{t}after", b"x"),
            ])
        assert info.value.details["op"] == 3
        assert info.value.details["current"] == b"g0"
        assert await kv.get("{t}a") == b"a0"
        assert await kv.get("{t}fresh") is None
        assert await kv.get("{t}after") is None
        assert await kv.get("{t}guard") == b"g0"
        # The failed batch did not burn the client: the next write works.
        await kv.batch([PutOp(b"{t}a", b"a2"), CasOp(b"{t}guard", b"g0", b"g2")])
        assert await kv.get("{t}a") == b"a2"
        assert await kv.get("{t}guard") == b"g2"


async def test_a_batch_across_logical_shards_is_refused(cluster: LocalCluster) -> None:
    """A batch is atomic within one logical shard (the unit that moves between
    groups); keys without a shared hash tag are refused before anything happens."""
    async with open_client(cluster.client_addresses()) as kv:
        smap = await kv.shard_map()
        assert smap.logical_shard("default", b"x1") != smap.logical_shard("default", b"x2")
        with pytest.raises(BadRequest, match="hash tag"):
            await kv.batch([PutOp(b"x1", b"1"), PutOp(b"x2", b"2")])
        assert await kv.get("x1") is None
    async with await RawConnection.open(cluster.address(await wait_leader(cluster))) as conn:
        reply = await conn.request({"id": 1, "op": "batch", "shard": SHARD, "cid": b"c" * 16,
                                    "seq": 1, "ack": 0, "ops": [
                                        {"op": "put", "key": b"x1", "value": b"1"},
                                        {"op": "put", "key": b"x2", "value": b"2"}]})
        assert reply["err"]["code"] == "BAD_REQUEST", reply
        assert "hash tag" in reply["err"]["msg"]


async def test_binary_keys_and_values(cluster: LocalCluster) -> None:
    pairs = {
        b"\xff\xfe\x00\x01": bytes(range(256)),
        b"\x00": b"\x00\x00",
        b"\xc3\x28 not utf8": b"\x80\x81\xfe\xff",
        "caf\u00e9".encode(): "\u00fcber \U0001f600".encode(),
        b"empty-value": b"",
    }
    async with open_client(cluster.client_addresses()) as kv:
        for key, value in pairs.items():
            await kv.put(key, value)
        for key, value in pairs.items():
            got = await kv.get(key)
            assert got == value, key
            assert type(got) is bytes
        # a key differing only in a non-UTF-8 byte is a different key
        assert await kv.get(b"\xff\xfe\x00\x02") is None
        with pytest.raises(PreconditionFailed):
            await kv.cas(b"\x00", b"\x00", b"z")
        await kv.cas(b"\x00", b"\x00\x00", b"\xff")
        assert await kv.get(b"\x00") == b"\xff"
    # A fresh client (another connection, another client id) sees the same.
    async with open_client(cluster.client_addresses()) as kv:
        assert await kv.get(b"\xff\xfe\x00\x01") == bytes(range(256))
        assert await kv.get(b"empty-value") == b""


async def test_value_size_limit(cluster: LocalCluster) -> None:
    limit = DEFAULT_LIMITS.value_bytes_max
    assert limit == 1024 * 1024
    big = bytes(i % 251 for i in range(limit))
    async with open_client(cluster.client_addresses()) as kv:
        await kv.put("big", big)
        assert await kv.get("big") == big

        started = trio.current_time()
        with pytest.raises(TooLarge) as info:
            await kv.put("too-big", big + b"x")
        assert info.value.definite
        # A definite refusal is not retried for the whole retry budget.
        assert trio.current_time() - started < 5.0
        assert await kv.get("too-big") is None

        with pytest.raises(TooLarge):
            await kv.cas("big", big, big + b"y")
        assert await kv.get("big") == big

        key_limit = DEFAULT_LIMITS.key_bytes_max
        await kv.put(b"k" * key_limit, b"ok")
        assert await kv.get(b"k" * key_limit) == b"ok"
        with pytest.raises(TooLarge):
            await kv.put(b"k" * (key_limit + 1), b"v")


async def test_unknown_keyspace_is_refused(cluster: LocalCluster) -> None:
    async with open_client(cluster.client_addresses(), keyspace="no-such-keyspace") as kv:
        with pytest.raises(UnknownKeyspace) as info:
            await kv.put("k-of-no-keyspace", "v")
        assert info.value.definite
        assert "no-such-keyspace" in info.value.message
        with pytest.raises(UnknownKeyspace):
            await kv.get("k-of-no-keyspace")
        with pytest.raises(UnknownKeyspace):
            await kv.cas("k-of-no-keyspace", None, "v")
    async with open_client(cluster.client_addresses()) as kv:
        assert await kv.get("k-of-no-keyspace") is None


async def test_status_counts_strong_reads_and_their_rounds(cluster: LocalCluster) -> None:
    def totals() -> tuple[int, int]:
        shards = [shard for status in cluster.statuses(timeout_s=5.0).values() if status
                  for shard in status.get("shards", [])]
        return (sum(s["reads_served"] for s in shards), sum(s["read_rounds"] for s in shards))

    served_before, rounds_before = await trio.to_thread.run_sync(totals)
    async with open_client(cluster.client_addresses()) as kv:
        await kv.put("status-reads", "v")
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(kv.get, "status-reads")
    served, rounds = await trio.to_thread.run_sync(totals)
    assert served - served_before >= 20
    assert 1 <= rounds - rounds_before <= served - served_before

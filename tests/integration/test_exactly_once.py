"""Retries with the same (client id, seq) take effect once, also across a
leader change. Uses the raw wire protocol to control cid and seq exactly."""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio
from integration_support import SHARD, RawConnection, in_thread, wait_leader

from raftkv.client import open_client
from raftkv.localcluster import LocalCluster

pytestmark = pytest.mark.integration


def write(op: str, key: bytes, cid: bytes, seq: int, ack: int = 0, **fields: Any) -> dict:
    return {"id": seq, "op": op, "shard": SHARD, "key": key, "cid": cid, "seq": seq, "ack": ack,
            **fields}


async def leader_request(cluster: LocalCluster, msg: dict, exclude: str | None = None,
                         timeout_s: float = 20.0) -> tuple[str, dict]:
    """Send ``msg`` to the current leader until a node answers other than
    NOT_LEADER / UNAVAILABLE; returns (node id, reply)."""
    with trio.fail_after(timeout_s):
        while True:
            leader = await wait_leader(cluster, exclude=exclude)
            try:
                async with await RawConnection.open(cluster.address(leader)) as conn:
                    reply = await conn.request(dict(msg))
            except (OSError, EOFError, trio.BrokenResourceError):
                await trio.sleep(0.1)
                continue
            err = reply.get("err")
            if err is not None and err["code"] in ("NOT_LEADER", "UNAVAILABLE"):
                await trio.sleep(0.1)
                continue
            return leader, reply


async def read(cluster: LocalCluster, key: bytes) -> bytes | None:
    async with open_client(cluster.client_addresses()) as kv:
        return await kv.get(key)


@pytest.mark.timeout(60)
async def test_retried_put_and_cas_apply_once(cluster: LocalCluster) -> None:
    leader = await wait_leader(cluster)
    cid = os.urandom(16)
    async with await RawConnection.open(cluster.address(leader)) as conn:
        first = await conn.request(write("put", b"{t}p", cid, 1, value=b"v1"))
        assert "ok" in first, first
        again = await conn.request(write("put", b"{t}p", cid, 1, value=b"v1"))
        assert again == first

        # A later write by the same client, then a late retry of seq 1: the
        # retry answers the stored result and does not overwrite the newer value.
        later = await conn.request(write("put", b"{t}p", cid, 2, value=b"v2"))
        assert later["ok"]["index"] > first["ok"]["index"]
        late_retry = await conn.request(write("put", b"{t}p", cid, 1, value=b"v1"))
        assert late_retry == first
        assert await read(cluster, b"{t}p") == b"v2"

        # cas increments: counter 0 -> 1 with seq 3, retried twice.
        created = await conn.request(write("cas", b"{t}counter", cid, 3, expect=None, value=b"0"))
        assert created["ok"]["results"] == [True], created
        incr = write("cas", b"{t}counter", cid, 4, expect=b"0", value=b"1")
        incr_reply = await conn.request(dict(incr))
        assert incr_reply["ok"]["results"] == [True], incr_reply
        for _ in range(2):
            assert await conn.request(dict(incr)) == incr_reply  # same index, same success
        assert await read(cluster, b"{t}counter") == b"1"

        # A retried batch with puts and a cas applies once.
        batch = {"id": 5, "op": "batch", "shard": SHARD, "cid": cid, "seq": 5, "ack": 0, "ops": [
            {"op": "cas", "key": b"{t}counter", "expect": b"1", "value": b"2"},
            {"op": "put", "key": b"{t}p", "value": b"from-batch"},
        ]}
        batch_reply = await conn.request(dict(batch))
        assert batch_reply["ok"]["results"] == [True, None], batch_reply
        await conn.request(write("put", b"{t}p", cid, 6, value=b"after-batch"))
        assert await conn.request(dict(batch)) == batch_reply
        assert await read(cluster, b"{t}counter") == b"2"
        assert await read(cluster, b"{t}p") == b"after-batch"

        # A cas that failed its precondition: the retry fails the same way and
        # still changes nothing.
        failing = write("cas", b"{t}counter", cid, 7, expect=b"0", value=b"100")
        fail_reply = await conn.request(dict(failing))
        assert fail_reply["err"]["code"] == "PRECONDITION_FAILED", fail_reply
        assert fail_reply["err"]["current"] == b"2"
        await conn.request(write("put", b"{t}counter", cid, 8, value=b"0"))
        retry = await conn.request(dict(failing))
        assert retry["err"]["code"] == "PRECONDITION_FAILED", retry
        assert retry["err"]["index"] == fail_reply["err"]["index"]
        assert await read(cluster, b"{t}counter") == b"0"

        # Another client with the same seq numbers is independent.
        other = os.urandom(16)
        other_reply = await conn.request(write("put", b"q", other, 1, value=b"other"))
        assert other_reply["ok"]["index"] > first["ok"]["index"]
        assert await read(cluster, b"q") == b"other"


@pytest.mark.timeout(60)
async def test_acked_seqs_are_forgotten(cluster: LocalCluster) -> None:
    """Once a client acks a seq, a retry of it is refused as OUTCOME_UNKNOWN
    (indefinite) and does not apply again."""
    leader = await wait_leader(cluster)
    cid = os.urandom(16)
    async with await RawConnection.open(cluster.address(leader)) as conn:
        first = await conn.request(write("put", b"f", cid, 1, value=b"one"))
        assert "ok" in first
        second = await conn.request(write("put", b"f", cid, 2, ack=1, value=b"two"))
        assert "ok" in second
        stale = await conn.request(write("put", b"f", cid, 1, value=b"one"))
        assert stale["err"]["code"] == "OUTCOME_UNKNOWN", stale
        assert stale["err"]["definite"] is False
        assert await read(cluster, b"f") == b"two"
        # seq 2 itself is still remembered (ack 1 only covers seq 1).
        assert await conn.request(write("put", b"f", cid, 2, ack=1, value=b"two")) == second


async def increment_across_failover(cluster: LocalCluster, read_reply_first: bool) -> None:
    cid = os.urandom(16)
    _, created = await leader_request(
        cluster, write("cas", b"ctr", cid, 1, expect=None, value=b"41"))
    assert created["ok"]["results"] == [True], created

    leader = await wait_leader(cluster)
    incr = write("cas", b"ctr", cid, 2, ack=1, expect=b"41", value=b"42")
    conn = await RawConnection.open(cluster.address(leader))
    try:
        await conn.send(dict(incr))
        if read_reply_first:
            first = await conn.receive()
            assert first["ok"]["results"] == [True], first
        else:
            # Kill as soon as the leader has the entry in its log, before the
            # reply is read: the outcome of the first attempt is unknown.
            first = None
    finally:
        await in_thread(cluster.kill_node, leader)
        await conn.aclose()

    new_leader, retried = await leader_request(cluster, dict(incr), exclude=leader)
    assert new_leader != leader
    assert "ok" in retried, (
        f"a retry of an increment answered {retried}: if PRECONDITION_FAILED, the "
        "first attempt applied and its dedup record was lost in the failover")
    assert retried["ok"]["results"] == [True]
    if first is not None:
        assert retried == first  # the stored result, same index

    # A second retry at the new leader changes nothing either.
    _, again = await leader_request(cluster, dict(incr), exclude=leader)
    assert again == retried

    await in_thread(cluster.start_node, leader)
    await in_thread(cluster.wait_ready)
    assert await read(cluster, b"ctr") == b"42"
    # The restarted old leader replays its log; a retry there (if it leads
    # again) must still be deduplicated.
    _, final = await leader_request(cluster, dict(incr))
    assert final == retried
    assert await read(cluster, b"ctr") == b"42"


@pytest.mark.timeout(60)
async def test_retry_after_failover_reply_seen(cluster: LocalCluster) -> None:
    await increment_across_failover(cluster, read_reply_first=True)


@pytest.mark.timeout(60)
async def test_retry_after_failover_reply_lost(cluster: LocalCluster) -> None:
    await increment_across_failover(cluster, read_reply_first=False)

"""A follower that fell behind the leader's compacted log catches up by snapshot."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from integration_support import in_thread, local_values, wait_leader

from raftkv.client import open_client
from raftkv.localcluster import LocalCluster
from raftkv.protocol.messages import PutOp
from raftkv.replication.replica import RaftSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

COMPACT_AFTER = 50
BATCHES = 120
BATCH_SIZE = 5


def shard0(status: dict[str, Any] | None) -> dict[str, Any] | None:
    """The node's replica of the one shard (None until the node has opened it)."""
    shards = [] if status is None else status["shards"]
    return shards[0] if shards else None


async def wait_for(cluster: LocalCluster, node_id: str, check: Any, what: str,
                   timeout_s: float = 40.0) -> dict[str, Any]:
    last = None
    started = trio.current_time()
    try:
        with trio.fail_after(timeout_s):
            while True:
                last = shard0((await in_thread(cluster.statuses)).get(node_id))
                if last is not None and check(last):
                    print(f"{node_id}: {what} after {trio.current_time() - started:.2f} s")
                    return last
                await trio.sleep(0.1)
    except trio.TooSlowError:
        pytest.fail(f"{node_id}: {what} not reached in {timeout_s} s; last status {last}")


async def test_lagging_follower_catches_up_by_snapshot(make_cluster: Any) -> None:
    settings = RaftSettings(log_compaction_entries_min=COMPACT_AFTER)
    cluster: LocalCluster = make_cluster(raft=settings)
    leader = await wait_leader(cluster)
    follower, other = [n for n in cluster.node_ids if n != leader]

    expected: dict[bytes, bytes] = {}
    async with open_client(cluster.client_addresses()) as kv:
        await kv.put("early", "before the follower stopped")
        expected[b"early"] = b"before the follower stopped"
        await in_thread(cluster.stop_node, follower)
        stopped_at = shard0((await in_thread(cluster.statuses))[leader])["commit_index"]

        for b in range(BATCHES):
            ops = []
            for i in range(BATCH_SIZE):
                key, value = f"{{t{b}}}k{b}-{i}".encode(), f"v{b}-{i}".encode() * 10
                ops.append(PutOp(key, value))
                expected[key] = value
            await kv.batch(ops)
        # Overwrites and deletes must reach the follower too.
        await kv.put("{t0}k0-0", "overwritten")
        expected[b"{t0}k0-0"] = b"overwritten"
        assert await kv.delete("{t0}k0-1")
        deleted = b"{t0}k0-1"
        del expected[deleted]

    # Leadership may have moved meanwhile; take the leader's view now.
    leader = await wait_leader(cluster, exclude=follower)
    leader_status = await wait_for(
        cluster, leader, lambda s: s["snapshots_written"] >= 1, "a snapshot on the leader")
    commit = leader_status["commit_index"]
    assert commit > stopped_at + COMPACT_AFTER
    # The leader's log no longer reaches back to where the follower stopped.
    assert leader_status["journal_entries"] < commit - stopped_at, leader_status

    await in_thread(cluster.start_node, follower)
    caught_up = await wait_for(
        cluster, follower, lambda s: s["applied_index"] >= commit, "catch-up")
    assert caught_up["snapshots_installed"] >= 1, caught_up

    keys = [*expected, deleted]
    assert await local_values(cluster, follower, keys) == [*expected.values(), None]

    # The installed snapshot survives a crash of the follower.
    await in_thread(cluster.kill_node, follower)
    await in_thread(cluster.start_node, follower)
    await wait_for(cluster, follower, lambda s: s["applied_index"] >= commit, "recovery")
    keys = [*expected, deleted]
    assert await local_values(cluster, follower, keys) == [*expected.values(), None]

    # And the cluster still works with the other follower down: the restored
    # follower is now needed for a majority.
    await in_thread(cluster.stop_node, other)
    async with open_client(cluster.client_addresses()) as kv:
        await kv.put("after", "snapshot")
        for key, value in expected.items():
            assert await kv.get(key) == value, key
        assert await kv.get("after") == b"snapshot"

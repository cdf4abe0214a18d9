"""``request_leader``, the way the resharding workers and the shard manager
reach a group's leader: with a cache of leaders, a group's first request
finds the leader (through NOT_LEADER hints) and the next ones go straight to
it. A real local cluster: 3 nodes, one physical shard."""

from __future__ import annotations

import pytest
import trio
from integration_support import SHARD, in_thread, wait_leader

from raftkv.client.client import ConnectionPool, request_leader
from raftkv.localcluster import LocalCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def not_leader_replies(cluster: LocalCluster) -> int:
    statuses = await in_thread(cluster.statuses)
    return sum(int(s["errors"].get("NOT_LEADER", 0)) for s in statuses.values() if s)


async def test_requests_go_straight_to_the_leader_once_it_answered(
        cluster: LocalCluster) -> None:
    leader = await wait_leader(cluster)
    leader_address = cluster.address(leader)
    followers_first = [cluster.address(n) for n in cluster.node_ids if n != leader]
    followers_first.append(leader_address)
    get = {"op": "get", "shard": SHARD, "key": b"k"}
    async with trio.open_nursery() as nursery:
        pool = ConnectionPool(nursery)
        leaders: dict[int, str] = {}
        refused = await not_leader_replies(cluster)
        await request_leader(pool, followers_first, dict(get), 5.0, leaders=leaders)
        assert leaders == {SHARD: leader_address}
        assert await not_leader_replies(cluster) == refused + 1  # the first follower's hint

        refused += 1
        for _ in range(20):
            await request_leader(pool, followers_first, dict(get), 5.0, leaders=leaders)
        assert await not_leader_replies(cluster) == refused

        # Without the cache, every request starts at the first follower.
        for _ in range(5):
            await request_leader(pool, followers_first, dict(get), 5.0)
        assert await not_leader_replies(cluster) == refused + 5

        # A cached address that is no longer one of the group's replicas is
        # not tried (here a listener that would see the connection), and the
        # one that answers replaces it.
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        accepted: list[trio.SocketStream] = []

        async def accept() -> None:
            while True:
                accepted.append(await listener.accept())

        nursery.start_soon(accept)
        leaders[SHARD] = f"127.0.0.1:{listener.socket.getsockname()[1]}"
        await request_leader(pool, followers_first, dict(get), 1.0, leaders=leaders)
        assert leaders == {SHARD: leader_address}
        assert accepted == []
        nursery.cancel_scope.cancel()
    await listener.aclose()


async def test_a_cached_leader_that_died_is_passed_over_for_the_new_one(
        cluster: LocalCluster) -> None:
    """The cached leader is killed: the next request fails there at once
    (connection refused), goes on to the other replicas, finds the new
    leader and caches it."""
    old = await wait_leader(cluster)
    addresses = [cluster.address(n) for n in cluster.node_ids]
    get = {"op": "get", "shard": SHARD, "key": b"k"}
    async with trio.open_nursery() as nursery:
        pool = ConnectionPool(nursery)
        leaders: dict[int, str] = {}
        await request_leader(pool, addresses, dict(get), 5.0, leaders=leaders)
        assert leaders == {SHARD: cluster.address(old)}
        await in_thread(cluster.kill_node, old)
        new = await wait_leader(cluster, exclude=old, timeout_s=20.0)
        with trio.fail_after(10):
            await request_leader(pool, addresses, dict(get), 5.0, leaders=leaders)
        assert leaders == {SHARD: cluster.address(new)}
        nursery.cancel_scope.cancel()

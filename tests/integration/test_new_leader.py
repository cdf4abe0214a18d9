"""A leader just elected has not applied everything that was committed
before it: it learns the commit index only when an entry of its own term
commits. Requests it serves in that time must still see those entries.

Made deterministic with the simulated network: a 400 ms one-way latency
between data centers means a follower learns that an entry committed at
least 400 ms after the leader did. The leader is killed right after it
applied the new keyspace's first entry (its record), so both followers hold
that entry but do not know it committed. The one elected next then needs a
round trip of 800 ms to commit its first entry, and requests reach it inside
that window."""

from __future__ import annotations

import os

import pytest
import trio
from conftest import ClusterFactory
from integration_support import in_thread, wait_leader

from raftkv.client.client import ConnectionPool
from raftkv.errors import RaftKVError, WrongShard
from raftkv.faults import FaultSpec
from raftkv.replication.settings import RaftSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LATENCY_MS = 400.0
# Elections well above the 800 ms round trip, a leader's fallback too.
SLOW_NETWORK = RaftSettings(election_timeout_s_min=2.5, election_timeout_s_max=3.5,
                            leader_fallback_timeout_s=4.0, connection_timeout_s=4.0)


async def test_a_new_leader_serves_a_keyspace_whose_record_it_has_not_applied(
        make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(raft=SLOW_NETWORK, dcs=3, nodes_per_dc=1, physical_shards=1)
    await in_thread(cluster.set_fault_spec, FaultSpec(inter_dc_latency_ms=LATENCY_MS))
    created = await in_thread(cluster.manager, {"op": "ks_create", "name": "late",
                                                "physical_shards": 1}, 60.0)
    [shard] = created["physical_shards"]
    get = {"op": "get", "shard": shard, "ks": "late", "key": b"k"}
    async with trio.open_nursery() as nursery:
        pool = ConnectionPool(nursery)
        old = await wait_leader(cluster, shard=shard, timeout_s=60.0)
        # The keyspace's record is applied on its leader the moment it answers
        # this (an eventual read, served from its own state): kill it then.
        with trio.fail_after(60):
            while True:
                try:
                    await pool.request(cluster.address(old), {**get, "cons": "eventual"}, 5.0)
                    break
                except WrongShard:
                    await trio.sleep(0.005)
        await in_thread(cluster.kill_node, old)
        new = await wait_leader(cluster, shard=shard, exclude=old, timeout_s=30.0)
        address = cluster.address(new)
        # The window this test is about: the new leader's own state lacks the
        # record (an eventual read says so), though the record is committed.
        with pytest.raises(WrongShard):
            await pool.request(address, {**get, "cons": "eventual"}, 5.0)

        put = {"op": "put", "shard": shard, "ks": "late", "key": b"k", "value": b"v",
               "cid": os.urandom(16), "seq": 1, "ack": 0}
        results: dict[str, object] = {}

        async def call(name: str, msg: dict[str, object]) -> None:
            try:
                results[name] = await pool.request(address, msg, 10.0)
            except RaftKVError as exc:
                results[name] = exc

        async with trio.open_nursery() as calls:
            calls.start_soon(call, "get", get)
            calls.start_soon(call, "put", put)
        assert not any(isinstance(r, RaftKVError) for r in results.values()), results
        reply = await pool.request(address, get, 10.0)
        assert reply["value"] == b"v", reply
        nursery.cancel_scope.cancel()

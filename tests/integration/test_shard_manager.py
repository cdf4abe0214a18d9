"""The shard manager and many physical shards, with real processes: 3 data
centers, keyspaces, routing by the map, and failures of whole data centers and
of the shard manager's leader."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
from conftest import ClusterFactory
from integration_support import RawConnection, in_thread, local_values

from raftkv.client import open_client
from raftkv.client.client import AsyncClient
from raftkv.client.shardmap import ShardMap
from raftkv.errors import RaftKVError
from raftkv.localcluster import LocalCluster
from raftkv.protocol.messages import PutOp

pytestmark = [pytest.mark.integration]

KEYS = 10_000


async def write_all(kv: AsyncClient, pairs: dict[bytes, bytes], concurrency: int = 32) -> None:
    """Puts grouped into batches by logical shard, many batches in flight."""
    by_shard: dict[int, list[tuple[bytes, bytes]]] = {}
    for key, value in pairs.items():
        by_shard.setdefault(await kv.logical_shard(key), []).append((key, value))
    limiter = trio.CapacityLimiter(concurrency)

    async def send(batch: list[tuple[bytes, bytes]]) -> None:
        async with limiter:
            await kv.batch([PutOp(k, v) for k, v in batch])

    async with trio.open_nursery() as nursery:
        for group in by_shard.values():
            for i in range(0, len(group), 100):
                nursery.start_soon(send, group[i:i + 100])


async def read_all(kv: AsyncClient, keys: list[bytes], concurrency: int = 64) -> dict[bytes, Any]:
    out: dict[bytes, Any] = {}
    limiter = trio.CapacityLimiter(concurrency)

    async def get(key: bytes) -> None:
        async with limiter:
            out[key] = await kv.get(key)

    async with trio.open_nursery() as nursery:
        for key in keys:
            nursery.start_soon(get, key)
    return out


async def shard_statuses(cluster: LocalCluster) -> dict[str, dict[int, dict[str, Any]]]:
    """node -> shard id -> that node's replica status."""
    statuses = await in_thread(cluster.statuses)
    return {n: {s["id"]: s for s in (st or {}).get("shards", [])}
            for n, st in statuses.items() if n in cluster.node_ids}


@pytest.mark.timeout(240)
async def test_eight_shards_over_three_dcs_survive_losing_a_dc(
        make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(dcs=3, nodes_per_dc=2, physical_shards=8)
    state = (await in_thread(cluster.manager, {"op": "cluster"}))["state"]
    assert len(state["shards"]) == 8
    dc_of = {n.id: n.dc for n in cluster.config.nodes}
    for shard in state["shards"]:
        nodes = [r["node"] for r in shard["replicas"]]
        assert len(set(nodes)) == 3 and len({dc_of[n] for n in nodes}) == 3, shard

    # The controller moves leadership (Raft leadership transfer) until every
    # node leads 1 or 2 of the 8 shards.
    await wait_leaders_balanced(cluster, per_node_max=2)

    pairs = {f"key-{i}".encode(): f"value-{i}".encode() * 5 for i in range(KEYS)}
    async with open_client(cluster.client_addresses(), retry_budget_s=60.0) as kv:
        await write_all(kv, pairs)
        statuses = await shard_statuses(cluster)
        leaders = await in_thread(cluster.leaders)
        keys_per_shard = {s: statuses[n][s]["keys"] for s, n in leaders.items()}
        assert sum(keys_per_shard.values()) == KEYS, keys_per_shard
        assert all(count > KEYS // 16 for count in keys_per_shard.values()), keys_per_shard
        assert await read_all(kv, list(pairs)) == pairs

        # kill -9 both nodes of one data center: every shard loses one replica.
        victims = [n.id for n in cluster.config.nodes if n.dc == "dc1"]
        for node_id in victims:
            await in_thread(cluster.kill_node, node_id)
        sample = random.Random(7).sample(sorted(pairs), 2000)
        assert await read_all(kv, sample) == {k: pairs[k] for k in sample}
        more = {f"after-{i}".encode(): b"written without dc1" for i in range(1000)}
        await write_all(kv, more)
        pairs.update(more)
        assert await read_all(kv, list(more)) == more

        # They come back and catch up: their replicas hold every key.
        for node_id in victims:
            await in_thread(cluster.start_node, node_id)
        await in_thread(cluster.wait_ready, 60.0)
        with trio.fail_after(60):
            while True:
                statuses = await shard_statuses(cluster)
                leaders = await in_thread(cluster.leaders)
                behind = [(n, s) for n in victims for s, r in statuses[n].items()
                          if s not in leaders
                          or r["applied_index"] < statuses[leaders[s]][s]["commit_index"]]
                if not behind and all(statuses[n] for n in victims):
                    break
                await trio.sleep(0.2)
        smap = await kv.shard_map()
        for node_id in victims:
            for shard_id in statuses[node_id]:
                mine = [k for k in sorted(more) if smap.route("default", k).shard == shard_id]
                assert mine, shard_id
                assert await local_values(cluster, node_id, mine, shard=shard_id) == [
                    more[k] for k in mine]
        assert await read_all(kv, list(pairs)) == pairs
    # Leadership spreads back onto the restarted nodes.
    await wait_leaders_balanced(cluster, per_node_max=2)


async def wait_leaders_balanced(cluster: LocalCluster, per_node_max: int,
                                timeout_s: float = 30.0) -> None:
    with trio.fail_after(timeout_s):
        while True:
            leaders = await in_thread(cluster.leaders)
            counts = [list(leaders.values()).count(n) for n in cluster.node_ids]
            if max(counts) <= per_node_max and min(counts) >= 1:
                return
            await trio.sleep(0.5)


@pytest.mark.timeout(180)
async def test_clients_keep_working_while_the_shard_manager_leader_dies(
        make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(dcs=3, nodes_per_dc=1, physical_shards=2)
    errors: list[RaftKVError] = []
    acked: dict[bytes, bytes] = {}
    writes = [0]  # acknowledged puts (keys repeat: len(acked) stops growing at 800)
    stop = trio.Event()

    async def worker(kv: AsyncClient, w: int) -> None:
        i = 0
        while not stop.is_set():
            key, value = f"w{w}-{i % 100}".encode(), f"{i}".encode()
            try:
                await kv.put(key, value)
                acked[key] = value
                writes[0] += 1
                assert await kv.get(key) == value
            except RaftKVError as exc:
                errors.append(exc)
            i += 1

    async with open_client(cluster.client_addresses()) as kv:
        async with trio.open_nursery() as nursery:
            for w in range(8):
                nursery.start_soon(worker, kv, w)
            await trio.sleep(1.0)
            old = await in_thread(cluster.manager_leader)
            assert old is not None
            before = writes[0]
            await in_thread(cluster.kill_node, old)
            with trio.fail_after(30):
                while (new := await in_thread(cluster.manager_leader)) in (None, old):
                    await trio.sleep(0.05)
            # At once, the new leader serves the manager's API: it waits for the
            # nodes' heartbeats before it judges which are alive and places a
            # new keyspace.
            created = await in_thread(cluster.manager, {"op": "ks_create", "name": "after",
                                                        "physical_shards": 1})
            assert created["state"] == "creating"
            await trio.sleep(1.0)
            stop.set()
        assert not errors, errors[:3]
        assert writes[0] > before  # clients wrote on while the leader changed
        await in_thread(cluster.start_node, old)
        await in_thread(cluster.wait_ready, 60.0)
    async with open_client(cluster.client_addresses(), keyspace="after") as kv2:
        await kv2.put("k", "v")
        assert await kv2.get("k") == b"v"
    print(f"shard manager leader {old} -> {new}; {len(acked)} keys acked, no client errors")


@pytest.mark.timeout(180)
async def test_a_stale_map_is_redirected_and_never_writes_into_the_wrong_group(
        make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(dcs=3, nodes_per_dc=1, physical_shards=2)
    async with open_client(cluster.client_addresses()) as kv:
        smap = await kv.shard_map()
        ks = smap.keyspace("default")
        first, second = sorted(set(ks["map"]))
        key = next(f"k{i}".encode() for i in range(1000)
                   if smap.route("default", f"k{i}".encode()).shard == first)

        # A write sent to the group that does not own the key's logical shard is
        # refused when applied (WRONG_SHARD, definite) and changes nothing there.
        leaders = await in_thread(cluster.leaders)
        async with await RawConnection.open(cluster.address(leaders[second])) as conn:
            reply = await conn.request({"id": 1, "op": "put", "shard": second, "key": key,
                                        "value": b"misrouted", "cid": b"s" * 16, "seq": 1,
                                        "ack": 0})
            assert reply["err"]["code"] == "WRONG_SHARD" and reply["err"]["definite"], reply
            reply = await conn.request({"id": 2, "op": "get", "shard": second, "key": key})
            assert reply["err"]["code"] == "WRONG_SHARD", reply
        assert await kv.get(key) is None

        # An SDK whose cached map sends everything to the wrong group: redirected,
        # the write lands in the owner, and the wrong group holds nothing.
        document = dict(smap.document)
        document["keyspaces"] = {"default": {**ks, "map": [second] * len(ks["map"])}}
        document["version"] = smap.version - 1  # an older map, as a stale client has
        kv._map = ShardMap(document)
        refreshes = kv.map_refreshes
        await kv.put(key, b"routed")
        assert kv.map_refreshes > refreshes
        assert await kv.get(key) == b"routed"
    # Every replica of the owner applies the write (a follower learns of the
    # commit on the leader's next append-entries or heartbeat).
    for node_id in cluster.node_ids:
        with trio.fail_after(10):
            while await local_values(cluster, node_id, [key], shard=first) != [b"routed"]:
                await trio.sleep(0.05)
    statuses = await shard_statuses(cluster)
    for node_id in cluster.node_ids:
        # Nothing was ever written to the other group (every replica counts 0 keys).
        assert statuses[node_id][second]["keys"] == 0, statuses[node_id][second]


@pytest.mark.timeout(180)
async def test_keyspaces_are_created_used_and_dropped(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(dcs=3, nodes_per_dc=1, physical_shards=1)
    async with open_client(cluster.client_addresses()) as watcher:
        before = await watcher.shard_map()
        fetches = watcher.map_refreshes
        created = await in_thread(cluster.manager, {
            "op": "ks_create", "name": "users", "logical_shards": 16, "physical_shards": 2})
        shard_ids = created["physical_shards"]
        await in_thread(cluster.wait_ready)
        # The client's long-poll watch brings the new map without being asked.
        with trio.fail_after(10):
            while "users" not in (await watcher.shard_map()).keyspaces:
                await trio.sleep(0.05)
        assert (await watcher.shard_map()).version > before.version
        assert watcher.map_refreshes == fetches
    async with open_client(cluster.client_addresses(), keyspace="users") as users, \
            open_client(cluster.client_addresses()) as default:
        await users.put("{u1}:name", "alice")
        await users.put("{u1}:mail", "alice@example.com")
        await users.put("{u2}:name", "bob")
        await default.put("{u1}:name", "not a user")
        assert await users.scan("{u1}:") == [(b"{u1}:mail", b"alice@example.com"),
                                             (b"{u1}:name", b"alice")]
        assert await default.get("{u1}:name") == b"not a user"
        exported = [pair async for page in users.export() for pair in page]
        assert sorted(exported) == sorted([(b"{u1}:name", b"alice"),
                                           (b"{u1}:mail", b"alice@example.com"),
                                           (b"{u2}:name", b"bob")])
    await in_thread(cluster.manager, {"op": "ks_drop", "name": "users"})
    with trio.fail_after(30):
        while any(k["name"] == "users" for k in await in_thread(
                cluster.manager, {"op": "ks_list"})):
            await trio.sleep(0.2)
        # Every node closes the dropped groups' replicas and deletes their files.
        while any(s in shards for shards in (await shard_statuses(cluster)).values()
                  for s in shard_ids) or any(
                (cluster.node_dir(n) / f"shard-{s}").exists()
                for n in cluster.node_ids for s in shard_ids):
            await trio.sleep(0.2)
    # The name can be used again, for a new, empty keyspace.
    await in_thread(cluster.manager, {"op": "ks_create", "name": "users"})
    await in_thread(cluster.wait_ready)
    async with open_client(cluster.client_addresses(), keyspace="users") as users, \
            open_client(cluster.client_addresses()) as default:
        assert await users.get("{u1}:name") is None
        assert await default.get("{u1}:name") == b"not a user"


@pytest.mark.timeout(120)
async def test_nodes_on_distinct_addresses(make_cluster: ClusterFactory) -> None:
    """Nothing assumes one host: every process on its own loopback address."""
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    cluster = make_cluster(dcs=3, nodes_per_dc=1, physical_shards=2, hosts=hosts)
    statuses = await in_thread(cluster.statuses)
    for node in cluster.config.nodes:
        status = statuses[node.id]
        assert status is not None and status["client_address"].startswith(node.host + ":")
        for shard in status["shards"]:
            assert shard["raft_address"].startswith(node.host + ":"), shard
    assert {n.host for n in cluster.config.nodes} == set(hosts)
    async with open_client(cluster.client_addresses()) as kv:
        for i in range(50):
            await kv.put(f"k{i}", f"v{i}")
        assert [await kv.get(f"k{i}") for i in range(50)] == [f"v{i}".encode()
                                                              for i in range(50)]


@pytest.mark.timeout(120)
async def test_bad_requests_to_the_shard_manager_and_admin_ops_get_clear_errors(
        make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(dcs=3, nodes_per_dc=1, physical_shards=1)
    leader = await in_thread(cluster.manager_leader)
    assert leader is not None
    follower = next(m for m in cluster.manager_ids if m != leader)
    async with await RawConnection.open(cluster.address(leader)) as conn:
        await conn.send_raw(b"\x00\x00\x00\x02\xff\xff")  # a frame that is not cbor
        assert (await conn.receive())["err"]["code"] == "BAD_REQUEST"
        cases = [
            ({"id": 1, "op": "no-such-op"}, "BAD_REQUEST", "no-such-op"),
            ({"id": 2, "op": "ks_create"}, "BAD_REQUEST", "'name'"),
            ({"id": 3, "op": "ks_create", "name": "x", "logical_shards": 3}, "BAD_REQUEST",
             "power of two"),
            ({"id": 4, "op": "ks_create", "name": "bad name!"}, "BAD_REQUEST", "keyspace name"),
            ({"id": 5, "op": "ks_create", "name": "x", "replication_factor": 5},
             "BAD_REQUEST", "live nodes"),
            ({"id": 6, "op": "ks_drop", "name": "nope"}, "BAD_REQUEST", "nope"),
            ({"id": 7, "op": "heartbeat", "node": "n1"}, "BAD_REQUEST", "'node'"),
            ({"id": 8, "op": "heartbeat", "node": {"id": "n9"}}, "BAD_REQUEST", "node"),
            ({"id": 9, "op": "fault", "spec": {"inter_dc_latency_ms": -1}}, "BAD_REQUEST",
             "latency"),
        ]
        for msg, code, mention in cases:
            reply = await conn.request(msg)
            assert reply["id"] == msg["id"] and reply["err"]["code"] == code, (msg, reply)
            assert mention in reply["err"]["msg"], (msg, reply)
        assert "ok" in await conn.request({"id": 10, "op": "ping"})
    async with await RawConnection.open(cluster.address(follower)) as conn:
        reply = await conn.request({"id": 1, "op": "ks_list"})
        assert reply["err"]["code"] == "NOT_LEADER", reply
        assert reply["err"]["leader"] == cluster.address(leader)
        assert "keyspaces" in (await conn.request({"id": 2, "op": "map"}))["ok"]
    node = cluster.node_ids[0]
    async with await RawConnection.open(cluster.address(node)) as conn:
        for msg, mention in (({"id": 1, "op": "own", "shard": 1, "ks_id": 0, "L": 256,
                               "ls": ["x"]}, "'ls'"),
                             ({"id": 2, "op": "fault", "spec": {"cuts": [["n1", "n1"]]}},
                              "cuts"),
                             ({"id": 3, "op": "scan", "shard": 1, "ls": 0, "limit": 0},
                              "'limit'")):
            reply = await conn.request(msg)
            assert reply["err"]["code"] == "BAD_REQUEST" and mention in reply["err"]["msg"], (
                msg, reply)
    # Nothing changed, and everyone still serves.
    listed = await in_thread(cluster.manager, {"op": "ks_list"})
    assert [k["name"] for k in listed] == ["default"]
    async with open_client(cluster.client_addresses()) as kv:
        await kv.put("still", "serving")
        assert await kv.get("still") == b"serving"


@pytest.mark.timeout(120)
async def test_a_replica_that_cannot_be_opened_is_retried_and_the_node_serves_on(
        make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(dcs=3, nodes_per_dc=1, physical_shards=1)
    view = await in_thread(cluster.manager, {"op": "cluster"})
    new_shard = view["state"]["next_shard_id"]
    blocker = cluster.node_dir("n1") / f"shard-{new_shard}"
    blocker.write_text("a file where the replica's directory should go\n")
    await in_thread(cluster.manager, {"op": "ks_create", "name": "k2"})
    await in_thread(cluster.wait_ready)  # the other two replicas make a majority
    async with open_client(cluster.client_addresses(), keyspace="k2") as k2, \
            open_client(cluster.client_addresses()) as default:
        await k2.put("a", "1")
        await default.put("b", "2")  # n1 serves on (its replica of shard 1 is there)
        statuses = await shard_statuses(cluster)
        assert new_shard not in statuses["n1"] and 1 in statuses["n1"]
        blocker.unlink()
        with trio.fail_after(30):  # the next heartbeat opens it, and it catches up
            while True:
                statuses = await shard_statuses(cluster)
                mine = statuses["n1"].get(new_shard)
                if mine is not None and mine["keys"] == 1:
                    break
                await trio.sleep(0.2)
        assert await local_values(cluster, "n1", [b"a"], shard=new_shard,
                                  keyspace="k2") == [b"1"]
        assert await default.get("b") == b"2"


@pytest.mark.timeout(120)
async def test_a_node_restarted_while_the_shard_manager_is_down_reopens_its_replicas(
        make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(dcs=3, nodes_per_dc=1, physical_shards=2)
    async with open_client(cluster.client_addresses()) as kv:
        smap = await kv.shard_map()
        keys = [f"k{i}".encode() for i in range(20)]
        for key in keys:
            await kv.put(key, b"before")
        for manager_id in cluster.manager_ids:
            await in_thread(cluster.kill_node, manager_id)
        await in_thread(cluster.kill_node, "n1")
        await in_thread(cluster.start_node, "n1")
        # No shard manager is running: n1 reopens its replicas from their
        # descriptors on disk, and the groups (and clients with a map) go on.
        with trio.fail_after(30):
            while sorted((await shard_statuses(cluster))["n1"]) != [1, 2]:
                await trio.sleep(0.2)
        for key in keys:
            await kv.put(key, b"after")
        for shard in (1, 2):
            mine = [k for k in keys if smap.route("default", k).shard == shard]
            with trio.fail_after(30):
                while await local_values(cluster, "n1", mine, shard=shard) != [b"after"] * len(
                        mine):
                    await trio.sleep(0.2)


@pytest.mark.timeout(90)
async def test_a_client_goes_on_when_a_replica_knows_no_leader_and_the_manager_is_down(
        make_cluster: ClusterFactory) -> None:
    """A replica that knows no leader answers NOT_LEADER with no hint, and the
    client then asks the shard manager for a newer map. With the manager down
    the client must go on to the other replicas with the map it has: not fail,
    and not wait out its whole retry budget (it once did both)."""
    cluster = make_cluster(dcs=3, nodes_per_dc=1, physical_shards=1)
    async with open_client(cluster.client_addresses(), watch_map=False) as kv:
        await kv.put("k", b"before")  # the client now knows the leader
        shard, old = next(iter((await in_thread(cluster.leaders)).items()))
        # Cut the leader off from the other nodes: it steps down and, cut off,
        # hears of no new leader, so it answers NOT_LEADER with no hint.
        spec = cluster.fault_spec().isolate([old], cluster.node_ids)
        assert await in_thread(cluster.set_fault_spec, spec) == []
        with trio.fail_after(30):
            while True:
                roles = (await shard_statuses(cluster))[old]
                leaders = await in_thread(cluster.leaders)
                if roles[shard]["role"] != "leader" and leaders.get(shard) not in (None, old):
                    break
                await trio.sleep(0.2)
        for manager_id in cluster.manager_ids:
            await in_thread(cluster.kill_node, manager_id)
        started = trio.current_time()
        await kv.put("k", b"after")
        elapsed = trio.current_time() - started
        assert elapsed < 5, f"the put took {elapsed:.1f} s"
        assert await kv.get("k") == b"after"

"""Crashes (kill -9) under load: no acknowledged write is ever lost."""

from __future__ import annotations

import contextlib
import os
import time

import pytest
import trio
from integration_support import SHARD, RawConnection, in_thread, local_values, wait_leader

from raftkv.client import AsyncClient, open_client
from raftkv.errors import PreconditionFailed, RaftKVError
from raftkv.localcluster import LocalCluster

pytestmark = pytest.mark.integration

WRITERS = 8


class Ledger:
    """Every write attempted, and which were acknowledged (and when)."""

    def __init__(self) -> None:
        self.acked: dict[bytes, bytes] = {}
        self.attempted: dict[bytes, bytes] = {}
        self.errors: list[str] = []
        self.kill_time: float | None = None
        self.first_success_after_kill: float | None = None
        self.stop = trio.Event()

    def ack_count(self) -> int:
        return len(self.acked)


async def writer(kv: AsyncClient, w: int, ledger: Ledger) -> None:
    n = 0
    while not ledger.stop.is_set():
        key = f"w{w}-{n}".encode()
        value = f"value-{w}-{n}-{time.time_ns()}".encode()
        n += 1
        ledger.attempted[key] = value
        started = time.monotonic()
        try:
            await kv.put(key, value)
        except RaftKVError as exc:  # not acknowledged: may or may not be there
            ledger.errors.append(f"{key!r}: {exc}")
            continue
        ledger.acked[key] = value
        if (ledger.kill_time is not None and started >= ledger.kill_time
                and ledger.first_success_after_kill is None):
            ledger.first_success_after_kill = time.monotonic()


async def verify(kv: AsyncClient, ledger: Ledger) -> None:
    """Every acknowledged write reads back; an unacknowledged one holds its
    value or nothing (each key is written once, so nothing else is allowed)."""
    missing = []
    for key, value in ledger.attempted.items():
        got = await kv.get(key)
        if key in ledger.acked:
            if got != value:
                missing.append((key, value, got))
        else:
            assert got in (None, value), (key, got)
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"


async def wait_caught_up(cluster: LocalCluster, node_id: str, index: int,
                         timeout_s: float = 30.0) -> dict:
    with trio.fail_after(timeout_s):
        while True:
            status = (await in_thread(cluster.statuses)).get(node_id)
            # A restarted node answers status before it has reopened its
            # replica (the shard manager tells it to): no shard yet.
            if status and status["shards"] and status["shards"][0]["applied_index"] >= index:
                return status
            await trio.sleep(0.1)


@pytest.mark.timeout(90)
async def test_kill_leader_under_load(cluster: LocalCluster) -> None:
    old_leader = await wait_leader(cluster)
    ledger = Ledger()
    async with open_client(cluster.client_addresses(), retry_budget_s=30.0) as kv:
        async with trio.open_nursery() as nursery:
            for w in range(WRITERS):
                nursery.start_soon(writer, kv, w, ledger)
            with trio.fail_after(20):
                while ledger.ack_count() < 200:
                    await trio.sleep(0.01)
            acked_before_kill = ledger.ack_count()
            ledger.kill_time = time.monotonic()
            await in_thread(cluster.kill_node, old_leader)
            assert not cluster.is_running(old_leader)
            # Writes go on through the election; give them some time after the
            # first post-kill success.
            with trio.fail_after(30):
                while ledger.first_success_after_kill is None:
                    await trio.sleep(0.01)
            acked_at_recovery = ledger.ack_count()
            with trio.fail_after(20):
                while ledger.ack_count() < acked_at_recovery + 200:
                    await trio.sleep(0.01)
            ledger.stop.set()

        failover_s = ledger.first_success_after_kill - ledger.kill_time
        print(f"acked {ledger.ack_count()} ({acked_before_kill} before the kill), "
              f"errors {len(ledger.errors)}, first write after kill {failover_s:.2f} s")
        assert failover_s < 10.0, f"no write succeeded for {failover_s:.1f} s after the kill"
        # With a 30 s retry budget no write should have failed outright.
        assert not ledger.errors, ledger.errors[:5]

        new_leader = await wait_leader(cluster)
        assert new_leader != old_leader

        await in_thread(cluster.start_node, old_leader)
        await in_thread(cluster.wait_ready)
        await verify(kv, ledger)

        # The restarted node catches up and holds every acknowledged write.
        leader_status = (await in_thread(cluster.statuses))[await wait_leader(cluster)]
        commit = leader_status["shards"][0]["commit_index"]
        await wait_caught_up(cluster, old_leader, commit)
    keys = list(ledger.acked)
    assert await local_values(cluster, old_leader, keys) == [ledger.acked[k] for k in keys]


async def write_keys(kv: AsyncClient, prefix: str, count: int, ledger: Ledger) -> None:
    async def one(w: int) -> None:
        for i in range(w, count, WRITERS):
            key = f"{prefix}-{i}".encode()
            value = f"{prefix}-value-{i}".encode()
            ledger.attempted[key] = value
            await kv.put(key, value)
            ledger.acked[key] = value

    async with trio.open_nursery() as nursery:
        for w in range(WRITERS):
            nursery.start_soon(one, w)


async def restart_all(cluster: LocalCluster) -> None:
    for node_id in cluster.node_ids:
        await in_thread(cluster.start_node, node_id)
    await in_thread(cluster.wait_ready)


@pytest.mark.timeout(90)
async def test_kill_all_nodes_after_acks(cluster: LocalCluster) -> None:
    ledger = Ledger()
    async with open_client(cluster.client_addresses()) as kv:
        await write_keys(kv, "before", 300, ledger)
        # A few overwrites and deletes too: the latest acknowledged state must survive.
        await kv.put("before-0", "overwritten")
        ledger.acked[b"before-0"] = ledger.attempted[b"before-0"] = b"overwritten"
        assert await kv.delete("before-1")
        del ledger.acked[b"before-1"]
        ledger.attempted[b"before-1"] = None  # type: ignore[assignment]
        await kv.cas("counter", None, "7")

    leader = await wait_leader(cluster)
    # Leader first, then the followers: no clean shutdown anywhere.
    for node_id in [leader] + [n for n in cluster.node_ids if n != leader]:
        await in_thread(cluster.kill_node, node_id)
    assert not any(cluster.is_running(n) for n in cluster.node_ids)

    await restart_all(cluster)
    async with open_client(cluster.client_addresses()) as kv:
        await verify(kv, ledger)
        assert await kv.get("before-1") is None
        assert await kv.get("counter") == b"7"
        # The cluster takes writes after the restart, and cas sees the old value.
        await kv.cas("counter", "7", "8")
        assert await kv.get("counter") == b"8"


@pytest.mark.timeout(90)
async def test_kill_all_nodes_with_writes_in_flight(cluster: LocalCluster) -> None:
    """Writers keep going while every node is killed and restarted; the SDK's
    retries (same client id and seq) finish the writes once the cluster is back."""
    ledger = Ledger()
    async with open_client(cluster.client_addresses(), retry_budget_s=40.0) as kv:
        async with trio.open_nursery() as nursery:
            for w in range(WRITERS):
                nursery.start_soon(writer, kv, w, ledger)
            with trio.fail_after(20):
                while ledger.ack_count() < 150:
                    await trio.sleep(0.01)
            for node_id in cluster.node_ids:
                await in_thread(cluster.kill_node, node_id)
            acked_while_down = ledger.ack_count()
            await trio.sleep(0.5)
            await restart_all(cluster)
            with trio.fail_after(30):
                while ledger.ack_count() < acked_while_down + 150:
                    await trio.sleep(0.01)
            ledger.stop.set()
        print(f"acked {ledger.ack_count()}, errors {len(ledger.errors)}")
        assert not ledger.errors, ledger.errors[:5]
        await verify(kv, ledger)


@pytest.mark.timeout(90)
async def test_cas_increments_across_leader_kill(cluster: LocalCluster) -> None:
    """Read-modify-cas increments through a leader crash: the counter ends at
    exactly the number of acknowledged increments. A retried cas that was
    applied twice, or whose first application was forgotten (the retry then
    fails its precondition and the client increments again), shows up as a
    difference."""
    acked = 0
    failed: list[str] = []
    stop = trio.Event()

    async def incrementer(kv: AsyncClient) -> None:
        nonlocal acked
        while not stop.is_set():
            try:
                current = await kv.get("counter")
                new = str(int(current or b"0") + 1).encode()
                await kv.cas("counter", current, new)
            except PreconditionFailed:
                continue
            except RaftKVError as exc:
                failed.append(str(exc))
                continue
            acked += 1

    old_leader = await wait_leader(cluster)
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(
            open_client(cluster.client_addresses(), retry_budget_s=30.0)) for _ in range(6)]
        async with trio.open_nursery() as nursery:
            for kv in clients:
                nursery.start_soon(incrementer, kv)
            with trio.fail_after(20):
                while acked < 60:
                    await trio.sleep(0.01)
            await in_thread(cluster.kill_node, old_leader)
            at_kill = acked
            with trio.fail_after(30):
                while acked < at_kill + 60:
                    await trio.sleep(0.01)
            stop.set()

    print(f"{acked} increments acknowledged")
    assert not failed, failed[:5]
    await in_thread(cluster.start_node, old_leader)
    await in_thread(cluster.wait_ready)
    async with open_client(cluster.client_addresses()) as kv:
        assert await kv.get("counter") == str(acked).encode()


@pytest.mark.timeout(90)
async def test_paused_old_leader_serves_no_stale_reads(cluster: LocalCluster) -> None:
    """A leader frozen (SIGSTOP) while the others elect a new leader and take
    a write must, once resumed, neither answer a strong read with the old value
    nor acknowledge a cas that expects the old value."""
    old_leader = await wait_leader(cluster)
    async with open_client(cluster.client_addresses()) as kv:
        await kv.put("k", "old")

    await in_thread(cluster.pause_node, old_leader)
    try:
        async with open_client(cluster.client_addresses(), request_timeout_s=1.0) as kv:
            await kv.put("k", "new")  # needs the new leader: the old one is frozen
            assert await kv.get("k") == b"new"
        cid = os.urandom(16)
        conn = await RawConnection.open(cluster.address(old_leader))
        # Queue the requests while the node is frozen; it reads them on resume,
        # possibly still believing it leads.
        await conn.send({"id": 1, "op": "get", "shard": SHARD, "key": b"k"})
        await conn.send({"id": 2, "op": "cas", "shard": SHARD, "key": b"k", "expect": b"old",
                         "value": b"stale-write", "cid": cid, "seq": 1, "ack": 0})
        await conn.send({"id": 3, "op": "get", "shard": SHARD, "key": b"k", "cons": "eventual"})
    finally:
        await in_thread(cluster.resume_node, old_leader)
    replies = {}
    async with conn:
        for _ in range(3):
            reply = await conn.receive(timeout_s=30)
            replies[reply["id"]] = reply
    print(replies)
    if "ok" in replies[1]:
        assert replies[1]["ok"]["value"] == b"new", f"stale strong read: {replies[1]}"
    else:
        assert replies[1]["err"]["code"] in ("NOT_LEADER", "UNAVAILABLE", "OUTCOME_UNKNOWN",
                                             "TIMEOUT"), replies[1]
    assert "ok" not in replies[2], f"a cas expecting the overwritten value succeeded: {replies[2]}"
    assert replies[3]["ok"]["value"] in (b"old", b"new")  # eventual may be stale

    async with open_client(cluster.client_addresses()) as kv:
        assert await kv.get("k") == b"new"

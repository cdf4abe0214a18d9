"""Online resharding through real processes: ``raftkv reshard`` splits and
merges a keyspace while clients read, write and cas; the shard manager's
leader and a worker die mid-reshard; an abort turns it back. Clients must
see no error, and every key must hold its last acknowledged value."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import trio
from integration_support import in_thread

from raftkv.client import open_client
from raftkv.errors import PreconditionFailed, RaftKVError
from raftkv.localcluster import LocalCluster
from raftkv_cli.reshard import start_workers, stop_workers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

LOGICAL = 64


class Load:
    """``clients`` clients, each owning its keys: puts, strong gets and cas.
    With one writer per key, a linearizable read returns the last
    acknowledged write, so every read is checked as it comes back."""

    def __init__(self, cluster: LocalCluster, clients: int = 8, keys_per_client: int = 40) -> None:
        self.cluster = cluster
        self.clients = clients
        self.keys = keys_per_client
        self.acked: dict[bytes, bytes] = {}
        self.errors: list[str] = []
        self.ops = 0
        self.stop = trio.Event()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for c in range(self.clients):
                nursery.start_soon(self._client, c)

    async def _client(self, c: int) -> None:
        rng = random.Random(c)
        async with open_client(self.cluster.client_addresses(), retry_budget_s=30.0) as kv:
            n = 0
            while not self.stop.is_set():
                key = b"c%d-k%d" % (c, rng.randrange(self.keys))
                n += 1
                value = b"c%d-v%d" % (c, n)
                try:
                    choice = rng.random()
                    if choice < 0.4:
                        await kv.put(key, value)
                        self.acked[key] = value
                    elif choice < 0.7:
                        got = await kv.get(key)
                        if got != self.acked.get(key):
                            self.errors.append(f"stale read of {key!r}: {got!r}, "
                                               f"last acknowledged {self.acked.get(key)!r}")
                    else:
                        try:
                            await kv.cas(key, self.acked.get(key), value)
                            self.acked[key] = value
                        except PreconditionFailed as exc:
                            self.errors.append(f"cas of {key!r} found {exc.details}")
                except RaftKVError as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    return
                self.ops += 1

    async def verify(self) -> None:
        async with open_client(self.cluster.client_addresses(), retry_budget_s=30.0) as kv:
            for key, value in sorted(self.acked.items()):
                assert await kv.get(key) == value, key


def reshard_cli(cluster: LocalCluster, *args: str, timeout_s: float = 180.0) -> Any:
    result = subprocess.run(
        [sys.executable, "-m", "raftkv_cli.main", "reshard", "--dir", str(cluster.directory),
         "--json", *args], capture_output=True, text=True, timeout=timeout_s, check=False)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def status(cluster: LocalCluster) -> dict[str, Any]:
    out: dict[str, Any] = cluster.manager({"op": "reshard_status", "ks": "default"})
    return out


def layout(cluster: LocalCluster) -> tuple[list[int], list[int]]:
    """The keyspace's logical map and its physical shards, from the manager."""
    state = cluster.manager({"op": "cluster"})["state"]
    ks = next(k for k in state["keyspaces"] if k["name"] == "default")
    shards = sorted(s["id"] for s in state["shards"] if s["keyspace"] == "default")
    return ks["logical_map"], shards


def status_shards(cluster: LocalCluster) -> int:
    out = subprocess.run([sys.executable, "-m", "raftkv_cli.main", "status", "--dir",
                          str(cluster.directory), "--json"], capture_output=True, text=True,
                         timeout=60, check=True)
    return len([s for s in json.loads(out.stdout)["shards"] if s.get("keyspace", "default")
                == "default"])


def wait_for(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


async def test_split_2_to_8_then_merge_8_to_3_under_load(make_cluster: Any) -> None:
    cluster = make_cluster(physical_shards=2, logical_shards=LOGICAL)
    load = Load(cluster)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(load.run)
        await trio.sleep(1.0)
        before = load.ops
        split = await in_thread(reshard_cli, cluster, "--physical-shards", "8", "--workers", "2")
        during_split = load.ops - before
        merge = await in_thread(reshard_cli, cluster, "--physical-shards", "3", "--workers", "2")
        await trio.sleep(0.5)
        load.stop.set()
    assert not load.errors, load.errors[:5]
    assert split["state"] == "done" and merge["state"] == "done"
    assert split["moves"] == 48 and split["keys_moved"] > 0
    assert during_split > 100, "the clients made no progress during the split"
    assert split["unavailability_ms"]["count"] == 48
    assert merge["removed_shards"] and len(merge["removed_shards"]) == 5
    mapped, shards = await in_thread(layout, cluster)
    assert len(shards) == 3 and set(mapped) == set(shards)
    assert sorted(mapped.count(s) for s in shards) in ([21, 21, 22], [21, 22, 22])
    assert await in_thread(status_shards, cluster) == 3
    # the destinations' activating deltas went past the proposer's window
    nodes = await in_thread(cluster.statuses)
    assert sum(shard.get("urgent_proposed", 0) for node in cluster.node_ids
               for shard in (nodes[node] or {}).get("shards", [])) > 0
    await load.verify()


async def test_the_reshard_survives_a_killed_worker_and_manager_leader(
        make_cluster: Any) -> None:
    cluster = make_cluster(physical_shards=2, logical_shards=LOGICAL)
    load = Load(cluster, clients=4)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run)
            await in_thread(cluster.manager, {"op": "reshard", "ks": "default",
                                              "physical_shards": 6})
            workers = start_workers(cluster, 2, 2)
            # A worker dies holding a move; the other goes on, and the dead
            # one's move is taken over when its lease runs out.
            held = await in_thread(wait_for, lambda: [
                lease["move"] for lease in status(cluster)["leases"]
                if lease["worker"].startswith("cli-0-")], 60, "a move held by worker 0")
            workers[0].send_signal(signal.SIGKILL)
            # The shard manager's leader dies with moves in flight.
            await in_thread(wait_for, lambda: status(cluster)["moves_done"] >= 8, 90,
                            "8 moves")
            leader = await in_thread(cluster.manager_leader)
            assert leader is not None
            await in_thread(cluster.kill_node, leader)
            await trio.sleep(1.0)
            await in_thread(cluster.start_node, leader)
            workers.append(start_workers(cluster, 1, 2)[0])
            await in_thread(wait_for, lambda: status(cluster)["state"] == "done", 150,
                            "the reshard to finish")
            final = await in_thread(status, cluster)
            load.stop.set()
    finally:
        stop_workers(workers)
    assert not load.errors, load.errors[:5]
    assert final["moves_done"] == final["moves_total"] == 64 - 2 * 11
    assert held and final["moves_aborted"] == 0  # the dead worker's move finished too
    mapped, shards = await in_thread(layout, cluster)
    assert len(shards) == 6 and set(mapped) == set(shards)
    await load.verify()


async def test_an_abort_part_way_restores_the_old_layout(make_cluster: Any) -> None:
    cluster = make_cluster(physical_shards=2, logical_shards=LOGICAL)
    original = await in_thread(layout, cluster)
    load = Load(cluster, clients=4)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run)
            await in_thread(cluster.manager, {"op": "reshard", "ks": "default",
                                              "physical_shards": 8})
            workers = start_workers(cluster, 2, 2)
            await in_thread(wait_for, lambda: status(cluster)["moves_done"] >= 5, 60,
                            "5 moves")
            stop_workers(workers)
            workers = []
            aborted = await in_thread(reshard_cli, cluster, "--abort", "--workers", "2")
            load.stop.set()
    finally:
        stop_workers(workers)
    assert not load.errors, load.errors[:5]
    assert aborted["state"] == "aborted"
    assert aborted["moves"] >= 5  # the moves back
    assert await in_thread(layout, cluster) == original
    assert await in_thread(status_shards, cluster) == 2
    await load.verify()


def test_reshard_refuses_bad_requests_with_a_clear_error(make_cluster: Any) -> None:
    cluster = make_cluster(physical_shards=2, logical_shards=LOGICAL)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "raftkv_cli.main", "reshard", "--dir",
                               str(cluster.directory), *args], capture_output=True, text=True,
                              timeout=60, check=False)

    too_many = run("--physical-shards", "65")
    assert too_many.returncode == 2 and "logical shard count (64)" in too_many.stderr
    unknown = run("--physical-shards", "4", "--keyspace", "nope")
    assert unknown.returncode == 2 and "no keyspace 'nope'" in unknown.stderr
    assert run().returncode == 2  # no target
    never = run("--status")
    assert never.returncode == 2 and "never resharded" in never.stderr
    assert run("--abort").returncode == 2
    plan = run("--physical-shards", "4", "--plan")
    assert plan.returncode == 0 and "32 logical shards move" in plan.stdout
    assert status_shards(cluster) == 2  # the plan changed nothing

"""Every serving process (node, shard manager replica) runs with the tuned
garbage collector and reports its collections and pauses in its status."""

from __future__ import annotations

import pytest
from integration_support import in_thread, wait_leader

from raftkv.client import open_client
from raftkv.localcluster import LocalCluster
from raftkv.server.collector import GC_THRESHOLDS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_every_process_reports_the_tuned_collector(cluster: LocalCluster) -> None:
    await wait_leader(cluster)
    async with open_client(cluster.client_addresses()) as kv:
        for i in range(100):
            await kv.put(f"k{i}".encode(), b"v" * 100)
    statuses = await in_thread(cluster.statuses)
    assert set(statuses) == set(cluster.process_ids)
    for process_id, status in statuses.items():
        assert status is not None, process_id
        gc = status["gc"]
        assert gc["thresholds"] == list(GC_THRESHOLDS), process_id
        assert len(gc["collections"]) == 3
        for generation in range(3):
            assert gc["pause_ms_max"][generation] <= gc["pause_ms_total"][generation]
            assert (gc["collections"][generation] == 0) == (gc["pause_ms_total"][generation] == 0)

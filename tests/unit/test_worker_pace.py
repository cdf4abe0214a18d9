"""The resharding worker's copy pace (``--max-keys-per-s``, a token bucket)
and its cache of group leaders."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio

from raftkv.client.client import forget_other_groups
from shardmgr.moves import PAGE_KEYS, Move
from shardmgr.worker import Worker


def worker(keys_per_s: float | None) -> Worker:
    unused: Any = None  # pacing touches neither the manager nor the groups
    return Worker(unused, unused, "w", per_node_max=1, keys_per_s=keys_per_s)


async def test_the_copy_keeps_to_its_pace() -> None:
    paced = worker(2000)
    started = time.monotonic()
    for _ in range(10):
        await paced._pace(100)  # 1,000 keys at 2,000 keys/s: half a second
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 1.5, elapsed


@pytest.mark.parametrize("no_limit", [None, 0])  # 0: the CLI's `--max-keys-per-s 0`
async def test_no_pace_means_no_wait(no_limit: float | None) -> None:
    free = worker(no_limit)
    started = time.monotonic()
    for _ in range(100):
        await free._pace(1000)
    assert time.monotonic() - started < 0.2


async def test_an_idle_spell_earns_at_most_a_page_of_burst() -> None:
    # The steps between two logical shards' copies must not let the next
    # copy go at full speed.
    paced = worker(1000)
    await trio.sleep(0.3)  # 300 keys' worth of idle time
    started = time.monotonic()
    await paced._pace(PAGE_KEYS)  # within the burst: no wait
    assert time.monotonic() - started < 0.05
    await paced._pace(PAGE_KEYS)  # beyond it: a page's time, 0.1 s
    assert time.monotonic() - started >= 0.08


async def test_a_move_forgets_the_leaders_of_groups_it_does_not_touch() -> None:
    # A reshard removes groups; a worker that lives through many reshards
    # must not keep a leader for every group it ever copied to.
    w = worker(None)
    w._leaders.update({1: "a:1", 2: "b:2", 7: "c:7"})
    finished = Move(id=1, keyspace="k", ks_id=1, total=8, ls=3, src=1, dst=2, phase="done")
    await w.drive(finished, {1: ["a:1"], 2: ["b:2"]})
    assert w._leaders == {1: "a:1", 2: "b:2"}


def test_forget_other_groups_keeps_exactly_the_live_ones() -> None:
    cache = {1: 0.5, 3: 1.5, 9: 2.0}
    forget_other_groups(cache, {3: "live", 4: "live"})
    assert cache == {3: 1.5}
    forget_other_groups(cache, [])
    assert cache == {}

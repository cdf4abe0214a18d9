"""The journal is compacted by size as well as by entry count: one entry may
batch thousands of commands, and pysyncobj only counts entries."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from raftkv.localcluster import free_port
from raftkv.replication.replica import Replica
from raftkv.statemachine import layout
from tests.replication.support import FAST, put_command, submit, wait_for

pytestmark = pytest.mark.timeout(60)
LIMIT_BYTES = 256 * 1024


@pytest.fixture
def group(tmp_path: Path) -> Iterator[list[Replica]]:
    settings = dataclasses.replace(FAST, log_compaction_bytes_max=LIMIT_BYTES)
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    replicas = [Replica(0, tmp_path / f"r{i}", a, [x for x in addresses if x != a], "s",
                        settings=settings) for i, a in enumerate(addresses)]
    try:
        wait_for(lambda: any(r.is_leader for r in replicas), 15)
        yield replicas
    finally:
        for r in replicas:
            r.destroy()


def test_a_large_journal_is_compacted_and_its_size_bounded(group: list[Replica]) -> None:
    leader = next(r for r in group if r.is_leader)
    value = b"x" * 20_000
    for seq in range(1, 61):  # ~1.2 MB of entries: several times the limit
        _, error = submit(leader, put_command(seq, b"k%d" % (seq % 7), value))
        assert error is None
    wait_for(lambda: all(r.snapshots_written >= 1 for r in group), 20)
    wait_for(lambda: all(r.journal.size_bytes < 2 * LIMIT_BYTES for r in group), 20)
    # and the state is intact everywhere
    for r in group:
        wait_for(lambda r=r: r.store.applied_index >= leader.store.applied_index)
        assert r.store.get(layout.data_key(0, 0, b"k3")) == value


def test_a_small_journal_is_left_alone(group: list[Replica]) -> None:
    leader = next(r for r in group if r.is_leader)
    for seq in range(1, 30):
        _, error = submit(leader, put_command(seq, b"k", b"small"))
        assert error is None
    assert all(r.snapshots_written == 0 for r in group)

"""Fixtures for integration tests: real node processes on this machine.

Every cluster a test creates is stopped when the test ends, whatever happened:
``LocalCluster.stop()`` (SIGTERM, then SIGKILL after a timeout), and then a
SIGKILL to every node process still alive (from the pid files and the Popen
objects LocalCluster kept). Node log tails are printed so pytest shows them
for a failing test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from integration_support import print_logs, shutdown_cluster

from raftkv.localcluster import LocalCluster
from raftkv.replication.replica import RaftSettings

# Settings used by every test cluster unless a test gives its own: the
# defaults, which already elect a leader in about a second.
DEFAULT_TEST_RAFT = RaftSettings()


ClusterFactory = Callable[..., LocalCluster]


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[ClusterFactory]:
    """``make_cluster(raft=RaftSettings(...), start=True, **layout)`` -> LocalCluster;
    ``layout`` goes to ``localcluster.make_config`` (dcs, nodes_per_dc,
    physical_shards, hosts, ...).

    Each call makes a new cluster directory under ``tmp_path``; all of them are
    stopped at teardown.
    """
    clusters: list[LocalCluster] = []

    def factory(raft: RaftSettings | None = None, start: bool = True,
                name: str | None = None, **layout: Any) -> LocalCluster:
        directory = tmp_path / (name or f"cluster{len(clusters)}")
        cluster = LocalCluster.create(directory, raft=raft or DEFAULT_TEST_RAFT, **layout)
        clusters.append(cluster)
        if start:
            cluster.start(timeout_s=30.0)
        return cluster

    try:
        yield factory
    finally:
        for cluster in clusters:
            print_logs(cluster)
            shutdown_cluster(cluster)


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One started cluster (as ``cluster``) for all the tests of a module that
    stop no process and use keys of their own: starting one takes seconds."""
    cluster = LocalCluster.create(tmp_path_factory.mktemp("shared") / "cluster",
                                  raft=DEFAULT_TEST_RAFT)
    try:
        cluster.start(timeout_s=30.0)
        yield cluster
    finally:
        print_logs(cluster)
        shutdown_cluster(cluster)


@pytest.fixture
def cluster(make_cluster: ClusterFactory) -> LocalCluster:
    """A started cluster: 3 shard manager replicas, 3 nodes in 3 DCs, one
    physical shard of keyspace ``default``."""
    return make_cluster()


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for ``raftkv up``; every process it starts is stopped at teardown."""
    directory = tmp_path / "cli-cluster"
    try:
        yield directory
    finally:
        if (directory / "cluster.json").exists():
            shutdown_cluster(LocalCluster(directory))

"""Fixtures for every test folder: a real 3-member etcd on 127.0.0.1.

Used by the jepsen-lite etcd target's tests and by the benchmark's etcd
driver tests. When etcd is not installed and cannot be, a test that needs it
skips with `EtcdUnavailable`'s message.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from jepsen_lite.etcd import EtcdCluster, EtcdUnavailable, ensure_etcd


@pytest.fixture(scope="session")
def etcd_binary() -> Path:
    try:
        return ensure_etcd()
    except EtcdUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def etcd_cluster(tmp_path: Path, etcd_binary: Path) -> Iterator[EtcdCluster]:
    """3 members under ``tmp_path / "etcd"``, started; stopped at teardown
    whatever happened, with each member's log tail printed."""
    cluster = EtcdCluster(tmp_path / "etcd", size=3, binary=etcd_binary)
    try:
        cluster.start(timeout_s=30)
        yield cluster
    finally:
        cluster.stop()
        for member in cluster.members:  # shown by pytest when the test failed
            log = cluster.log_path(member)
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-15:]
                print(f"----- {log} (last {len(tail)} lines) -----", *tail, sep="\n")

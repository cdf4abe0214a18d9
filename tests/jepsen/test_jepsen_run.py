"""``jepsen-lite run`` end to end against real raftkv clusters (processes,
sockets, LevelDB, kill -9, SIGSTOP, the fault layer), checked by the real
checker. Each run starts its own cluster in OUT/cluster; the fixture stops it
even when a run is killed by its timeout."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jepsen_support import kill_processes_mentioning

from jepsen_lite import etcd
from raftkv.localcluster import LocalCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


@pytest.fixture
def out_dir(tmp_path: Path) -> Iterator[Path]:
    out = tmp_path / "run"
    yield out
    if (out / "cluster" / "cluster.json").exists():
        LocalCluster(out / "cluster").stop()


def run(out: Path, *args: str, timeout_s: float = 120) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "jepsen_lite.cli", "run", "--out", str(out), *args],
        capture_output=True, text=True, timeout=timeout_s, check=False)
    result = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() \
        else {}
    return proc.returncode, result, proc.stdout + proc.stderr


def nemesis_events(out: Path) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return [e for e in events if e["process"] == "nemesis"]


def test_a_short_run_with_kills_and_partitions_is_linearizable(out_dir: Path) -> None:
    """The CI run: register workload, kill -9 and partitions, 20 s."""
    code, result, output = run(out_dir, "--workload", "register", "--nemesis", "kill,partition",
                               "--time-limit", "20", "--concurrency", "6", "--seed", "3")
    assert code == 0, output
    assert result["verdict"] == "linearizable"
    assert result["outcomes"]["ok"] > 500
    assert result["check"]["checker"] == "wgl" and result["check"]["ops_checked"] > 500
    kinds = {f["kind"] for f in result["faults"] if "error" not in f}
    assert kinds == {"kill", "partition"}, result["faults"]
    assert all("healed" in f for f in result["faults"])
    starts = [e for e in nemesis_events(out_dir) if e["f"].endswith("-start")]
    assert len(starts) == len(result["faults"])
    for name in ("history.jsonl", "latency.png", "throughput.png"):
        assert (out_dir / name).stat().st_size > 1000
    assert not (out_dir / "cluster" / "n1" / "node.pid").exists() or not LocalCluster(
        out_dir / "cluster").is_running("n1")  # the run stopped its cluster


def test_eventual_reads_are_caught_not_linearizable(out_dir: Path) -> None:
    """Reads from any replica, with a replica cut off now and then, must be
    found out: the harness can fail."""
    code, result, output = run(out_dir, "--workload", "register", "--nemesis", "partition",
                               "--time-limit", "15", "--concurrency", "8", "--seed", "1",
                               "--read-consistency", "eventual")
    assert code == 1, output
    assert result["verdict"] == "not-linearizable"
    assert "NOT LINEARIZABLE" in output and "no linearization" in output


def test_the_set_workload_loses_nothing_under_pauses_and_manager_kills(tmp_path: Path) -> None:
    """Also: a run on a cluster given with --cluster leaves it running, healed."""
    cluster = LocalCluster.create(tmp_path / "given")
    try:
        cluster.start()
        out_dir = tmp_path / "run"
        code, result, output = run(out_dir, "--workload", "set", "--nemesis",
                                   "pause,manager,kill", "--time-limit", "15",
                                   "--concurrency", "6", "--seed", "5",
                                   "--cluster", str(cluster.directory))
        after = LocalCluster(cluster.directory)  # (the run restarted some processes)
        assert all(after.is_running(p) for p in after.process_ids)
        assert not after.fault_spec().cuts
        after.wait_ready(timeout_s=30)
    finally:
        LocalCluster(cluster.directory).stop()
    assert not (out_dir / "cluster").exists()
    assert code == 0, output
    check = result["check"]
    assert check["checker"] == "set" and check["valid"] is True
    assert check["acknowledged"] > 300 and check["lost"] == [] and check["unexpected"] == []
    assert result["faults"]


def test_bad_arguments_exit_3_with_one_line(out_dir: Path) -> None:
    code, _, output = run(out_dir, "--nemesis", "kill,chaos", timeout_s=30)
    assert code == 3
    assert "unknown nemesis chaos" in output


def test_etcd_runs_the_same_workload_and_is_linearizable(tmp_path: Path) -> None:
    """A system nobody here wrote: 3 etcd members on loopback, kills and pauses."""
    try:
        etcd.ensure_etcd()
    except etcd.EtcdUnavailable as exc:
        pytest.skip(str(exc))
    out = tmp_path / "etcd-run"
    try:
        code, result, output = run(out, "--target", "etcd", "--nemesis", "kill,pause",
                                   "--time-limit", "12", "--concurrency", "5", "--seed", "2")
    finally:
        leftovers = kill_processes_mentioning(str(out))
    assert leftovers == [], "the run left etcd members running"
    assert code == 0, output
    assert result["verdict"] == "linearizable" and result["target"] == "etcd"
    assert result["outcomes"]["ok"] > 300
    assert {f["kind"] for f in result["faults"]} == {"kill", "pause"}

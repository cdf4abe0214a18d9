"""``jepsen-lite run --nemesis reshard,...`` against real raftkv clusters: the
keyspace the workload uses is split and merged again and again while nodes
are killed and partitioned, with the resharding workers the run starts.

The CI run is shared by the tests of this module (one cluster run, 25 s of
load); the long run is ``slow``. Every run is followed by stopping its
cluster and killing whatever process still names its directory (the
resharding workers too), also when a test fails or times out."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from jepsen_support import kill_processes_mentioning

from raftkv.localcluster import LocalCluster

pytestmark = [pytest.mark.integration]



@dataclass
class Run:
    code: int
    result: dict[str, Any]  # result.json ({} if none)
    output: str
    out: Path
    leftovers: list[int]  # pids still naming OUT after the run (killed since)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line)
                for line in (self.out / "history.jsonl").read_text().splitlines()]


@contextlib.contextmanager
def jepsen_run(out: Path, *args: str, timeout_s: float) -> Iterator[Run]:
    """``jepsen-lite run --out OUT ARGS``; then, whatever happens, stop its
    cluster and kill any process left naming OUT."""
    try:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "jepsen_lite.cli", "run", "--out", str(out), *args],
                capture_output=True, text=True, timeout=timeout_s, check=False)
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            code, output = -1, f"timed out after {timeout_s} s: {exc.stdout!r} {exc.stderr!r}"
        result = json.loads((out / "result.json").read_text()) \
            if (out / "result.json").exists() else {}
        yield Run(code, result, output, out, kill_processes_mentioning(str(out)))
    finally:
        if (out / "cluster" / "cluster.json").exists():
            LocalCluster(out / "cluster").stop()
        kill_processes_mentioning(str(out))


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """register workload, reshard + kill + partition, 25 s, seed 4: the
    schedule (test_jepsen_workload.py) has three reshards, each followed
    within a second by a kill, so nodes die while logical shards move."""
    out = tmp_path_factory.mktemp("reshard") / "run"
    with jepsen_run(out, "--workload", "register", "--nemesis", "reshard,kill,partition",
                    "--time-limit", "25", "--concurrency", "6", "--seed", "4",
                    timeout_s=200) as run:
        yield run


@pytest.mark.timeout(240)
def test_splits_and_merges_under_kills_and_partitions_are_linearizable(ci_run: Run) -> None:
    result = ci_run.result
    assert ci_run.code == 0, ci_run.output
    assert result["verdict"] == "linearizable"
    assert result["check"]["checker"] == "wgl" and result["check"]["ops_checked"] > 500
    assert result["outcomes"]["ok"] > 500

    reshards = result["reshards"]
    assert reshards["keyspace"] == "default" and reshards["shard_counts"] == [1, 2]
    assert reshards["completed"] >= 2, reshards
    done = [r for r in reshards["each"] if r["state"] == "done"]
    assert {(r["from"], r["to"]) for r in done} == {(1, 2), (2, 1)}
    for r in done:
        assert r["moves_done"] == r["moves"] == 16  # half of the 32 logical shards
        assert 0 < r["duration_s"] < 60
    assert f"reshards: {reshards['count']} requested" in ci_run.output

    faults = result["faults"]
    injected = {f["kind"] for f in faults if "error" not in f}
    assert injected == {"reshard", "kill", "partition"}, faults
    windows = [f for f in faults if f["kind"] == "reshard" and "healed" in f]
    others = [f for f in faults if f["kind"] != "reshard" and "error" not in f]
    # A kill or a partition started while a reshard's moves were in flight.
    assert any(r["start_s"] < f["start_s"] < r["end_s"] for r in windows for f in others), faults
    assert all("healed" in f for f in others)

    events = ci_run.events()
    starts = [e for e in events if e["f"] == "reshard-start"]
    stops = [e for e in events if e["f"] == "reshard-stop"]
    assert len(starts) == len(stops) == len([f for f in faults if f["kind"] == "reshard"])
    assert [e["value"] for e in starts][:2] == ["shards:2", "shards:1"]
    final_reads = [e for e in events
                   if isinstance(e["process"], int) and e["process"] >= 1_000_000]
    # The heal phase waited for the last reshard before the final reads.
    assert final_reads and final_reads[0]["time"] > max(e["time"] for e in stops)


@pytest.mark.timeout(240)
def test_the_run_stopped_its_cluster_and_its_resharding_workers(ci_run: Run) -> None:
    assert ci_run.result, f"the run wrote no result.json: {ci_run.output}"
    assert ci_run.leftovers == []
    assert list((ci_run.out / "cluster").glob("reshard-worker-*.log"))


@pytest.mark.timeout(240)
def test_clients_made_before_a_split_keep_working_through_it(ci_run: Run) -> None:
    # A client whose map predates a split follows the old group's hint to a
    # group its map does not list (it fetches a fresh map): no operation fails
    # for any reason but a cas that found another value.
    failed = [e for e in ci_run.events() if e["type"] == "fail"
              and not (e["f"] == "cas" and e.get("error") is None)]
    assert failed == [], failed[:5]


@pytest.mark.timeout(60)
def test_etcd_refuses_the_reshard_nemesis_with_exit_3(tmp_path: Path) -> None:
    out = tmp_path / "etcd"
    with jepsen_run(out, "--target", "etcd", "--nemesis", "kill,reshard",
                    timeout_s=50) as run:
        assert run.code == 3, run.output
        assert run.output.strip().splitlines() == [
            "error: the reshard nemesis needs --target raftkv: etcd has no shards to split "
            "or merge"]
        assert run.result == {} and not (out / "etcd").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_long_run_with_every_nemesis_and_reshards_is_linearizable(tmp_path: Path) -> None:
    """90 s of load, reshard with kill, partition, pause and manager kills."""
    with jepsen_run(tmp_path / "long", "--workload", "register", "--nemesis",
                    "reshard,kill,partition,pause,manager", "--time-limit", "90",
                    "--concurrency", "8", "--seed", "11", timeout_s=800) as run:
        assert run.code == 0, run.output
        assert run.result["verdict"] == "linearizable"
        assert run.result["reshards"]["completed"] >= 3, run.result["reshards"]
        assert run.leftovers == []

"""``raftkv bench`` (YCSB-style, raftkv and etcd side by side), run as the CLI,
and its etcd gRPC driver against a real 3-member etcd. No mocks.

The CLI run is tiny (half a second per point): it keeps the command, its
report and its plots from rotting; no test asserts on its numbers. When etcd
is not installed and cannot be, the driver tests skip with `EtcdUnavailable`'s
message (the ``etcd_cluster`` fixture, tests/conftest.py) and the CLI run must
say ``etcd: skipped: ...`` and still run raftkv.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from integration_support import shutdown_cluster

from jepsen_lite.etcd import EtcdCluster
from raftkv.localcluster import LocalCluster
from raftkv_cli.etcd_grpc import EtcdKV, endpoint_of, find_leader, member_status

pytestmark = [pytest.mark.integration]

SCRIPT = Path(sys.executable).parent / "raftkv"
RESULT_FIELDS = {
    "target", "workload", "clients", "ops_per_s", "p50_ms", "p99_ms", "errors",
    "loadgen_cpu_pct", "distribution", "value_bytes", "ops", "physical_shards", "histogram",
}


def raftkv(*args: str, timeout_s: float,
           path_first: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess (``path_first``: a folder put before PATH)."""
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "raftkv_cli.main"]
    env = {k: v for k, v in os.environ.items() if k != "RAFTKV_CLUSTER"}
    if path_first is not None:
        env["PATH"] = f"{path_first}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([*command, *args], capture_output=True, text=True,
                          timeout=timeout_s, env=env, stdin=subprocess.DEVNULL, check=False)


def processes_using(directory: Path) -> list[int]:
    """Live processes whose command line mentions ``directory`` (from /proc)."""
    needle = str(directory).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


@pytest.fixture
def bench_dir(tmp_path: Path) -> Iterator[Path]:
    """The benchmark's --dir; whatever it left running is stopped afterwards."""
    directory = tmp_path / "bench-dir"
    try:
        yield directory
    finally:
        raftkv_dir = directory / "bench"
        if (raftkv_dir / "cluster.json").exists():
            shutdown_cluster(LocalCluster(raftkv_dir))
        for pid in processes_using(directory):  # etcd members, if the run was killed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(60)
def test_etcd_grpc_put_then_linearizable_range(etcd_cluster: EtcdCluster) -> None:
    endpoints = [endpoint_of(url) for url in etcd_cluster.client_urls]

    async def scenario() -> None:
        kv = EtcdKV(endpoints)
        try:
            first = await kv.put(b"user0000000001", b"\x00value\xff")
            second = await kv.put(b"user0000000001", b"v2")
            assert second > first > 0  # revisions
            assert await kv.get(b"absent") is None
            for _ in range(len(endpoints)):  # round-robin: every member answers
                assert await kv.get(b"user0000000001") == b"v2"
        finally:
            await kv.close()
        for endpoint in endpoints:  # and each member alone
            alone = EtcdKV([endpoint])
            try:
                assert await alone.get(b"user0000000001") == b"v2"
            finally:
                await alone.close()

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_etcd_grpc_finds_the_leader(etcd_cluster: EtcdCluster) -> None:
    endpoints = [endpoint_of(url) for url in etcd_cluster.client_urls]

    async def scenario() -> None:
        leader = await find_leader(endpoints)
        assert leader.endpoint in endpoints and leader.version.startswith("3.")
        statuses = [await member_status(e) for e in endpoints]
        assert {s.leader_id for s in statuses} == {leader.member_id}
        assert len({s.member_id for s in statuses}) == 3

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_etcd_grpc_call_to_a_stopped_cluster_raises(etcd_cluster: EtcdCluster) -> None:
    endpoints = [endpoint_of(url) for url in etcd_cluster.client_urls]
    etcd_cluster.stop()

    async def scenario() -> None:
        kv = EtcdKV(endpoints, request_timeout_s=1.0)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await kv.get(b"k")
            assert raised.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                           grpc.StatusCode.DEADLINE_EXCEEDED)
        finally:
            await kv.close()

    asyncio.run(scenario())


def check_result(result: dict[str, Any], target: str, workload: str) -> None:
    assert set(result) >= RESULT_FIELDS, sorted(RESULT_FIELDS - set(result))
    assert (result["target"], result["workload"], result["clients"]) == (target, workload, 2)
    assert result["ops"] > 0 and result["ops_per_s"] > 0, result
    assert result["errors"] == 0, result["error_kinds"]
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert 0 < result["loadgen_cpu_pct"] < 200
    assert (result["distribution"], result["value_bytes"]) == ("zipfian", 100)
    assert result["physical_shards"] == (1 if target == "raftkv" else None)
    assert sum(count for _, count in result["histogram"]["buckets"]) == result["ops"]
    if workload == "write":
        assert result["reads"] == 0 and result["updates"] == result["ops"]
    elif workload == "C":
        assert result["updates"] == 0 and result["reads"] == result["ops"]
    else:
        assert result["reads"] > 0 and result["updates"] > 0
    assert result.get("read_misses", 0) == 0  # every key was loaded first


@pytest.mark.timeout(180)
def test_a_tiny_side_by_side_run(bench_dir: Path, tmp_path: Path) -> None:
    out, plots = tmp_path / "report.json", tmp_path / "plots"
    run = raftkv("bench", "--dir", str(bench_dir), "--target", "raftkv,etcd",
                 "--workload", "A,write", "--clients", "2", "--duration-s", "0.5",
                 "--records", "50", "--json", str(out), "--plots", str(plots), timeout_s=170)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert {"time", "machine", "options", "results", "ratios", "skipped"} <= set(report)
    # the commit it was measured at (the tests run from a git checkout)
    assert report["code"]["commit"] and report["code"]["dirty"] in (True, False)
    assert report["options"]["workloads"] == ["A", "write"]
    skipped = [line for line in run.stdout.splitlines() if line.startswith("etcd: skipped: ")]
    targets = ["raftkv", "etcd"]
    if skipped:  # etcd could not be had here: one line, and raftkv still ran
        assert len(skipped) == 1 and "etcd" in report["skipped"], run.stdout
        targets = ["raftkv"]
    else:
        assert report["skipped"] == {}
        assert report["etcd"]["version"] != "unknown"
        assert report["etcd"]["endpoints"].startswith("the leader only")
    results = report["results"]
    assert [(r["target"], r["workload"]) for r in results] == [
        (t, w) for t in targets for w in ("A", "write")]
    for r in results:
        check_result(r, r["target"], r["workload"])
    if "etcd" in targets:
        assert [(r["workload"], r["clients"]) for r in report["ratios"]] == [
            ("A", 2), ("write", 2)]
        assert all(r["ops_per_s"] > 0 and r["p99_ms"] > 0 for r in report["ratios"])
        assert "raftkv / etcd, same run" in run.stdout
    for name in ("throughput.png", "latency-cdf.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert processes_using(bench_dir) == []  # both clusters were stopped

    replot = raftkv("bench", "plot", str(out), "--out", str(tmp_path / "again"), timeout_s=60)
    assert replot.returncode == 0, replot.stderr
    assert (tmp_path / "again" / "latency-cdf.png").exists()


@pytest.mark.timeout(120)
def test_an_etcd_that_cannot_start_is_skipped_in_one_line_and_raftkv_still_runs(
        bench_dir: Path, tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "etcd").write_text("#!/bin/sh\necho 'etcd: cannot start here' >&2\nexit 1\n")
    (fake / "etcd").chmod(0o755)
    out = tmp_path / "report.json"
    run = raftkv("bench", "--dir", str(bench_dir), "--target", "etcd,raftkv",
                 "--workload", "C", "--clients", "2", "--duration-s", "0.3",
                 "--records", "20", "--json", str(out), timeout_s=110, path_first=fake)
    assert run.returncode == 0, run.stdout + run.stderr
    skipped = [line for line in run.stdout.splitlines() if line.startswith("etcd: skipped: ")]
    assert len(skipped) == 1, run.stdout
    report = json.loads(out.read_text())
    assert set(report["skipped"]) == {"etcd"}
    assert [(r["target"], r["workload"]) for r in report["results"]] == [("raftkv", "C")]
    check_result(report["results"][0], "raftkv", "C")
    assert report["ratios"] == []
    assert processes_using(bench_dir) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("args", "message"), [
    (["--workload", "A,D"], "unknown workload 'D'"),
    (["--target", "raftkv,redis"], "unknown target 'redis'"),
    (["--clients", "1,0"], "--clients: 0 is not a positive integer"),
    (["--distribution", "latest"], "unknown distribution 'latest'"),
])
def test_bad_arguments_are_one_usage_line(tmp_path: Path, args: list[str],
                                          message: str) -> None:
    result = raftkv("bench", "--dir", str(tmp_path / "never"), *args, timeout_s=30)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"raftkv: bench: {message}"), lines
    assert not (tmp_path / "never").exists()  # nothing was started


@pytest.mark.timeout(30)
def test_plot_of_a_file_that_is_no_report(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": []}')
    result = raftkv("bench", "plot", str(bad), "--out", str(tmp_path / "p"), timeout_s=20)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "no results to plot" in result.stderr

"""``raftkv bench reshard``, run as the CLI: a tiny version in CI (the report's
fields, every key verified, no client error), the issue's full size as a slow
scenario. The targets are printed by the benchmark, never asserted here: they
are numbers of one machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from integration_support import shutdown_cluster

from raftkv.localcluster import LocalCluster

pytestmark = [pytest.mark.integration]

SCRIPT = Path(sys.executable).parent / "raftkv"

REPORT_FIELDS = {
    "duration_s", "keys_moved", "bytes_moved", "client_errors", "unavailability_ms",
    "background_p99_ms_before", "background_p99_ms_during", "verified",
}
TARGETS = {"duration_s", "client_errors", "unavailability_p99_ms", "background_p99_ratio"}


def bench(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "raftkv_cli.main"]
    env = {k: v for k, v in os.environ.items() if k != "RAFTKV_CLUSTER"}
    return subprocess.run([*command, "bench", *args], capture_output=True, text=True,
                          timeout=timeout_s, env=env, stdin=subprocess.DEVNULL, check=False)


@pytest.fixture
def bench_dir(tmp_path: Path) -> Iterator[Path]:
    """The benchmark's cluster directory; whatever it left running is stopped."""
    directory = tmp_path / "bench-reshard"
    try:
        yield directory
    finally:
        if (directory / "cluster.json").exists():
            shutdown_cluster(LocalCluster(directory))


def run_reshard_bench(directory: Path, *args: str, timeout_s: float) -> dict[str, Any]:
    out = directory.parent / "report.json"
    result = bench("reshard", "--dir", str(directory), "--json", str(out), *args,
                   timeout_s=timeout_s)
    assert result.returncode == 0, result.stdout + result.stderr
    for target in ("duration (s)", "client errors", "unavailability p99 (ms)",
                   "background p99 during / before"):
        assert f"target {target}" in result.stdout, result.stdout
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def check_report(report: dict[str, Any], *, keys: int, before: int, after: int) -> None:
    assert set(report) >= REPORT_FIELDS
    assert report["reshard_state"] == "done" and report["failure"] is None
    assert report["verified"] is True, report["verification"]
    assert report["client_errors"] == 0, report["client_error_examples"]
    assert report["read_mismatches"] == 0
    assert report["verification"]["keys_checked"] == keys
    assert report["physical_shards_before"] == before
    assert report["physical_shards_after"] == after
    assert report["duration_s"] > 0
    assert 0 < report["keys_moved"] <= keys
    assert report["bytes_moved"] > report["keys_moved"] * 100  # 100-byte values, and keys
    assert report["moves"] == report["moves_total"] > 0
    assert set(report["unavailability_ms"]) == {"p50", "p99", "max"}
    assert 0 < report["unavailability_ms"]["p50"] <= report["unavailability_ms"]["p99"] \
        <= report["unavailability_ms"]["max"]
    assert report["unavailability_count"] == report["moves"]
    for window in ("before", "during", "after"):
        stats = report["background"][window]
        assert stats["ops"] > 0 and stats["reads"] > 0 and stats["writes"] > 0, stats
        assert report[f"background_p99_ms_{window}"] == stats["p99_ms"] > 0
    assert set(report["targets"]) == TARGETS
    for target in report["targets"].values():
        assert set(target) == {"value", "max", "met"}


@pytest.mark.timeout(240)
def test_a_tiny_reshard_benchmark(bench_dir: Path) -> None:
    report = run_reshard_bench(
        bench_dir, "--keys", "3000", "--from", "2", "--to", "4", "--logical-shards", "64",
        "--duration-before-s", "1", "--duration-after-s", "1", timeout_s=200)
    check_report(report, keys=3000, before=2, after=4)
    assert report["moves"] == 32  # half of the 64 logical shards change group
    cluster = LocalCluster(bench_dir)  # kept (--dir), and stopped
    assert [p for p in cluster.process_ids if cluster.pid(p) is not None] == []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_full_size_reshard_benchmark(bench_dir: Path) -> None:
    """Issue 5's benchmark: 200,000 keys, 2 -> 8 physical shards."""
    report = run_reshard_bench(bench_dir, "--keys", "200000", "--from", "2", "--to", "8",
                               timeout_s=850)
    check_report(report, keys=200_000, before=2, after=8)


@pytest.mark.timeout(30)
def test_options_of_the_ycsb_benchmark_are_refused_before_reshard() -> None:
    result = bench("--clients", "4", "reshard", "--keys", "10", timeout_s=20)
    assert result.returncode == 2
    assert "--clients belong(s) to the YCSB benchmark" in result.stderr

"""``raftkv bench ceilings``, run as the CLI in a subprocess with tiny
measurements: every result is present and measured something. The numbers
themselves are never asserted (they belong to one machine)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]

# Written out, not imported: a measurement dropped from the command fails here.
RESULT_NAMES = (
    "plyvel_write_batch_100_sync", "plyvel_put_sync", "plyvel_put_nosync",
    "raft_noop_inflight_1", "raft_noop_inflight_64", "raft_noop_inflight_1000",
    "raft_apply_inflight_1", "raft_apply_inflight_64", "raft_apply_inflight_2_x16",
)


def kill_replicas_under(directory: Path) -> list[int]:
    """SIGKILL every ceilings replica process whose files are under ``directory``
    (none should be left: the command stops them; this is the safety net)."""
    killed = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"raftkv_cli.ceiling_group" in argv and any(
                    str(directory).encode() in arg for arg in argv):
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
    return killed


@pytest.mark.timeout(90)
def test_ceilings_cli_reports_every_result(tmp_path: Path) -> None:
    out = tmp_path / "ceilings.json"
    work = tmp_path / "work"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "raftkv_cli.main", "bench", "ceilings", "--duration-s", "0.3",
             "--json", str(out), "--dir", str(work)],
            capture_output=True, text=True, timeout=80, stdin=subprocess.DEVNULL, check=False)
    finally:
        left = kill_replicas_under(work)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not left, f"replica processes left running: {left}"
    report = json.loads(out.read_text())
    assert {"time", "machine", "results"} <= set(report)
    assert report["code"]["commit"]  # the tests run from a git checkout
    by_name = {r["name"]: r for r in report["results"]}
    assert set(by_name) == set(RESULT_NAMES)
    for name in RESULT_NAMES:
        assert by_name[name]["ops_per_s"] > 0, by_name[name]
        assert name in result.stdout
    assert by_name["raft_noop_inflight_1"]["p50_ms"] > 0
    assert list(work.iterdir()) == [], "the command leaves no files behind"

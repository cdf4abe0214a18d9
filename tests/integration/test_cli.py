"""The ``raftkv`` command, run as a real subprocess against real nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raftkv.localcluster import LocalCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SCRIPT = Path(sys.executable).parent / "raftkv"


def raftkv_command() -> list[str]:
    if SCRIPT.exists():
        return [str(SCRIPT)]
    return [sys.executable, "-m", "raftkv_cli.main"]


def run(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "RAFTKV_CLUSTER"}
    return subprocess.run([*raftkv_command(), *args], capture_output=True, timeout=timeout_s,
                          env=env, stdin=subprocess.DEVNULL, check=False)


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, result.stderr.decode()
    assert lines[0].startswith("raftkv: "), lines
    return lines[0]


def test_cli_end_to_end(cluster_dir: Path) -> None:
    d = ["--cluster", str(cluster_dir)]

    up = run("up", *d)
    assert up.returncode == 0, up.stderr.decode()
    assert "3 nodes in 3 data centers, 1 physical shards with leaders" in up.stdout.decode()

    status = run("status", "--json", *d)
    assert status.returncode == 0, status.stderr.decode()
    report = json.loads(status.stdout)
    assert [n["id"] for n in report["nodes"]] == ["n1", "n2", "n3"]
    for node in report["nodes"]:
        assert set(node) >= {"id", "dc", "pid", "client_address", "alive"}
        assert node["alive"] is True
        assert isinstance(node["pid"], int)
        assert node["dc"].startswith("dc")
    assert len({n["dc"] for n in report["nodes"]}) == 3
    [shard] = report["shards"]
    assert set(shard) >= {"id", "replicas", "leader", "term", "applied_index"}
    assert shard["id"] == 1
    assert sorted(shard["replicas"]) == ["n1", "n2", "n3"]
    assert shard["leader"] in shard["replicas"]
    assert shard["term"] >= 1
    assert shard["applied_index"] >= 1
    pids = {n["id"]: n["pid"] for n in report["nodes"]}

    # put / get round trip; get prints the bare value.
    put = run("put", *d, "greeting", "hello world")
    assert put.returncode == 0, put.stderr.decode()
    assert put.stdout.decode().startswith("OK index=")
    get = run("get", *d, "greeting")
    assert get.returncode == 0, get.stderr.decode()
    assert get.stdout == b"hello world\n"
    assert get.stderr == b""
    eventual = run("get", *d, "--eventual", "greeting")
    assert eventual.returncode == 0
    assert eventual.stdout in (b"hello world\n", b"")  # may be stale on a follower

    missing = run("get", *d, "no-such-key")
    assert missing.returncode == 1
    assert missing.stdout == b""
    assert "not found" in one_error_line(missing)

    # cas --expect-absent: once ok, then a precondition failure.
    first = run("cas", *d, "lock", "--expect-absent", "--value", "me")
    assert first.returncode == 0, first.stderr.decode()
    second = run("cas", *d, "lock", "--expect-absent", "--value", "you")
    assert second.returncode == 1
    assert "precondition failed" in one_error_line(second)
    assert run("get", *d, "lock").stdout == b"me\n"
    swap = run("cas", *d, "lock", "--expect", "me", "--value", "you")
    assert swap.returncode == 0, swap.stderr.decode()
    assert run("get", *d, "lock").stdout == b"you\n"
    wrong = run("cas", *d, "lock", "--expect", "me", "--value", "again")
    assert wrong.returncode == 1
    one_error_line(wrong)

    # --hex values, including bytes that are not UTF-8.
    hexput = run("put", *d, "--hex", "bin", "00ff80fe")
    assert hexput.returncode == 0, hexput.stderr.decode()
    hexget = run("get", *d, "--hex", "bin")
    assert hexget.returncode == 0
    assert hexget.stdout == b"00ff80fe\n"
    assert run("get", *d, "bin").stdout == b"\x00\xff\x80\xfe\n"
    hexcas = run("cas", *d, "--hex", "bin", "--expect", "00ff80fe", "--value", "c0")
    assert hexcas.returncode == 0, hexcas.stderr.decode()
    assert run("get", *d, "--hex", "bin").stdout == b"c0\n"

    # --value-file / --expect-file carry arbitrary bytes.
    blob = cluster_dir / "blob.bin"
    blob.write_bytes(b"\x00bytes\xff")
    filecas = run("cas", *d, "blob", "--expect-absent", "--value-file", str(blob))
    assert filecas.returncode == 0, filecas.stderr.decode()
    assert run("get", *d, "blob").stdout == b"\x00bytes\xff\n"
    swapped = run("cas", *d, "blob", "--expect-file", str(blob), "--value", "text")
    assert swapped.returncode == 0, swapped.stderr.decode()
    assert run("get", *d, "blob").stdout == b"text\n"

    # delete: 0 if it existed, 1 if not.
    assert run("delete", *d, "lock").returncode == 0
    gone = run("delete", *d, "lock")
    assert gone.returncode == 1
    one_error_line(gone)
    assert run("get", *d, "lock").returncode == 1

    # Usage errors exit 2 and change nothing.
    for args in (["put", *d],                                   # no key
                 ["put", *d, "k"],                              # no value
                 ["cas", *d, "k", "--value", "v"],               # no --expect
                 ["cas", *d, "k", "--expect", "a", "--expect-absent", "--value", "v"],
                 ["cas", *d, "k", "--expect-absent"],            # no new value
                 ["put", *d, "--hex", "k", "zz"],               # not hex
                 ["get", *d, "k", "--no-such-option"],
                 ["no-such-command"]):
        result = run(*args)
        assert result.returncode == 2, (args, result.returncode, result.stderr.decode())
        assert result.stderr, args
    assert run("get", *d, "k").returncode == 1

    # down stops every process; status then shows no node alive and exits 3.
    down = run("down", *d)
    assert down.returncode == 0, down.stderr.decode()
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), pid
    after = run("status", "--json", *d)
    assert after.returncode == 3
    report = json.loads(after.stdout)
    assert not any(n["alive"] for n in report["nodes"])
    assert not any(s["leader"] for s in report["shards"])
    unavailable = run("get", *d, "greeting", timeout_s=60)
    assert unavailable.returncode == 3
    one_error_line(unavailable)

    # up again on the same directory: same cluster, data kept.
    again = run("up", *d)
    assert again.returncode == 0, again.stderr.decode()
    assert run("get", *d, "greeting").stdout == b"hello world\n"
    assert run("get", *d, "--hex", "bin").stdout == b"c0\n"
    assert run("get", *d, "lock").returncode == 1
    # up while it is running is harmless.
    assert run("up", *d).returncode == 0
    status = json.loads(run("status", "--json", *d).stdout)
    assert all(n["alive"] for n in status["nodes"])


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_cli_without_a_cluster(tmp_path: Path) -> None:
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    for args in (["get", "k"], ["put", "k", "v"], ["status"], ["down"]):
        result = run(*args, "--cluster", str(empty))
        assert result.returncode == 3, (args, result.returncode, result.stderr.decode())
        assert "no cluster" in one_error_line(result), args
    missing = run("get", "k", "--cluster", str(tmp_path / "does-not-exist"))
    assert missing.returncode == 3
    one_error_line(missing)


def test_cli_with_a_cluster_directory_of_another_version(tmp_path: Path) -> None:
    """One line naming the file, not a traceback; bench does not delete what it
    cannot stop."""
    old = tmp_path / "old"
    (old / "bench").mkdir(parents=True)
    for directory in (old, old / "bench"):
        (directory / "cluster.json").write_text('{"version": 1}')
        (directory / "secret").write_text("s")
    for args in (["status"], ["bench", "--clients", "1", "--physical-shards", "1"]):
        result = run(*args, "--cluster", str(old))
        assert result.returncode == 3, (args, result.stderr.decode())
        line = one_error_line(result)
        assert "cluster.json: cluster config version 1 is not supported" in line, line
    assert (old / "bench" / "cluster.json").exists()


def test_the_demo_replaces_a_demo_made_by_an_older_version(tmp_path: Path) -> None:
    """The README's first command. A previous demo whose config this version
    cannot read is still stopped (by its pid files) and replaced."""
    demo = tmp_path / "demo"
    (demo / "n1").mkdir(parents=True)
    (demo / ".raftkv-demo").write_text("created by raftkv demo\n")
    (demo / "cluster.json").write_text('{"version": 1}')
    (demo / "secret").write_text("s")
    old = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                            "raftkv_cli.main", "node", "--cluster", str(demo)])
    (demo / "n1" / "node.pid").write_text(str(old.pid))
    try:
        result = run("demo", "--dir", str(demo), "--keys", "300", "--clients", "4",
                     timeout_s=80)
        output = result.stdout.decode() + result.stderr.decode()
        assert result.returncode == 0, output
        assert old.wait(timeout=5) == -9  # the old demo's process was stopped
        assert "300/300" in output, output
    finally:
        old.kill()
        if (demo / "cluster.json").exists() and '"version": 1' not in (
                demo / "cluster.json").read_text():
            LocalCluster(demo).stop()

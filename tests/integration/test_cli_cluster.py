"""The shard-manager era of the ``raftkv`` command, as real subprocesses:
``up`` with data centers and physical shards, ``status``, ``keyspace``,
``shards``, ``import``/``export``, ``scan`` and ``fault``."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pytest
from test_cli import one_error_line, run

from raftkv.client import Client
from raftkv.localcluster import LocalCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def ok(*args: str) -> str:
    result = run(*args)
    assert result.returncode == 0, (args, result.stdout.decode(), result.stderr.decode())
    return result.stdout.decode()


def test_keyspaces_import_export_scan_and_status(cluster_dir: Path, tmp_path: Path) -> None:
    d = ["--cluster", str(cluster_dir)]
    out = ok("up", *d, "--dcs", "3", "--nodes-per-dc", "2", "--physical-shards", "4",
             "--logical-shards", "64")
    assert "6 nodes in 3 data centers, 4 physical shards with leaders" in out

    report = json.loads(ok("status", "--json", *d))
    assert [dc["id"] for dc in report["dcs"]] == ["dc1", "dc2", "dc3"]
    assert all(len(dc["nodes"]) == 2 and len(dc["managers"]) == 1 for dc in report["dcs"])
    assert report["manager"]["leader"] in {"m1", "m2", "m3"}
    assert isinstance(report["map_version"], int)
    assert sum(n["replicas"] for n in report["nodes"]) == 12
    assert sum(n["leaders"] for n in report["nodes"]) == 4
    assert all(n["alive"] and n["heartbeating"] for n in report["nodes"])
    assert len(report["shards"]) == 4
    for shard in report["shards"]:
        assert shard["keyspace"] == "default" and shard["logical_shards"] == 16
        assert shard["leader"] in shard["replicas"] and shard["keys"] == 0
        assert shard["disk_bytes"] > 0 and shard["term"] >= 1

    lines = [json.dumps({"key": f"k{i}", "value": f"v{i}"}) for i in range(500)]
    lines.append(json.dumps({"key_b64": "AP8=", "value_b64": "gIE="}))  # b"\x00\xff" -> b"\x80\x81"
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    assert "imported 501 keys" in ok("import", *d, str(source))
    report = json.loads(ok("status", "--json", *d))
    assert sum(s["keys"] for s in report["shards"]) == 501
    assert all(s["keys"] > 0 for s in report["shards"])

    exported = [json.loads(line) for line in ok("export", *d).splitlines()]
    assert sorted(map(json.dumps, exported)) == sorted(lines)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "a", "value": "b"}\n{"key": 1}\n')
    result = run("import", *d, str(bad))
    assert result.returncode == 2 and "line 2" in one_error_line(result)

    # A second keyspace, its own shards, scans within a hash tag.
    ok("keyspace", "create", *d, "users", "--physical-shards", "2", "--logical-shards", "8")
    listed = json.loads(ok("keyspace", "list", *d, "--json"))
    assert {k["name"]: k["state"] for k in listed} == {"default": "active", "users": "active"}
    ok("put", *d, "-k", "users", "{u7}:name", "grace")
    ok("put", *d, "-k", "users", "{u7}:lang", "cobol")
    assert ok("get", *d, "-k", "users", "{u7}:name") == "grace\n"
    assert run("get", *d, "{u7}:name").returncode == 1  # not in keyspace default
    scanned = [json.loads(line) for line in ok("scan", *d, "-k", "users",
                                               "--prefix", "{u7}:").splitlines()]
    assert scanned == [{"key": "{u7}:lang", "value": "cobol"},
                       {"key": "{u7}:name", "value": "grace"}]
    assert run("scan", *d, "--prefix", "nohashtag").returncode != 0
    shards = json.loads(ok("shards", *d, "-k", "users", "--json"))
    assert len(shards["logical_shards"]) == 8 and len(set(shards["logical_shards"])) == 2
    assert "0-3" in ok("shards", *d, "-k", "users")

    unknown = run("get", *d, "-k", "nope", "x")
    assert unknown.returncode == 1 and "UNKNOWN_KEYSPACE" in one_error_line(unknown)
    dup = run("keyspace", "create", *d, "users")
    assert dup.returncode == 2 and "already exists" in one_error_line(dup)
    bad_l = run("keyspace", "create", *d, "odd", "--logical-shards", "12")
    assert bad_l.returncode == 2 and "power of two" in one_error_line(bad_l)

    ok("keyspace", "drop", *d, "users", "--yes")
    deadline = time.monotonic() + 30
    while "users" in ok("keyspace", "list", *d):
        assert time.monotonic() < deadline, "dropped keyspace still listed"
        time.sleep(0.2)
    ok("down", *d)


def _put_latencies_ms(managers: list[str], count: int = 15) -> list[float]:
    with Client(managers) as kv:
        kv.put("warm", "up")
        out = []
        for i in range(count):
            started = time.perf_counter()
            kv.put(f"lat{i}", "v")
            out.append((time.perf_counter() - started) * 1000)
        return out


def test_faults_latency_and_cuts(cluster_dir: Path) -> None:
    d = ["--cluster", str(cluster_dir)]
    ok("up", *d, "--inter-dc-latency-ms", "25", "--physical-shards", "1")
    cluster = LocalCluster(cluster_dir)
    # Every replica is in its own DC: a commit needs a cross-DC round trip.
    slow = statistics.median(_put_latencies_ms(cluster.client_addresses()))
    assert 45 <= slow < 1000, slow
    assert json.loads(ok("fault", *d, "latency", "0"))["inter_dc_latency_ms"] == 0
    fast = statistics.median(_put_latencies_ms(cluster.client_addresses()))
    assert fast < slow / 2, (fast, slow)

    # Cut the leader's node off: the others elect a new leader and keep serving.
    [old] = cluster.leaders().values()
    spec = json.loads(ok("fault", *d, "cut-node", old))
    assert any(old in pair for pair in spec["cuts"])
    with Client(cluster.client_addresses(), retry_budget_s=30) as kv:
        kv.put("during-cut", "yes")
        assert kv.get("during-cut") == b"yes"
    deadline = time.monotonic() + 20
    while True:
        leaders = cluster.leaders()
        if leaders and old not in leaders.values():
            break
        assert time.monotonic() < deadline, f"{old} still leads: {leaders}"
        time.sleep(0.2)
    # A restarted process keeps its cut (the spec is saved with the cluster).
    cluster.kill_node(old)
    cluster.start_node(old)
    time.sleep(2.0)
    assert old not in cluster.leaders().values()
    ok("fault", *d, "heal")
    with Client(cluster.client_addresses(), retry_budget_s=30) as kv:
        kv.put("after-heal", "yes")
    deadline = time.monotonic() + 30
    while True:  # the healed node catches up
        statuses = cluster.statuses()
        shards = (statuses[old] or {}).get("shards", [])
        leader = cluster.leaders().get(1)
        if shards and leader and statuses[leader] and shards[0]["applied_index"] >= statuses[
                leader]["shards"][0]["commit_index"]:
            break
        assert time.monotonic() < deadline, "the healed node did not catch up"
        time.sleep(0.2)
    for args in (("cut-node", "n9"), ("cut-dc", "dc7"), ("cut-pair", "n1"), ("latency",)):
        result = run("fault", *d, *args)
        assert result.returncode == 2, (args, result.stderr.decode())
    ok("down", *d)

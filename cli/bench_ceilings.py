"""``raftkv bench ceilings``: how fast raftkv's own components go on this
machine, so raftkv's numbers can be read against them (issue 6).

One run measures, one after the other, ``duration_s`` each:

1. **LevelDB alone** (plyvel, in one process, opened with the options every
   ``Store`` uses): a WriteBatch of 100 puts with ``sync=True``, a single put
   with ``sync=True``, a single put with ``sync=False``. Keys are new each
   time (as dedup records are), values ``value_bytes`` long.
2. **One Raft group, replication alone**: 3 replica processes on 127.0.0.1
   (``ceiling_group.py``: the project's ``Replica``, journal, hub and
   settings, with a state machine that writes nothing), loaded from inside
   the leader with 1, 64 and 1,000 entries in flight, one command per entry.
3. **The same with raftkv's apply**: a fresh group whose replicas apply
   with ``apply_entry`` into LevelDB (ownership check, dedup records, one
   WriteBatch per entry), with 1 and 64 entries of one write in flight, and
   with 2 entries of 16 writes in flight: the shape the node's proposer
   gives one group under 64 clients (docs/PERFORMANCE.md).

Every result has ``name``, ``ops_per_s`` (keys, commands or writes per
second; ``unit`` says which) and, where latency was measured, ``p50_ms`` and
``p99_ms``. Group results add entries per second, the errors seen and each
process's CPU use over the measurement.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click

from raftkv.localcluster import ClusterError, free_port_range
from raftkv.storage.leveldb import open_database
from raftkv_cli.ceiling_group import SECRET_ENV
from raftkv_cli.workload import code_version, percentile

BATCH_KEYS = 100
NOSYNC_CHECK_EVERY = 1000
"""Puts between two looks at the clock, for unsynced puts (a look costs about
as much as a put)."""
LEADER_TIMEOUT_S = 30.0
ANSWER_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

# (apply, entries in flight, commands per entry), in the order they run.
GROUP_POINTS: tuple[tuple[str, int, int], ...] = (
    ("noop", 1, 1), ("noop", 64, 1), ("noop", 1000, 1),
    ("raftkv", 1, 1), ("raftkv", 64, 1), ("raftkv", 2, 16),
)


def point_name(apply: str, inflight: int, per_entry: int) -> str:
    name = f"raft_{'noop' if apply == 'noop' else 'apply'}_inflight_{inflight}"
    return name if per_entry == 1 else f"{name}_x{per_entry}"


# -- LevelDB alone --------------------------------------------------------------------

def measure_leveldb(directory: Path, duration_s: float, value_bytes: int) -> list[dict[str, Any]]:
    value = b"v" * value_bytes
    db = open_database(directory / "leveldb")
    try:
        return [_write_batches(db, duration_s, value), _puts(db, duration_s, value, sync=True),
                _puts(db, duration_s, value, sync=False)]
    finally:
        db.close()


def _write_batches(db: Any, duration_s: float, value: bytes) -> dict[str, Any]:
    latencies: list[float] = []
    n = 0
    start = time.perf_counter()
    deadline = start + duration_s
    while (sent := time.perf_counter()) < deadline:
        with db.write_batch(sync=True) as batch:
            for _ in range(BATCH_KEYS):
                batch.put(b"b%015d" % n, value)
                n += 1
        latencies.append(time.perf_counter() - sent)
    elapsed = time.perf_counter() - start
    return {"name": "plyvel_write_batch_100_sync", "ops_per_s": round(n / elapsed, 1),
            "unit": "keys", "batches_per_s": round(len(latencies) / elapsed, 1),
            **_latency(latencies)}


def _puts(db: Any, duration_s: float, value: bytes, *, sync: bool) -> dict[str, Any]:
    latencies: list[float] = []
    prefix = b"s" if sync else b"u"
    n = 0
    start = time.perf_counter()
    deadline = start + duration_s
    if sync:
        while (sent := time.perf_counter()) < deadline:
            db.put(b"%s%015d" % (prefix, n), value, sync=True)
            n += 1
            latencies.append(time.perf_counter() - sent)
    else:
        while time.perf_counter() < deadline:
            for _ in range(NOSYNC_CHECK_EVERY):
                db.put(b"%s%015d" % (prefix, n), value)
                n += 1
    elapsed = time.perf_counter() - start
    name = "plyvel_put_sync" if sync else "plyvel_put_nosync"
    return {"name": name, "ops_per_s": round(n / elapsed, 1), "unit": "keys",
            **_latency(latencies)}


def _latency(latencies_s: list[float]) -> dict[str, float]:
    if not latencies_s:
        return {}
    return {"p50_ms": round(percentile(latencies_s, 0.50) * 1000, 3),
            "p99_ms": round(percentile(latencies_s, 0.99) * 1000, 3)}


# -- one Raft group in 3 processes ------------------------------------------------------

class _Replica:
    """A ``ceiling_group`` process and its request/answer pipe."""

    def __init__(self, index: int, directory: Path, address: str, peers: list[str],
                 apply: str, secret: str) -> None:
        self.index = index
        self.log_path = directory / f"r{index}.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._answers: queue.Queue[str | None] = queue.Queue()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "raftkv_cli.ceiling_group",
             "--dir", str(directory / f"r{index}"), "--address", address,
             "--peers", ",".join(peers), "--apply", apply],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env={**os.environ, SECRET_ENV: secret})
        threading.Thread(target=self._read, name=f"ceilings-r{index}", daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._answers.put(line)
        self._answers.put(None)

    def ask(self, request: dict[str, Any], timeout_s: float = ANSWER_TIMEOUT_S) -> dict[str, Any]:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            line = self._answers.get(timeout=timeout_s)
        except queue.Empty:
            raise ClusterError(f"replica r{self.index} did not answer {request['op']!r} in "
                               f"{timeout_s} s{self._log_tail()}") from None
        except OSError as exc:
            line = None
            if self.process.poll() is None:
                raise ClusterError(f"replica r{self.index}: {exc}") from exc
        if line is None:
            raise ClusterError(f"replica r{self.index} exited (code {self.process.wait()})"
                               f"{self._log_tail()}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise ClusterError(f"replica r{self.index}: {request['op']!r} failed: "
                               f"{answer['error']}{self._log_tail()}")
        return answer

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(errors="replace").splitlines()[-15:]
            if lines:
                return "; its log ends:\n" + "\n".join(lines)
        return ""

    def stop(self) -> None:
        """Ask it to close its replica and exit; kill it if it does not."""
        with contextlib.suppress(OSError, ValueError):
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps({"op": "stop"}) + "\n")
            self.process.stdin.close()
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@contextlib.contextmanager
def _group(directory: Path, apply: str) -> Iterator[list[_Replica]]:
    """Three replica processes of one fresh group; all stopped on leaving."""
    directory.mkdir(parents=True)
    base = free_port_range("127.0.0.1", 3, set())
    addresses = [f"127.0.0.1:{base + i}" for i in range(3)]
    secret = secrets.token_hex(16)
    replicas: list[_Replica] = []
    try:
        for i, address in enumerate(addresses):
            replicas.append(_Replica(i, directory, address,
                                     [a for a in addresses if a != address], apply, secret))
        yield replicas
    finally:
        for replica in replicas:
            replica.stop()


def _wait_for_leader(replicas: list[_Replica]) -> _Replica:
    deadline = time.monotonic() + LEADER_TIMEOUT_S
    while time.monotonic() < deadline:
        leaders = [r for r in replicas if r.ask({"op": "status"})["leader"]]
        if len(leaders) == 1:
            return leaders[0]
        time.sleep(0.1)
    raise ClusterError(f"the ceilings group elected no leader in {LEADER_TIMEOUT_S} s")


def _cpu_times(replicas: list[_Replica]) -> list[tuple[float, float]]:
    """Each replica's CPU seconds so far, and when it said so (wall clock)."""
    return [(r.ask({"op": "status"})["cpu_s"], time.monotonic()) for r in replicas]


def measure_group(directory: Path, apply: str, duration_s: float,
                  value_bytes: int) -> list[dict[str, Any]]:
    results = []
    with _group(directory, apply) as replicas:
        leader = _wait_for_leader(replicas)
        leader.ask({"op": "prepare", "value_bytes": value_bytes})
        for point_apply, inflight, per_entry in GROUP_POINTS:
            if point_apply != apply:
                continue
            cpu_before = _cpu_times(replicas)
            answer = leader.ask({"op": "run", "inflight": inflight, "per_entry": per_entry,
                                 "duration_s": duration_s, "value_bytes": value_bytes},
                                timeout_s=duration_s + 2 * ANSWER_TIMEOUT_S)
            cpu_pct = [round(100 * (cpu - cpu_was) / (wall - wall_was), 1) for (cpu_was, wall_was),
                       (cpu, wall) in zip(cpu_before, _cpu_times(replicas), strict=True)]
            window_s = answer["window_s"]  # longer than asked if one latency is
            results.append({
                "name": point_name(apply, inflight, per_entry),
                "ops_per_s": round(answer["commands"] / window_s, 1),
                "unit": "commands" if apply == "noop" else "writes",
                "entries_per_s": round(answer["entries"] / window_s, 1),
                "window_s": round(window_s, 3),
                "inflight_entries": inflight, "commands_per_entry": per_entry,
                **({} if answer["p50_ms"] is None else {
                    "p50_ms": round(answer["p50_ms"], 3), "p99_ms": round(answer["p99_ms"], 3)}),
                "errors": answer["errors"], "leader_kept": answer["leader_after"],
                "cpu_pct": {"leader": cpu_pct[leader.index],
                            "followers": [p for i, p in enumerate(cpu_pct)
                                          if i != leader.index]},
            })
            _print_result(results[-1])
    return results


# -- the run ------------------------------------------------------------------------

def _print_result(r: dict[str, Any]) -> None:
    latency = (f"p50 {r['p50_ms']:>7.3f} ms  p99 {r['p99_ms']:>7.3f} ms"
               if "p50_ms" in r else " " * 33)
    extra = []
    if "batches_per_s" in r:
        extra.append(f"{r['batches_per_s']:,.0f} batches/s")
    if "entries_per_s" in r:
        extra.append(f"{r['entries_per_s']:,.0f} entries/s")
        extra.append(f"cpu leader {r['cpu_pct']['leader']:.0f}% followers "
                     + "/".join(f"{p:.0f}%" for p in r["cpu_pct"]["followers"]))
        if r["errors"]:
            extra.append(f"errors {r['errors']}")
    click.echo(f"{r['name']:<30} {r['ops_per_s']:>12,.0f} {r['unit']:<8}/s  {latency}  "
               + "  ".join(extra))


def _versions() -> dict[str, str]:
    out = {}
    for package in ("pysyncobj", "plyvel"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[package] = importlib.metadata.version(package)
    return out


def run_ceilings(duration_s: float, value_bytes: int, json_path: Path | None,
                 directory: Path | None) -> int:
    """Run every measurement; 0 if none saw an error, 1 otherwise."""
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="raftkv-ceilings-", dir=directory))
    loadavg_at_start = os.getloadavg()
    click.echo(f"raftkv bench ceilings: {duration_s} s per measurement, {value_bytes}-byte "
               f"values, files under {base}")
    try:
        results = measure_leveldb(base, duration_s, value_bytes)
        for r in results:
            _print_result(r)
        for apply in ("noop", "raftkv"):
            results += measure_group(base / f"group-{apply}", apply, duration_s, value_bytes)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    report = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "loadavg_at_start": loadavg_at_start,
                    **_versions()},
        "code": code_version(),
        "duration_s": duration_s, "value_bytes": value_bytes, "results": results,
    }
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_path}")
    return 1 if any(r.get("errors") for r in results) else 0

"""``raftkv bench reshard``: split a loaded keyspace while it serves a steady load.

One run:

1. starts a fresh local cluster (``dcs`` x ``nodes_per_dc`` nodes and the 3
   shard manager replicas) with keyspace ``default`` on ``from_shards``
   physical shards, and waits until leadership is balanced;
2. loads ``keys`` keys with ``value_bytes``-byte values: batches of one
   logical shard each, many in flight;
3. starts the resharding workers (they idle until there is a move to claim)
   and the background load: ``clients`` loops of puts and strong gets of the
   loaded keys, ``ops_per_s`` in total. Each loop owns its keys, so a strong
   read must return the loop's last acknowledged write, and every read is
   checked as it comes back;
4. measures the load for ``duration_before_s`` ("before"), asks the shard
   manager to reshard to ``to_shards`` and measures until the reshard is
   done ("during"), then for ``duration_after_s`` on the new layout
   ("after": what the new layout costs by itself);
5. stops the load and reads every key back with strong reads (a logical
   shard at a time) against its last acknowledged value;
6. prints a summary with issue 5's targets and writes JSON.

A write that fails with an indefinite error (it may have happened) counts as
a client error, and its key may hold either value from then on, until a
later write of it is acknowledged. Latency is measured per operation from
the moment it is sent; a paced loop that falls behind starts its next
operation at once rather than bursting to catch up, so a slow window shows
as fewer operations (``ops_per_s`` per window) as well as higher latency.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import trio

from raftkv.client import AsyncClient, open_client
from raftkv.config import ConfigError
from raftkv.errors import RaftKVError
from raftkv.localcluster import LocalCluster, kill_processes_of
from raftkv.protocol.messages import PutOp
from raftkv_cli.bench import wait_balanced
from raftkv_cli.reshard import start_workers, stop_workers
from raftkv_cli.workload import code_version, percentile, process_cpu_s
from shardmgr.moves import RESHARD_DONE, RESHARD_LIVE

KEYSPACE = "default"
MARKER = ".raftkv-bench-reshard"

# Issue 5, item 7: the targets on one 2-core machine.
TARGET_DURATION_S_MAX = 60.0
TARGET_UNAVAILABLE_P99_MS_MAX = 100.0
TARGET_DURING_P99_RATIO_MAX = 3.0

LOAD_BATCH_KEYS = 250
LOAD_CONCURRENCY = 16
WRITE_FRACTION = 0.5
WARMUP_S = 2.0
"""Background load and worker processes start before the "before" window."""
STATUS_POLL_S = 0.5
"""Each reshard_status is a barrier in the manager's group: poll gently."""
EXAMPLES_MAX = 10


class BenchError(Exception):
    """The benchmark could not run to its end (the message says why)."""


@dataclass(frozen=True)
class Options:
    keys: int
    from_shards: int
    to_shards: int
    value_bytes: int
    clients: int
    ops_per_s: float
    """Background operations per second in total; 0: as fast as they go."""
    workers: int
    max_moves_per_node: int
    max_keys_per_s: float | None
    duration_before_s: float
    duration_after_s: float
    """Background measurement after the reshard: the cost of the new layout
    itself, without the reshard's work."""
    dcs: int
    nodes_per_dc: int
    logical_shards: int
    timeout_s: float


def key_of(i: int) -> bytes:
    return b"k%08d" % i


def index_of(key: bytes) -> int | None:
    if len(key) != 9 or not key.startswith(b"k") or not key[1:].isdigit():
        return None
    return int(key[1:])


class KeyBook:
    """What each key may hold: its loaded value until a write of it is
    acknowledged, then that write's value. A write whose outcome is unknown
    may take effect at any later time (Jepsen's ``:info``), so from then on
    its value is allowed too, whatever is acknowledged after it."""

    def __init__(self, keys: int, value_bytes: int) -> None:
        self.keys = keys
        self.value_bytes = value_bytes
        self._acknowledged: dict[int, bytes] = {}
        self._unknown: dict[int, tuple[bytes, ...]] = {}

    def value(self, i: int, version: int) -> bytes:
        """The value of key ``i``'s ``version``-th write (0: the loaded one)."""
        head = b"%d:%d:" % (i, version)
        assert len(head) <= self.value_bytes, "values too small to be told apart"
        return head.ljust(self.value_bytes, b"v")

    def allowed(self, i: int) -> tuple[bytes, ...]:
        last = self._acknowledged.get(i)
        return (self.value(i, 0) if last is None else last, *self._unknown.get(i, ()))

    def acknowledged(self, i: int, value: bytes) -> None:
        self._acknowledged[i] = value

    def unknown(self, i: int, value: bytes) -> None:
        self._unknown[i] = (*self._unknown.get(i, ()), value)

    @property
    def rewritten(self) -> int:
        """Keys with an acknowledged write after the load."""
        return len(self._acknowledged)


@dataclass
class Window:
    """The background operations that started in one window of the run."""

    name: str
    started: float
    ended: float | None = None
    latencies_s: list[float] = field(default_factory=list)
    # Per operation, in step with latencies_s: when it started (monotonic)
    # and whether it wrote.
    started_at: list[float] = field(default_factory=list)
    wrote: list[bool] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def record(self, started: float, latency_s: float, write: bool) -> None:
        self.latencies_s.append(latency_s)
        self.started_at.append(started)
        self.wrote.append(write)

    def summary(self) -> dict[str, Any]:
        elapsed_s = (self.ended or time.monotonic()) - self.started
        lat = self.latencies_s
        writes = [t for t, w in zip(lat, self.wrote, strict=True) if w]
        reads = [t for t, w in zip(lat, self.wrote, strict=True) if not w]
        return {
            "seconds": round(elapsed_s, 3), "ops": len(lat), "reads": len(reads),
            "writes": len(writes), "ops_per_s": round(len(lat) / max(elapsed_s, 1e-9), 1),
            "p50_ms": _ms(percentile(lat, 0.50)), "p99_ms": _ms(percentile(lat, 0.99)),
            "max_ms": _ms(max(lat)) if lat else None,
            "read_p99_ms": _ms(percentile(reads, 0.99)),
            "write_p99_ms": _ms(percentile(writes, 0.99)),
            "errors": sum(self.errors.values()), "errors_by_code": dict(self.errors),
        }

    def timeline(self, step_s: float = 1.0) -> list[dict[str, Any]]:
        """Latency by the second the operations started in (from the window's start)."""
        buckets: dict[int, list[float]] = {}
        for started, latency in zip(self.started_at, self.latencies_s, strict=True):
            buckets.setdefault(int((started - self.started) // step_s), []).append(latency)
        return [{"t_s": round(b * step_s, 3), "ops": len(lat),
                 "p50_ms": _ms(percentile(lat, 0.50)), "p99_ms": _ms(percentile(lat, 0.99)),
                 "max_ms": _ms(max(lat))} for b, lat in sorted(buckets.items())]


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 3)  # NaN: no samples


class BackgroundLoad:
    """``clients`` loops of puts and strong gets, paced to ``ops_per_s`` in
    total; loop ``c`` owns the keys ``i`` with ``i % clients == c``."""

    def __init__(self, kv: AsyncClient, book: KeyBook, clients: int, ops_per_s: float) -> None:
        self.kv = kv
        self.book = book
        self.clients = clients
        self.ops_per_s = ops_per_s
        self.window = Window("warmup", time.monotonic())
        self.windows: dict[str, Window] = {}
        self._all = [self.window]
        self.read_mismatches = 0
        self.examples: list[str] = []
        self.stop = trio.Event()

    def open_window(self, name: str) -> None:
        """Operations starting from now count in window ``name``."""
        now = time.monotonic()
        self.window.ended = now
        self.window = self.windows[name] = Window(name, now)
        self._all.append(self.window)

    def close(self) -> None:
        self.window.ended = time.monotonic()

    @property
    def errors(self) -> dict[str, int]:
        """Client errors by code, over the whole run (warm-up included)."""
        out: dict[str, int] = {}
        for window in self._all:
            for code, n in window.errors.items():
                out[code] = out.get(code, 0) + n
        return out

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for c in range(min(self.clients, self.book.keys)):
                nursery.start_soon(self._loop, c)

    async def _loop(self, c: int) -> None:
        rng = random.Random(c)  # noqa: S311 - picking keys, not secrets
        own = range(c, self.book.keys, self.clients)
        interval_s = self.clients / self.ops_per_s if self.ops_per_s > 0 else 0.0
        next_at = trio.current_time() + rng.random() * interval_s
        version = 0
        while not self.stop.is_set():
            if interval_s:
                now = trio.current_time()
                if next_at > now:
                    await trio.sleep(next_at - now)
                next_at = max(next_at, now) + interval_s
            i = own[rng.randrange(len(own))]
            window = self.window  # an operation counts in the window it starts in
            if rng.random() < WRITE_FRACTION:
                version += 1
                await self._write(window, i, self.book.value(i, version))
            else:
                await self._read(window, i)

    async def _write(self, window: Window, i: int, value: bytes) -> None:
        started = time.monotonic()
        try:
            await self.kv.put(key_of(i), value)
        except RaftKVError as exc:
            self._error(window, exc, f"put {key_of(i)!r}")
            if not exc.definite:
                self.book.unknown(i, value)
            return
        window.record(started, time.monotonic() - started, write=True)
        self.book.acknowledged(i, value)

    async def _read(self, window: Window, i: int) -> None:
        started = time.monotonic()
        try:
            got = await self.kv.get(key_of(i))
        except RaftKVError as exc:
            self._error(window, exc, f"get {key_of(i)!r}")
            return
        window.record(started, time.monotonic() - started, write=False)
        if got not in self.book.allowed(i):
            self.read_mismatches += 1
            self._example(f"strong read of {key_of(i)!r} in {window.name} returned "
                          f"{_show(got)}, expected one of "
                          f"{[_show(v) for v in self.book.allowed(i)]}")

    def _error(self, window: Window, exc: RaftKVError, what: str) -> None:
        window.errors[exc.code] = window.errors.get(exc.code, 0) + 1
        self._example(f"{what} in {window.name}: {exc.code}: {exc.message}")

    def _example(self, text: str) -> None:
        if len(self.examples) < EXAMPLES_MAX:
            self.examples.append(text)


def _show(value: bytes | None) -> str:
    return "absent" if value is None else repr(value[:24])


# -- CPU per role, from /proc --------------------------------------------------------

def _proc_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    """CPU seconds every process on the machine has used (all cores), or 0."""
    try:
        ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle and iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_sample(cluster: LocalCluster,
               workers: list[subprocess.Popen[bytes]]) -> dict[str, float]:
    """CPU seconds used so far by the managers, nodes, workers, this process,
    and the whole machine (``machine``: so other jobs on it show), taken at
    ``at`` (monotonic seconds)."""
    out = {"managers": 0.0, "nodes": 0.0, "workers": 0.0, "loadgen": process_cpu_s(),
           "machine": _machine_busy_s(), "at": time.monotonic()}
    pids = [("managers", cluster.pid(m)) for m in cluster.manager_ids]
    pids += [("nodes", cluster.pid(n)) for n in cluster.node_ids]
    pids += [("workers", w.pid) for w in workers]
    for role, pid in pids:
        used = None if pid is None else _proc_cpu_s(pid)
        out[role] += used or 0.0
    return out


def cpu_pct(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Percent of one core per role between two samples (200 is both cores of
    this machine); ``other``: the machine's busy time not used by this run's
    processes (other jobs, and kernel threads such as the disk's)."""
    elapsed_s = max(after["at"] - before["at"], 1e-9)
    out = {role: round(100 * (after[role] - before[role]) / elapsed_s, 1)
           for role in before if role != "at"}
    out["other"] = round(max(0.0, out["machine"] - sum(
        v for role, v in out.items() if role != "machine")), 1)
    return out


# -- the phases of a run ---------------------------------------------------------------

async def load_keys(kv: AsyncClient, book: KeyBook) -> float:
    """Every key with its loaded value; returns the seconds it took."""
    started = time.monotonic()
    smap = await kv.shard_map()
    by_shard: dict[int, list[int]] = {}
    for i in range(book.keys):
        by_shard.setdefault(smap.logical_shard(KEYSPACE, key_of(i)), []).append(i)
    batches = [group[n:n + LOAD_BATCH_KEYS] for group in by_shard.values()
               for n in range(0, len(group), LOAD_BATCH_KEYS)]
    limiter = trio.CapacityLimiter(LOAD_CONCURRENCY)
    failed: list[RaftKVError] = []

    async def send(batch: list[int], cancel: trio.CancelScope) -> None:
        async with limiter:
            try:
                await kv.batch([PutOp(key_of(i), book.value(i, 0)) for i in batch])
            except RaftKVError as exc:
                failed.append(exc)
                cancel.cancel()

    async with trio.open_nursery() as nursery:
        for batch in batches:
            nursery.start_soon(send, batch, nursery.cancel_scope)
    if failed:
        raise BenchError(f"loading the keys failed: {failed[0].code}: {failed[0].message}")
    return time.monotonic() - started


async def state_version(kv: AsyncClient) -> int | None:
    """The newest shard manager state version any replica has applied."""
    versions = []
    for address in kv.managers:
        with contextlib.suppress(RaftKVError, OSError):
            versions.append(int((await kv.status(address))["state_version"]))
    return max(versions) if versions else None


@dataclass
class ReshardRun:
    status: dict[str, Any]
    wall_s: float
    timed_out: bool = False
    failure: str | None = None
    timeline: list[dict[str, Any]] = field(default_factory=list)


async def drive_reshard(kv: AsyncClient, options: Options,
                        workers: list[subprocess.Popen[bytes]]) -> ReshardRun:
    """Start the reshard and follow it until it ends (or fails to)."""
    started = time.monotonic()
    try:
        status = await kv.manager({"op": "reshard", "ks": KEYSPACE,
                                   "physical_shards": options.to_shards})
    except RaftKVError as exc:
        raise BenchError(f"the shard manager refused the reshard: {exc.code}: "
                         f"{exc.message}") from exc
    run = ReshardRun(status, 0.0)
    asked_s = time.monotonic() - started
    while status["state"] in RESHARD_LIVE:
        elapsed_s = time.monotonic() - started
        run.timeline.append({"t_s": round(elapsed_s, 2), "moves_done": status["moves_done"],
                             "keys": status["keys"], "phases": status["phases"],
                             "status_ms": round(asked_s * 1000, 1)})
        if status["stuck"]:
            stuck = status["stuck"][0]
            run.failure = (f"move {stuck['move']} (logical shard {stuck['ls']}) is stuck in "
                           f"{stuck['phase']}: {stuck['error']}")
            break
        if elapsed_s > options.timeout_s:
            run.timed_out = True
            run.failure = (f"the reshard did not finish within {options.timeout_s:.0f} s "
                           f"({status['moves_done']} of {status['moves_total']} moves done)")
            break
        if workers and all(w.poll() is not None for w in workers):
            run.failure = "every reshard worker exited (see reshard-worker-*.log)"
            break
        await trio.sleep(STATUS_POLL_S)
        asked = time.monotonic()
        status = await kv.manager({"op": "reshard_status", "ks": KEYSPACE})
        asked_s = time.monotonic() - asked
    run.status, run.wall_s = status, time.monotonic() - started
    if run.failure is None and status["state"] != RESHARD_DONE:
        run.failure = f"the reshard ended {status['state']}"
    return run


async def verify(kv: AsyncClient, book: KeyBook) -> dict[str, Any]:
    """Every key, read back with strong reads, against what it may hold."""
    started = time.monotonic()
    seen = bytearray(book.keys)
    wrong, unexpected = 0, 0
    examples: list[str] = []
    async for page in kv.export():
        for key, value in page:
            i = index_of(key)
            if i is None or i >= book.keys or seen[i]:
                unexpected += 1
                if len(examples) < EXAMPLES_MAX:
                    examples.append(f"unexpected key {key!r}")
                continue
            seen[i] = 1
            if value not in book.allowed(i):
                wrong += 1
                if len(examples) < EXAMPLES_MAX:
                    examples.append(f"{key!r} holds {_show(value)}, expected one of "
                                    f"{[_show(v) for v in book.allowed(i)]}")
    missing = book.keys - sum(seen)
    if missing:
        examples += [f"{key_of(i)!r} is missing" for i in range(book.keys) if not seen[i]
                     ][:EXAMPLES_MAX]
    return {"keys_checked": sum(seen), "wrong": wrong, "missing": missing,
            "unexpected": unexpected, "examples": examples,
            "seconds": round(time.monotonic() - started, 3)}


async def physical_shards_of(kv: AsyncClient) -> int:
    smap = await kv.shard_map(refresh=True, fresh=True)
    return len(set(smap.keyspace(KEYSPACE)["map"]))


@dataclass
class Measured:
    """What one run measured, before it becomes the report."""

    load_s: float = 0.0
    reshard: ReshardRun | None = None
    versions: tuple[int | None, int | None] = (None, None)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    physical_shards_after: int | None = None
    verification: dict[str, Any] = field(default_factory=dict)


async def measure(cluster: LocalCluster, options: Options, book: KeyBook,
                  load_holder: list[BackgroundLoad], measured: Measured) -> None:
    """Steps 2 to 5 of the module's doc, on a started cluster."""
    addresses = cluster.client_addresses()
    async with open_client(addresses, watch_map=False, request_timeout_s=10.0) as loader:
        measured.load_s = await load_keys(loader, book)
    click.echo(f"  loaded {options.keys:,} keys in {measured.load_s:.1f} s "
               f"({options.keys / max(measured.load_s, 1e-9):,.0f} keys/s)")
    workers = start_workers(cluster, options.workers, options.max_moves_per_node,
                            options.max_keys_per_s, log_level="INFO")
    try:
        async with open_client(addresses) as kv:
            load = BackgroundLoad(kv, book, options.clients, options.ops_per_s)
            load_holder.append(load)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load.run)
                await trio.sleep(WARMUP_S)
                load.open_window("before")
                cpu_before = cpu_sample(cluster, workers)
                await trio.sleep(options.duration_before_s)
                version_start = await state_version(kv)
                load.open_window("during")
                cpu_during = cpu_sample(cluster, workers)
                measured.reshard = await drive_reshard(kv, options, workers)
                load.open_window("after")
                cpu_after = cpu_sample(cluster, workers)
                measured.cpu = {"before": cpu_pct(cpu_before, cpu_during),
                                "during": cpu_pct(cpu_during, cpu_after)}
                measured.versions = (version_start, await state_version(kv))
                await trio.sleep(options.duration_after_s)
                load.stop.set()
                measured.cpu["after"] = cpu_pct(cpu_after, cpu_sample(cluster, workers))
            load.close()
            for window in ("before", "during", "after"):
                click.echo(f"  background {window}: "
                           f"{_line(load.windows[window].summary())}")
            measured.physical_shards_after = await physical_shards_of(kv)
    finally:
        stop_workers(workers)
    async with open_client(addresses, watch_map=False, retry_budget_s=30.0) as kv:
        measured.verification = await verify(kv, book)


def _line(s: dict[str, Any]) -> str:
    return (f"{s['ops_per_s']:.0f} ops/s, p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, "
            f"errors {s['errors']}")


# -- the report -------------------------------------------------------------------------


def _target(value: float | None, limit: float) -> dict[str, Any]:
    return {"value": value, "max": limit, "met": value is not None and value <= limit}


def report(options: Options, measured: Measured, load: BackgroundLoad,
           cluster: LocalCluster) -> dict[str, Any]:
    run = measured.reshard
    assert run is not None
    status = run.status
    finished_at = status.get("finished_at")
    duration_s = None if finished_at is None else round(finished_at - status["started_at"], 3)
    unavailable = status["unavailable_ms"]
    before, during = load.windows["before"].summary(), load.windows["during"].summary()
    errors = load.errors
    check = measured.verification
    verified = (not check["wrong"] and not check["missing"] and not check["unexpected"]
                and not load.read_mismatches)
    p99_before, p99_during = before["p99_ms"], during["p99_ms"]
    ratio = (round(p99_during / p99_before, 2)
             if p99_before and p99_during is not None else None)
    version_start, version_end = measured.versions
    return {
        "benchmark": "reshard",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "loadavg": list(os.getloadavg())},
        "code": code_version(),
        "options": asdict(options),
        "layout": {"nodes": len(cluster.node_ids), "dcs": options.dcs,
                   "shard_managers": len(cluster.manager_ids),
                   "logical_shards": options.logical_shards},
        "reshard_state": status["state"],
        "failure": run.failure,
        "duration_s": duration_s,
        "keys_moved": status["keys"],
        "bytes_moved": status["bytes"],
        "client_errors": sum(errors.values()),
        "unavailability_ms": {k: unavailable[k] for k in ("p50", "p99", "max")},
        "background_p99_ms_before": p99_before,
        "background_p99_ms_during": p99_during,
        "verified": verified,
        "background_p99_ms_after": load.windows["after"].summary()["p99_ms"],
        "client_errors_by_code": errors,
        "client_error_examples": [e for e in load.examples if "returned" not in e],
        "read_mismatches": load.read_mismatches,
        "verification": {**check, "keys_rewritten": load.book.rewritten,
                         "read_mismatch_examples": [e for e in load.examples
                                                    if "returned" in e]},
        "moves": status["moves_done"], "moves_total": status["moves_total"],
        "moves_aborted": status["moves_aborted"],
        "changelog_records": status["records"],
        "unavailability_count": unavailable["count"],
        "removed_shards": status["removed_shards"],
        "physical_shards_before": options.from_shards,
        "physical_shards_after": measured.physical_shards_after,
        "reshard_wall_s": round(run.wall_s, 3),
        "manager_state_changes": (None if None in measured.versions
                                  else int(version_end or 0) - int(version_start or 0)),
        "load_s": round(measured.load_s, 3),
        "load_keys_per_s": round(options.keys / max(measured.load_s, 1e-9), 1),
        "keys_per_s_moved": (None if not duration_s else round(status["keys"] / duration_s, 1)),
        "background": {"before": before, "during": during,
                       "after": load.windows["after"].summary()},
        "background_p99_ratio": ratio,
        "cpu_pct": measured.cpu,
        "workers": options.workers,
        "targets": {
            "duration_s": _target(duration_s, TARGET_DURATION_S_MAX),
            "client_errors": _target(sum(errors.values()), 0),
            "unavailability_p99_ms": _target(unavailable["p99"],
                                             TARGET_UNAVAILABLE_P99_MS_MAX),
            "background_p99_ratio": _target(ratio, TARGET_DURING_P99_RATIO_MAX),
        },
        "timeline": run.timeline,
        # The background's latency by second, from the start of its "during"
        # window (when the reshard was asked for).
        "background_timeline": load.windows["during"].timeline(),
    }


def print_summary(r: dict[str, Any]) -> None:
    u = r["unavailability_ms"]
    click.echo(f"reshard {r['physical_shards_before']} -> {r['physical_shards_after']} "
               f"physical shards: {r['reshard_state']} in {r['duration_s']} s; "
               f"{r['moves']} moves, {r['keys_moved']:,} keys, "
               f"{r['bytes_moved'] / 2**20:.1f} MiB, {r['changelog_records']} changelog records")
    click.echo(f"  unavailability per logical shard: p50 {u['p50']} ms, p99 {u['p99']} ms, "
               f"max {u['max']} ms")
    click.echo(f"  background p99: {r['background_p99_ms_before']} ms before, "
               f"{r['background_p99_ms_during']} ms during, "
               f"{r['background_p99_ms_after']} ms after; client errors "
               f"{r['client_errors']} {r['client_errors_by_code'] or ''}")
    cpu = r["cpu_pct"].get("during", {})
    if cpu:
        click.echo("  cpu during the reshard (% of one core): " + ", ".join(
            f"{role} {cpu[role]}" for role in ("managers", "nodes", "workers", "loadgen",
                                               "other")))
    v = r["verification"]
    click.echo(f"  verified: {r['verified']} ({v['keys_checked']:,} keys read back in "
               f"{v['seconds']} s; wrong {v['wrong']}, missing {v['missing']}, unexpected "
               f"{v['unexpected']}; read mismatches during the run {r['read_mismatches']})")
    for example in r["verification"]["examples"] + r["client_error_examples"]:
        click.echo(f"    {example}")
    names = {"duration_s": "duration (s)", "client_errors": "client errors",
             "unavailability_p99_ms": "unavailability p99 (ms)",
             "background_p99_ratio": "background p99 during / before"}
    for name, t in r["targets"].items():
        click.echo(f"  target {names[name]:<32} {t['value']!s:>10} <= {t['max']:<6} "
                   f"{'met' if t['met'] else 'MISSED'}")


# -- the cluster directory ---------------------------------------------------------------

def fresh_directory(directory: Path) -> None:
    """Make ``directory`` an empty benchmark directory, stopping and deleting a
    previous benchmark's cluster there; refuse anything else."""
    if directory.exists() and any(directory.iterdir()):
        if not (directory / MARKER).exists():
            raise click.UsageError(f"{directory} is not empty and not a directory made by "
                                   "raftkv bench reshard; give another --dir")
        if (directory / "cluster.json").exists():
            try:
                LocalCluster(directory).stop()
            except ConfigError:
                kill_processes_of(directory)
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).write_text("made by raftkv bench reshard; wiped by the next run\n")


def _messages(error: BaseException) -> list[str]:
    """The messages of every error in a (nested) exception group."""
    if isinstance(error, BaseExceptionGroup):
        return [m for e in error.exceptions for m in _messages(e)]
    if isinstance(error, RaftKVError):
        return [f"{error.code}: {error.message}"]
    return [str(error)]


def run_reshard_bench(directory: Path | None, options: Options,
                      json_path: Path | None) -> int:
    """The whole run; returns the exit code (0: verified with no client errors)."""
    temporary = directory is None
    base = Path(tempfile.mkdtemp(prefix="raftkv-bench-reshard-")) if directory is None \
        else Path(directory)
    fresh_directory(base)
    cluster = LocalCluster.create(base, dcs=options.dcs, nodes_per_dc=options.nodes_per_dc,
                                  physical_shards=options.from_shards,
                                  logical_shards=options.logical_shards)
    book = KeyBook(options.keys, options.value_bytes)
    holder: list[BackgroundLoad] = []
    measured = Measured()
    keep = not temporary
    try:
        cluster.start(timeout_s=60.0)
        leaders = wait_balanced(cluster)
        click.echo(f"raftkv bench reshard: {len(cluster.node_ids)} nodes in {options.dcs} "
                   f"data centers, {options.from_shards} -> {options.to_shards} physical "
                   f"shards ({options.logical_shards} logical), leaders per node {leaders}; "
                   f"{options.keys:,} keys of {options.value_bytes} bytes; background "
                   f"{options.clients} clients at "
                   f"{options.ops_per_s or 'unlimited'} ops/s; {options.workers} workers")
        failure = None
        try:
            trio.run(measure, cluster, options, book, holder, measured)
        except* (BenchError, RaftKVError) as group:
            failure = "; ".join(_messages(group))
        if failure is not None:
            keep = True
            click.echo(f"raftkv: {failure}; logs are in {base}", err=True)
            return 1
        result = report(options, measured, holder[0], cluster)
    finally:
        cluster.stop()
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    print_summary(result)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {json_path}")
    ok = result["verified"] and result["client_errors"] == 0 and result["failure"] is None
    if not ok and temporary:
        click.echo("raftkv: the run failed; rerun with --dir to keep the cluster's logs",
                   err=True)
    return 0 if ok else 1

"""The benchmark's load generator: one process per measured point.

``python -m raftkv_cli.loadgen`` reads a spec (one JSON object) on stdin,
runs it against one target and writes its result as one JSON line on stdout.
Running in its own process makes its CPU use (``getrusage`` of this process
over the measured window, every thread included: trio's, grpc's) exactly the
load generator's, for either target.

Spec fields: ``target`` ("raftkv" or "etcd"), ``endpoints`` (raftkv: the
shard manager addresses; etcd: every member's ``host:port``), ``mode``
("load": write keys 0..records-1 once, untimed; "run": one measured point),
``records``, ``value_bytes``, ``clients``, and for "run" ``workload``,
``distribution``, ``duration_s``, ``seed``.

The client loops, the choice of operations and keys, the timing and the
recording are the same code for both targets; only `Driver`'s two calls
differ: raftkv's SDK under trio, etcd's gRPC under asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Protocol

from raftkv_cli.workload import process_cpu_s
from raftkv_cli.ycsb import (
    READ,
    WORKLOADS,
    OpStream,
    client_seed,
    key_name,
    summarize,
)

REQUEST_TIMEOUT_S: Final = 10.0
LOAD_RETRIES: Final = 5

Job = Callable[[], Awaitable[None]]
Gather = Callable[[list[Job]], Awaitable[None]]


class OpFailed(Exception):
    """A read or update that returned an error; ``code`` names its kind
    (raftkv's error code, or the gRPC status name)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class Driver(Protocol):
    async def read(self, key: str) -> bool:
        """Linearizable read; True when the key exists. Raises OpFailed."""
        ...

    async def update(self, key: str, value: bytes) -> None:
        """Durable write. Raises OpFailed."""
        ...


@dataclass
class Recorder:
    latencies_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    reads: int = 0
    updates: int = 0
    read_misses: int = 0


async def client_loop(driver: Driver, ops: OpStream, value: bytes, deadline: float,
                      recorder: Recorder) -> None:
    """Issue operations one at a time until ``deadline`` (perf_counter)."""
    clock = time.perf_counter
    while clock() < deadline:
        op, index = ops.next()
        key = key_name(index)
        started = clock()
        try:
            if op == READ:
                found = await driver.read(key)
            else:
                await driver.update(key, value)
        except OpFailed as exc:
            recorder.errors[exc.code] = recorder.errors.get(exc.code, 0) + 1
            continue
        recorder.latencies_s.append(clock() - started)
        if op == READ:
            recorder.reads += 1
            recorder.read_misses += not found
        else:
            recorder.updates += 1


async def measure(driver: Driver, spec: dict[str, Any], gather: Gather) -> dict[str, Any]:
    """One point: ``clients`` loops for ``duration_s``, after one untimed
    read per loop (connections opened, leaders found)."""
    clients = int(spec["clients"])
    value = _value(spec)
    streams = [OpStream(WORKLOADS[spec["workload"]], spec["distribution"], int(spec["records"]),
                        client_seed(int(spec["seed"]), c)) for c in range(clients)]

    async def warm(c: int) -> None:
        with contextlib.suppress(OpFailed):
            await driver.read(key_name(c % int(spec["records"])))

    await gather([partial(warm, c) for c in range(clients)])
    recorder = Recorder()
    cpu_before, wall_before = process_cpu_s(), time.perf_counter()
    deadline = wall_before + float(spec["duration_s"])
    await gather([partial(client_loop, driver, s, value, deadline, recorder) for s in streams])
    elapsed_s, used_s = time.perf_counter() - wall_before, process_cpu_s() - cpu_before
    result: dict[str, Any] = summarize(recorder.latencies_s, recorder.errors, elapsed_s, used_s)
    result.update(reads=recorder.reads, updates=recorder.updates,
                  read_misses=recorder.read_misses)
    return result


async def load(driver: Driver, spec: dict[str, Any], gather: Gather) -> dict[str, Any]:
    """Write every key once (``clients`` loops, each key retried on error)."""
    records, clients, value = int(spec["records"]), int(spec["clients"]), _value(spec)
    failed: dict[str, int] = {}

    async def loader(c: int) -> None:
        for index in range(c, records, clients):
            for attempt in range(LOAD_RETRIES):
                try:
                    await driver.update(key_name(index), value)
                    break
                except OpFailed as exc:
                    if attempt == LOAD_RETRIES - 1:
                        failed[exc.code] = failed.get(exc.code, 0) + 1

    started = time.perf_counter()
    await gather([partial(loader, c) for c in range(clients)])
    return {"records": records, "errors": sum(failed.values()), "error_kinds": failed,
            "elapsed_s": round(time.perf_counter() - started, 3)}


def _value(spec: dict[str, Any]) -> bytes:
    # Random bytes, so that no layer gains from compressing them; the same
    # for both targets.
    return random.Random(int(spec.get("seed", 0))).randbytes(int(spec["value_bytes"]))  # noqa: S311


# --------------------------------------------------------------------------
# raftkv: the SDK under trio


class RaftKVDriver:
    """Strong (linearizable) gets and puts through one shared AsyncClient."""

    def __init__(self, client: Any) -> None:
        from raftkv.errors import RaftKVError

        self._client = client
        self._error = RaftKVError

    async def read(self, key: str) -> bool:
        try:
            return await self._client.get(key) is not None  # consistency="strong"
        except self._error as exc:
            raise OpFailed(exc.code) from exc

    async def update(self, key: str, value: bytes) -> None:
        try:
            await self._client.put(key, value)
        except self._error as exc:
            raise OpFailed(exc.code) from exc


async def _trio_gather(jobs: list[Job]) -> None:
    import trio

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(job)


async def _run_raftkv(spec: dict[str, Any]) -> dict[str, Any]:
    from raftkv.client import open_client

    async with open_client(spec["endpoints"], request_timeout_s=REQUEST_TIMEOUT_S) as client:
        driver = RaftKVDriver(client)
        if spec["mode"] == "load":
            return await load(driver, spec, _trio_gather)
        return await measure(driver, spec, _trio_gather)


# --------------------------------------------------------------------------
# etcd: native gRPC under asyncio


class EtcdDriver:
    """Linearizable ranges and puts through `EtcdKV` (round-robin over members)."""

    def __init__(self, kv: Any) -> None:
        import grpc

        self._kv = kv
        self._error = grpc.aio.AioRpcError

    async def read(self, key: str) -> bool:
        try:
            return await self._kv.get(key.encode()) is not None
        except self._error as exc:
            raise OpFailed(exc.code().name) from exc

    async def update(self, key: str, value: bytes) -> None:
        try:
            await self._kv.put(key.encode(), value)
        except self._error as exc:
            raise OpFailed(exc.code().name) from exc


async def _asyncio_gather(jobs: list[Job]) -> None:
    await asyncio.gather(*(job() for job in jobs))


async def _run_etcd(spec: dict[str, Any]) -> dict[str, Any]:
    from raftkv_cli.etcd_grpc import EtcdKV

    kv = EtcdKV(spec["endpoints"], request_timeout_s=REQUEST_TIMEOUT_S)
    try:
        driver = EtcdDriver(kv)
        if spec["mode"] == "load":
            return await load(driver, spec, _asyncio_gather)
        return await measure(driver, spec, _asyncio_gather)
    finally:
        await kv.close()


def run(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["target"] == "raftkv":
        import trio

        result: dict[str, Any] = trio.run(_run_raftkv, spec)
        return result
    if spec["target"] == "etcd":
        return asyncio.run(_run_etcd(spec))
    raise ValueError(f"unknown target {spec['target']!r}")


def main() -> None:
    spec = json.loads(sys.stdin.read())
    print(json.dumps(run(spec)), flush=True)


if __name__ == "__main__":
    main()

"""One replica of ``raftkv bench ceilings``' Raft group, as its own process,
and the driver that loads the group from inside its leader.

``raftkv bench ceilings`` (``bench_ceilings.py``) starts three of these on
127.0.0.1::

    python -m raftkv_cli.ceiling_group --dir D --address A --peers B,C --apply noop|raftkv

Each runs the project's own ``Replica``: the same code, journal and settings
as a node's replica (``RaftSettings()`` defaults, the ``DurableJournal``
with every ack sent only after its fdatasync, a ``RaftHub`` of its own as a
node has, AES-GCM Raft traffic, the node's GIL switch interval). Nothing is
mocked; what is left out is the node server (trio, client RPCs, the
proposer) and the shard manager. ``--apply noop`` replaces the state
machine with one that writes nothing (so the numbers are replication's
alone); ``--apply raftkv`` keeps ``apply_entry`` over LevelDB.

The parent talks to it with one JSON object per line on stdin, and one
answer per line on stdout (``{"error": ...}`` if a request failed):

- ``{"op": "status"}`` -> ``{"leader": bool, "cpu_s": float}``, ``cpu_s``
  being this process's CPU time so far (every thread);
- ``{"op": "prepare", "value_bytes": v}`` (leader only): one entry committed
  before anything is timed; with ``--apply raftkv`` it is the ``own`` command
  a new group gets from the shard manager, so writes find an owner;
- ``{"op": "run", "inflight": n, "per_entry": k, "duration_s": d,
  "value_bytes": v}`` (leader only): see ``Driver``; answers its counts
  and ``window_s``, the time they are over;
- ``{"op": "stop"}``, or the end of stdin (the parent died): the replica is
  closed and the process exits.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raftkv.errors import RaftKVError
from raftkv.replication.replica import Replica
from raftkv.server.node import GIL_SWITCH_INTERVAL_S
from raftkv.sharding import logical_shard
from raftkv.statemachine.apply import ApplyFn, ApplyOutput, StateView, apply_entry
from raftkv.statemachine.commands import PUT, Mutation, Own, Write, encode_commands
from raftkv_cli.workload import percentile, process_cpu_s

SECRET_ENV = "RAFTKV_CEILINGS_SECRET"  # noqa: S105 - the variable's name; the value is random
KEYSPACE, KEYSPACE_ID, LOGICAL_SHARDS = "default", 1, 256
DRAIN_TIMEOUT_S = 30.0
"""How long a run waits, after its deadline, for the entries still in flight."""


def apply_nothing(_view: StateView, _index: int, _payload: bytes) -> ApplyOutput:
    """The no-op state machine: nothing to write (the Replica still writes one
    empty LevelDB batch per entry, a few microseconds, unsynced)."""
    return ApplyOutput()


APPLY_FNS: dict[str, ApplyFn] = {"noop": apply_nothing, "raftkv": apply_entry}


class Writes:
    """Entries as the node's proposer builds them: ``per_entry`` client writes
    of one put each, from distinct clients, each client with its own
    sequence numbers (so dedup records are written and trimmed as for real
    clients). Each client cycles over 1,000 keys of its own (the form of
    ``raftkv bench``'s keys before its YCSB workloads)."""

    def __init__(self, run: int, per_entry: int, value_bytes: int) -> None:
        self.run = run
        self.per_entry = per_entry
        self.value = b"v" * value_bytes
        self.seqs: dict[int, int] = {}

    def __call__(self, slot: int) -> bytes:
        commands: list[Any] = []
        for position in range(self.per_entry):
            client = slot * self.per_entry + position
            seq = self.seqs[client] = self.seqs.get(client, 0) + 1
            key = b"bench-%d-%d" % (client, seq % 1000)
            client_id = self.run.to_bytes(4, "big") + client.to_bytes(12, "big")
            put = Mutation(PUT, logical_shard(KEYSPACE, key, LOGICAL_SHARDS), key, self.value)
            commands.append(Write(KEYSPACE_ID, client_id, seq, seq - 1, (put,)))
        return encode_commands(commands)


def result_error(result: Any) -> str | None:
    """The error code in an applied entry's result, if any (the no-op
    state machine answers None)."""
    if isinstance(result, dict) and "error" in result:
        return "APPLY_ERROR"
    if isinstance(result, list):
        for answer in result:
            if isinstance(answer, dict) and "err" in answer:
                return str(answer["err"])
    return None


class Driver:
    """Keeps ``inflight`` entries proposed on the leader for ``duration_s``.

    Everything runs on the Raft (hub) thread: the run starts there, and each
    completed entry (committed, and applied on this leader) proposes the next
    one from its callback, so the client side costs no thread hand-off. A
    failed entry is counted and not replaced. The rate counts entries
    completed before the deadline; latency is from the proposal to the
    callback, for those same entries. The window (``window_s``) is
    ``duration_s``, or three times the first entry's latency if that is
    longer: with many entries in flight, a window shorter than one latency
    would count nothing.
    """

    def __init__(self, replica: Replica, payload: Callable[[int], bytes], inflight: int,
                 duration_s: float) -> None:
        self._replica = replica
        self._payload = payload
        self._inflight = inflight
        self._duration_s = duration_s
        self._deadline = float("inf")
        self._outstanding = 0
        self._starting = True
        self._finished = threading.Event()
        self.started = 0.0
        self.window_s = duration_s
        self.completed = 0
        self.latencies_s: list[float] = []
        self.errors: dict[str, int] = {}

    def run(self) -> None:
        self._replica.hub.call_soon(self._start)
        begun = time.perf_counter()
        while not self._finished.wait(0.05):
            if time.perf_counter() - begun > self.window_s + DRAIN_TIMEOUT_S:
                raise TimeoutError(f"{self._outstanding} entries still in flight "
                                   f"{DRAIN_TIMEOUT_S} s after the deadline")

    def _start(self) -> None:
        self.started = time.perf_counter()
        self._deadline = self.started + self._duration_s
        for slot in range(self._inflight):
            self._submit(slot)
        self._starting = False
        if self._outstanding == 0:
            self._finished.set()

    def _submit(self, slot: int) -> None:
        self._outstanding += 1
        self._replica.submit(self._payload(slot),
                             functools.partial(self._done, slot, time.perf_counter()))

    def _done(self, slot: int, sent: float, result: Any, error: RaftKVError | None) -> None:
        now = time.perf_counter()
        self._outstanding -= 1
        code = error.code if error is not None else result_error(result)
        if not self.completed and code is None:
            self.window_s = max(self._duration_s, 3 * (now - self.started))
            self._deadline = self.started + self.window_s
        if code is not None:
            self.errors[code] = self.errors.get(code, 0) + 1
        elif now <= self._deadline:
            self.completed += 1
            self.latencies_s.append(now - sent)
            self._submit(slot)
        if self._outstanding == 0 and not self._starting:
            self._finished.set()


def wait_for_entry(replica: Replica, payload: bytes, timeout_s: float = 10.0) -> None:
    """Propose one entry and wait until it is applied here (or raise)."""
    done = threading.Event()
    outcome: list[str | None] = []

    def on_done(result: Any, error: RaftKVError | None) -> None:
        outcome.append(error.code if error is not None else result_error(result))
        done.set()

    replica.submit(payload, on_done)
    if not done.wait(timeout_s):
        raise TimeoutError(f"an entry was not applied in {timeout_s} s")
    if outcome[0] is not None:
        raise RuntimeError(f"the entry failed: {outcome[0]}")


class Member:
    """This process's replica, and the answers to the parent's requests."""

    def __init__(self, replica: Replica, apply: str) -> None:
        self.replica = replica
        self.apply = apply
        self.runs = 0

    def status(self, _request: dict[str, Any]) -> dict[str, Any]:
        return {"leader": self.replica.is_leader, "cpu_s": process_cpu_s()}

    def prepare(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.apply == "raftkv":
            payload = encode_commands([Own(KEYSPACE_ID, KEYSPACE, LOGICAL_SHARDS,
                                           tuple(range(LOGICAL_SHARDS)))])
        else:
            payload = b"v" * int(request["value_bytes"])
        wait_for_entry(self.replica, payload)
        return {"ok": True}

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        self.runs += 1
        value_bytes = int(request["value_bytes"])
        per_entry = int(request["per_entry"])
        if self.apply == "raftkv":
            payload: Callable[[int], bytes] = Writes(self.runs, per_entry, value_bytes)
        else:
            entry = b"v" * value_bytes
            payload = lambda _slot: entry  # noqa: E731 - one constant entry
        driver = Driver(self.replica, payload, int(request["inflight"]),
                        float(request["duration_s"]))
        driver.run()
        latencies = driver.latencies_s
        return {"entries": driver.completed, "commands": driver.completed * per_entry,
                "window_s": driver.window_s,
                "p50_ms": percentile(latencies, 0.50) * 1000 if latencies else None,
                "p99_ms": percentile(latencies, 0.99) * 1000 if latencies else None,
                "errors": driver.errors, "leader_after": self.replica.is_leader}


def serve(member: Member) -> None:
    handlers = {"status": member.status, "prepare": member.prepare, "run": member.run}
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "stop":
            return
        try:
            answer = handlers[request["op"]](request)
        except Exception as exc:
            logging.getLogger(__name__).exception("request %r failed", request)
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--address", required=True, help="this replica's host:port")
    parser.add_argument("--peers", required=True, help="the other replicas, comma-separated")
    parser.add_argument("--apply", choices=sorted(APPLY_FNS), required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s {args.address} %(levelname)s %(name)s: %(message)s")
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # as in a node process
    replica = Replica(0, args.dir, args.address, args.peers.split(","),
                      os.environ[SECRET_ENV], apply_fn=APPLY_FNS[args.apply])
    try:
        serve(Member(replica, args.apply))
    finally:
        replica.destroy()


if __name__ == "__main__":
    main()

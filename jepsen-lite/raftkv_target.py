"""raftkv as a system under test: clients over the SDK, faults over
``LocalCluster`` (signals to processes, and the fault layer of DESIGN
section 8 for partitions), and resharding through the shard manager.

Registers are keys of keyspace ``default`` holding decimal strings. Set
elements are keys ``{setB}:<element>`` in 8 hash-tag buckets (so a strong
scan per bucket reads them all).

The ``reshard`` fault splits or merges that keyspace while the clients use
it: the target runs ``raftkv reshard-worker`` processes for the whole run
(``start`` / ``close``), ``inject`` asks the shard manager to reshard to the
target's physical shard count and returns once the manager has accepted
(the moves go on without the nemesis), and ``heal`` waits for the reshard to
end. The two counts the nemesis alternates between are the keyspace's count
at the start and twice that (half when twice is more than the logical
shards), unless given.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from jepsen_lite.target import Completion, FaultError, Op
from raftkv.client import open_client
from raftkv.client.client import AsyncClient
from raftkv.errors import BadRequest, PreconditionFailed, RaftKVError
from raftkv.localcluster import ClusterError, LocalCluster
from raftkv.protocol.framing import FrameTooLarge
from raftkv_cli.reshard import start_workers, stop_workers

log = logging.getLogger(__name__)

SET_BUCKETS = 8
READ_CONSISTENCIES = ("strong", "eventual")
KEYSPACE = "default"  # the keyspace the workloads use, and the one resharded
RESHARD_POLL_S = 0.25  # how often heal asks how the reshard is going
RESHARD_RETRY_S = 0.5  # between attempts at a reshard request
# Phrases of the manager's refusals (BAD_REQUEST) of a reshard request.
_BUSY = "already being resharded"  # another reshard runs: skip this one
_TOO_FEW_LIVE = "live nodes"  # a restarted node has not heartbeat yet: try again
_ENDED = ("done", "aborted")
# What a request to the cluster may raise. FrameTooLarge: a NOT_LEADER hint
# that names a Raft address (a proposal that failed in the manager's group
# answers with the leader's Raft address, not its client address), so the
# request went to a Raft hub, whose hello is no frame of ours.
_REQUEST_ERRORS = (ClusterError, OSError, RaftKVError, ValueError, FrameTooLarge)


def set_key(element: int) -> str:
    return f"{{set{element % SET_BUCKETS}}}:{element}"


def _shard_count(target: str) -> int:
    """``shards:4`` (a reshard's target) -> 4."""
    what, _, count = target.partition(":")
    if what != "shards" or not count.isdigit():
        raise ValueError(f"unknown reshard target {target!r} (expected shards:N)")
    return int(count)


class RaftkvClient:
    def __init__(self, kv: AsyncClient, read_consistency: str) -> None:
        self._kv = kv
        self._read_consistency = read_consistency

    async def invoke(self, op: Op) -> Completion:
        try:
            return await self._invoke(op)
        except PreconditionFailed:
            return Completion("fail")  # the compare ran and was false
        except RaftKVError as exc:
            return Completion("fail" if exc.definite else "info", error=str(exc))

    async def _invoke(self, op: Op) -> Completion:
        if op.f == "read":
            assert op.key is not None
            raw = await self._kv.get(op.key, consistency=self._read_consistency)
            return Completion("ok", None if raw is None else int(raw))
        if op.f == "write":
            assert op.key is not None
            await self._kv.put(op.key, str(op.value))
            return Completion("ok", op.value)
        if op.f == "cas":
            assert op.key is not None
            expected, new = op.value
            await self._kv.cas(op.key, None if expected is None else str(expected), str(new))
            return Completion("ok", [expected, new])
        if op.f == "add":
            await self._kv.put(set_key(op.value), b"1")
            return Completion("ok", op.value)
        if op.f == "read-set":
            elements: list[int] = []
            for bucket in range(SET_BUCKETS):
                pairs = await self._kv.scan(f"{{set{bucket}}}:")
                elements += [int(key.split(b":", 1)[1]) for key, _ in pairs]
            return Completion("ok", sorted(elements))
        raise ValueError(f"raftkv target: unknown operation {op.f!r}")


@dataclass(frozen=True)
class ReshardOptions:
    """How the ``reshard`` fault runs.

    ``shard_counts``: the two physical shard counts to alternate between
    (None: the keyspace's count at ``start`` and twice that). ``workers``:
    worker processes for the run, each allowed ``per_node_max`` moves at once
    touching one node. A request the manager refuses for want of live nodes,
    or does not answer, is tried again for ``request_budget_s``; ``heal``
    waits ``finish_timeout_s`` at most for the reshard to end."""

    shard_counts: tuple[int, int] | None = None
    workers: int = 2
    per_node_max: int = 4
    request_budget_s: float = 10.0
    finish_timeout_s: float = 120.0


class RaftkvTarget:
    """A running ``LocalCluster``. ``read_consistency="eventual"`` reads from any
    replica: deliberately not linearizable, to show the checker catches it.
    With ``reshard`` options, ``start`` must be called before the run (it
    starts the resharding workers) and ``close`` after it, also on failure."""

    name = "raftkv"

    def __init__(self, cluster: LocalCluster, *, read_consistency: str = "strong",
                 request_timeout_s: float = 1.0, retry_budget_s: float = 4.0,
                 reshard: ReshardOptions | None = None) -> None:
        if read_consistency not in READ_CONSISTENCIES:
            raise ValueError(f"read consistency must be one of {READ_CONSISTENCIES}")
        self.cluster = cluster
        self.read_consistency = read_consistency
        self.request_timeout_s = request_timeout_s
        self.retry_budget_s = retry_budget_s
        self.reshard = reshard
        self._killed_manager: str | None = None
        self._workers: list[subprocess.Popen[bytes]] = []
        self._shard_counts: tuple[int, int] | None = None
        self._reshard_turns: list[str] = []
        self._lock = threading.Lock()  # inject and heal run in worker threads
        self._reshards: list[dict[str, Any]] = []  # what each accepted request became

    def start(self) -> None:
        """Find the shard counts to alternate between and start the resharding
        workers (nothing without ``reshard`` options). Raises ClusterError."""
        if self.reshard is None:
            return
        keyspace = self._keyspace()
        now, logical = len(set(keyspace["logical_map"])), keyspace["logical_shards"]
        counts = self.reshard.shard_counts or (
            (now, 2 * now) if 2 * now <= logical else (now, now // 2))
        if min(counts) < 1 or max(counts) > logical or counts[0] == counts[1]:
            raise ClusterError(f"cannot reshard keyspace {KEYSPACE!r} ({logical} logical "
                               f"shards) between {counts[0]} and {counts[1]} physical shards")
        self._shard_counts = counts
        # Taken in turn by the nemesis: away from the count now, then back.
        turns = [counts[1], counts[0]] if now == counts[0] else [counts[0], counts[1]]
        self._reshard_turns = [f"shards:{count}" for count in turns]
        self._workers = start_workers(self.cluster, self.reshard.workers,
                                      self.reshard.per_node_max)

    def close(self) -> None:
        """Stop the resharding workers (a reshard in flight stays where it is)."""
        workers, self._workers = self._workers, []
        stop_workers(workers)

    def client(self, process: int) -> AbstractAsyncContextManager[RaftkvClient]:
        return self._client()

    @contextlib.asynccontextmanager
    async def _client(self) -> AsyncIterator[RaftkvClient]:
        async with open_client(self.cluster.client_addresses(), keyspace=KEYSPACE,
                               watch_map=False, request_timeout_s=self.request_timeout_s,
                               retry_budget_s=self.retry_budget_s) as kv:
            yield RaftkvClient(kv, self.read_consistency)

    def summary(self) -> dict[str, Any]:
        """``reshards``: the requests the manager accepted (``count``), how many
        ended ``done`` with moves (``completed``), and each one's figures."""
        if self.reshard is None:
            return {}
        with self._lock:
            each = [dict(r) for r in self._reshards]
        return {"reshards": {
            "keyspace": KEYSPACE, "shard_counts": list(self._shard_counts or ()),
            "workers": self.reshard.workers, "count": len(each),
            "completed": sum(1 for r in each if r["state"] == "done" and r["moves"] > 0),
            "each": each}}

    # -- faults --------------------------------------------------------------------

    def nemesis_targets(self) -> dict[str, list[str]]:
        nodes = self.cluster.node_ids
        dcs = sorted({self.cluster.config.dc_of(n) for n in nodes})
        # A node alone, or a whole data center (its nodes and its shard manager
        # replica): a minority either way, with or without the leader.
        partitions = [f"node:{n}" for n in nodes] + [f"dc:{dc}" for dc in dcs]
        targets = {"kill": nodes, "pause": nodes, "partition": partitions,
                   "manager": ["leader"]}
        if self._reshard_turns:
            targets["reshard"] = list(self._reshard_turns)
        return targets

    def inject(self, kind: str, target: str) -> str:
        try:
            return self._inject(kind, target)
        except _REQUEST_ERRORS as exc:
            raise FaultError(f"{kind} {target}: {exc}") from exc

    def heal(self, kind: str, target: str) -> str:
        try:
            return self._heal(kind, target)
        except _REQUEST_ERRORS as exc:
            raise FaultError(f"healing {kind} {target}: {exc}") from exc

    def _inject(self, kind: str, target: str) -> str:
        if kind == "reshard":
            return self._request_reshard(_shard_count(target))
        if kind == "kill":
            self.cluster.kill_node(target)
            return f"kill -9 {target}"
        if kind == "pause":
            self.cluster.pause_node(target)
            return f"SIGSTOP {target}"
        if kind == "partition":
            members = self._partition_members(target)
            everyone = self.cluster.config.process_ids
            spec = self.cluster.fault_spec().isolate(members, everyone)
            missed = self.cluster.set_fault_spec(spec)
            return f"isolate {','.join(members)}" + (
                f" (not told: {','.join(missed)})" if missed else "")
        if kind == "manager":
            leader = self.cluster.manager_leader()
            if leader is None:
                raise FaultError("manager: no shard manager leader to kill")
            self.cluster.kill_node(leader)
            self._killed_manager = leader
            return f"kill -9 shard manager leader {leader}"
        raise FaultError(f"raftkv target: unknown fault {kind!r}")

    def _heal(self, kind: str, target: str) -> str:
        if kind == "reshard":
            return self._await_reshard(_shard_count(target))
        if kind == "kill":
            self.cluster.start_node(target)
            return f"restart {target}"
        if kind == "pause":
            self.cluster.resume_node(target)
            return f"SIGCONT {target}"
        if kind == "partition":
            missed = self.cluster.set_fault_spec(self.cluster.fault_spec().heal())
            return "heal" + (f" (not told: {','.join(missed)})" if missed else "")
        if kind == "manager":
            if self._killed_manager is None:
                return "nothing to restart"
            manager, self._killed_manager = self._killed_manager, None
            self.cluster.start_node(manager)
            return f"restart {manager}"
        raise FaultError(f"raftkv target: unknown fault {kind!r}")

    def _partition_members(self, target: str) -> list[str]:
        what, _, name = target.partition(":")
        config = self.cluster.config
        if what == "node" and name in config.process_ids:
            return [name]
        if what == "dc":
            members = [p for p in config.process_ids if config.dc_of(p) == name]
            if members:
                return members
        raise ValueError(f"unknown partition target {target!r}")

    # -- resharding ------------------------------------------------------------------

    def _keyspace(self) -> dict[str, Any]:
        view = self.cluster.manager({"op": "cluster"})
        for keyspace in view["state"]["keyspaces"]:
            if keyspace["name"] == KEYSPACE:
                found: dict[str, Any] = keyspace
                return found
        raise ClusterError(f"the cluster has no keyspace {KEYSPACE!r}")

    def _request_reshard(self, count: int) -> str:
        """Ask the manager to reshard to ``count`` physical shards; return once
        it accepted. FaultError ``skipped: ...`` if another reshard runs."""
        if self.reshard is None:
            raise FaultError("reshard: the target was made without reshard options")
        if self._workers and all(w.poll() is not None for w in self._workers):
            raise FaultError(f"every reshard worker exited; see {self.cluster.directory}/"
                             "reshard-worker-*.log")
        deadline = time.monotonic() + self.reshard.request_budget_s
        while True:
            try:
                status = self.cluster.manager({"op": "reshard", "ks": KEYSPACE,
                                               "physical_shards": count})
                break
            except BadRequest as exc:
                if _BUSY in exc.message:
                    raise FaultError(f"skipped: {exc.message}") from exc
                if _TOO_FEW_LIVE not in exc.message or time.monotonic() > deadline:
                    raise
            except _REQUEST_ERRORS as exc:
                log.warning("reshard request to %d shards: %r", count, exc)
                if time.monotonic() > deadline:
                    raise
            time.sleep(RESHARD_RETRY_S)
        record = {"id": status["id"], "from": len(status["before"]), "to": count,
                  "state": status["state"], "moves": status["moves_total"],
                  "started_at": status["started_at"]}
        with self._lock:
            self._reshards.append(record)
        return (f"reshard {status['id']} of {KEYSPACE}: {len(status['before'])} -> {count} "
                f"physical shards, {status['moves_total']} moves")

    def _await_reshard(self, count: int) -> str:
        """Wait for the latest reshard (to ``count``) to end; what it did."""
        assert self.reshard is not None
        with self._lock:
            mine = [r for r in self._reshards if r["to"] == count]
        if not mine:
            return "nothing to wait for"
        record = mine[-1]
        deadline = time.monotonic() + self.reshard.finish_timeout_s
        status: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            try:
                status = self.cluster.manager({"op": "reshard_status", "ks": KEYSPACE})
            except _REQUEST_ERRORS as exc:
                log.warning("reshard %s status: %r", record["id"], exc)
                status = None  # the manager is failing over: ask again
            if status is not None and status["id"] == record["id"]:
                self._note(record, status)
                if status["state"] in _ENDED:
                    return (f"{status['state']} in {record.get('duration_s', -1):.1f} s: "
                            f"{status['moves_done']} moves ({status['keys']} keys), "
                            f"{status['moves_aborted']} aborted; cutover max "
                            f"{status['unavailable_ms']['max']} ms")
                if status["stuck"]:
                    raise FaultError(f"reshard {record['id']}: moves need an operator: "
                                     f"{status['stuck']}")
            elif status is not None and status["id"] > record["id"]:
                raise FaultError(f"reshard {record['id']} was replaced by {status['id']}")
            if self._workers and all(w.poll() is not None for w in self._workers):
                raise FaultError(f"every reshard worker exited; see {self.cluster.directory}/"
                                 "reshard-worker-*.log")
            time.sleep(RESHARD_POLL_S)
        raise FaultError(f"reshard {record['id']} did not end within "
                         f"{self.reshard.finish_timeout_s:g} s: {record}")

    def _note(self, record: dict[str, Any], status: dict[str, Any]) -> None:
        with self._lock:
            record.update(state=status["state"], moves=status["moves_total"],
                          moves_done=status["moves_done"],
                          moves_aborted=status["moves_aborted"], keys=status["keys"],
                          records=status["records"], stuck=status["stuck"],
                          unavailable_ms=status["unavailable_ms"],
                          removed_shards=status["removed_shards"])
            if status.get("finished_at") is not None:
                record["duration_s"] = round(status["finished_at"] - status["started_at"], 3)

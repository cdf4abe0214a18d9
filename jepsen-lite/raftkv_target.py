"""raftkv as a system under test: clients over the SDK, faults over
``LocalCluster`` (signals to processes, and the fault layer of DESIGN
section 8 for partitions).

Registers are keys of keyspace ``default`` holding decimal strings. Set
elements are keys ``{setB}:<element>`` in 8 hash-tag buckets (so a strong
scan per bucket reads them all).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

from jepsen_lite.target import Completion, FaultError, Op
from raftkv.client import open_client
from raftkv.client.client import AsyncClient
from raftkv.errors import PreconditionFailed, RaftKVError
from raftkv.localcluster import ClusterError, LocalCluster

SET_BUCKETS = 8
READ_CONSISTENCIES = ("strong", "eventual")


def set_key(element: int) -> str:
    return f"{{set{element % SET_BUCKETS}}}:{element}"


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


class RaftkvTarget:
    """A running ``LocalCluster``. ``read_consistency="eventual"`` reads from any
    replica: deliberately not linearizable, to show the checker catches it."""

    name = "raftkv"

    def __init__(self, cluster: LocalCluster, *, read_consistency: str = "strong",
                 request_timeout_s: float = 1.0, retry_budget_s: float = 4.0) -> None:
        if read_consistency not in READ_CONSISTENCIES:
            raise ValueError(f"read consistency must be one of {READ_CONSISTENCIES}")
        self.cluster = cluster
        self.read_consistency = read_consistency
        self.request_timeout_s = request_timeout_s
        self.retry_budget_s = retry_budget_s
        self._killed_manager: str | None = None

    def client(self, process: int) -> AbstractAsyncContextManager[RaftkvClient]:
        return self._client()

    @contextlib.asynccontextmanager
    async def _client(self) -> AsyncIterator[RaftkvClient]:
        async with open_client(self.cluster.client_addresses(), watch_map=False,
                               request_timeout_s=self.request_timeout_s,
                               retry_budget_s=self.retry_budget_s) as kv:
            yield RaftkvClient(kv, self.read_consistency)

    # -- faults --------------------------------------------------------------------

    def nemesis_targets(self) -> dict[str, list[str]]:
        nodes = self.cluster.node_ids
        dcs = sorted({self.cluster.config.dc_of(n) for n in nodes})
        # A node alone, or a whole data center (its nodes and its shard manager
        # replica): a minority either way, with or without the leader.
        partitions = [f"node:{n}" for n in nodes] + [f"dc:{dc}" for dc in dcs]
        return {"kill": nodes, "pause": nodes, "partition": partitions,
                "manager": ["leader"]}

    def inject(self, kind: str, target: str) -> str:
        try:
            return self._inject(kind, target)
        except (ClusterError, OSError, RaftKVError, ValueError) as exc:
            raise FaultError(f"{kind} {target}: {exc}") from exc

    def heal(self, kind: str, target: str) -> str:
        try:
            return self._heal(kind, target)
        except (ClusterError, OSError, RaftKVError, ValueError) as exc:
            raise FaultError(f"healing {kind} {target}: {exc}") from exc

    def _inject(self, kind: str, target: str) -> str:
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

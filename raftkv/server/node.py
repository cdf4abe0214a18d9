"""The node process: hosts the replicas the shard manager assigns, serves clients.

A node registers with the shard manager and heartbeats every
``HEARTBEAT_PERIOD_S``; each reply lists the replicas the node must host. The
node opens the ones it lacks (writing a descriptor first, so a restart reopens
them from disk before the manager is even reachable) and closes and deletes
the ones the manager has removed.

Requests name a physical shard; the node answers from that shard's replica.
Writes and strong reads are served by the leader (NOT_LEADER with a hint
otherwise). The keyspace name is resolved through the group's own replicated
keyspace records, and ownership of the logical shard is checked when the op
is applied (writes) or right after the read (reads), never from a cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import trio

from raftkv import config as configmod
from raftkv.client.client import ConnectionPool
from raftkv.errors import (
    BadRequest,
    NotLeader,
    OutcomeUnknown,
    PreconditionFailed,
    RaftKVError,
    ShardMoving,
    Unavailable,
    UnknownShard,
    WrongShard,
)
from raftkv.faults import FAULTS_NAME, FaultSpec
from raftkv.protocol.messages import (
    DEFAULT_LIMITS,
    CasOp,
    DeleteOp,
    DropRequest,
    FaultRequest,
    GetRequest,
    Limits,
    MoveReadRequest,
    MoveRequest,
    OwnRequest,
    PingRequest,
    PutOp,
    Request,
    ScanRequest,
    StatusRequest,
    TransferRequest,
    WriteRequest,
    decode_request,
)
from raftkv.replication.hub import RaftHub, Relay
from raftkv.replication.journal import NodeLog
from raftkv.replication.replica import Replica
from raftkv.server.collector import CollectorStats, tune_collector
from raftkv.server.proposer import OnDone, Proposer
from raftkv.server.rpc import RpcServer
from raftkv.sharding import logical_shard, shard_key
from raftkv.statemachine import layout, moves
from raftkv.statemachine.commands import CAS, DELETE, PUT, DropKeyspace, Mutation, Own, Write
from raftkv.storage.leveldb import write_file_durably

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0
HEARTBEAT_PERIOD_S = 0.5
DESCRIPTOR_NAME = "replica.json"
# The trio thread and pysyncobj's Raft thread share the GIL; at CPython's
# default 5 ms switch interval a busy trio loop delays every Raft step by up
# to 5 ms. Measured: 64-client strong reads went from ~3,900/s to ~4,400/s.
GIL_SWITCH_INTERVAL_S = 0.0005
EXIT_HUB_FAILED = 74  # the Raft hub's thread died: exit, to be restarted


def load_faults(cluster_dir: Path, cluster: configmod.ClusterConfig) -> FaultSpec:
    """The fault spec ``raftkv fault`` saved beside ``cluster.json``, so a
    restarted process stays cut off; without one, just the configured
    latency between data centers."""
    path = Path(cluster_dir) / FAULTS_NAME
    default = FaultSpec(inter_dc_latency_ms=cluster.inter_dc_latency_ms)
    if not path.exists():
        return default
    try:
        return FaultSpec.from_json(json.loads(path.read_text()))
    except (ValueError, OSError):
        log.exception("ignoring %s", path)
        return default


class FaultLinks:
    """The per-message link check the Raft transports call: the current fault
    spec applied to this process and the peer owning a Raft address."""

    def __init__(self, cluster: configmod.ClusterConfig, process_id: str, spec: FaultSpec) -> None:
        self._cluster = cluster
        self._self = process_id
        self._dc = cluster.dc_of(process_id)
        self.spec = spec
        self._peers: dict[str, tuple[str, str] | None] = {}

    def delay_s(self, address: str) -> float | None:
        """None: the link to the process at Raft ``address`` is cut; else the delay."""
        if address not in self._peers:
            self._peers[address] = self._cluster.process_of_raft_address(address)
        peer = self._peers[address]
        if peer is None:
            return 0.0
        return self.spec.link_delay_s(self._self, self._dc, peer[0], peer[1])

    def set(self, spec: FaultSpec) -> None:
        self.spec = spec  # one attribute swap: the Raft threads see old or new


class NodeServer:
    def __init__(self, cluster: configmod.ClusterConfig, secret: str, node_id: str,
                 data_dir: Path, *, faults: FaultSpec, limits: Limits = DEFAULT_LIMITS) -> None:
        self.cluster = cluster
        self.node = cluster.node(node_id)
        self.data_dir = Path(data_dir)
        self.limits = limits
        self.secret = secret
        self.links = FaultLinks(cluster, node_id, faults)
        self.replicas: dict[int, Replica] = {}
        self.hub: RaftHub | None = None
        self.wal: NodeLog | None = None
        self._hub_lock = threading.Lock()
        self.proposers: dict[int, Proposer] = {}
        self.descriptors: dict[int, dict[str, Any]] = {}
        self._keyspaces: dict[int, dict[str, tuple[int, int]]] = {}
        self._opening: set[int] = set()
        self._manager_client: dict[str, str] = {
            m.raft_address: m.client_address for m in cluster.managers}
        self._manager_leader: str | None = None
        self.map_version = 0
        self.started_at = time.time()
        self.collector: CollectorStats | None = None  # set by run_node (its own process)
        self.listen_port: int | None = None
        self._relay: Relay | None = None  # results from the hub thread to trio
        self._rpc = RpcServer(lambda body: decode_request(body, self.limits),
                              self._dispatch, frame_bytes_max=limits.frame_bytes_max,
                              drain_timeout_s=REQUEST_TIMEOUT_S)

    # -- replicas ------------------------------------------------------------------

    def _replica_dir(self, shard_id: int) -> Path:
        return self.data_dir / f"shard-{shard_id}"

    def saved_descriptors(self) -> list[dict[str, Any]]:
        """The replicas this node hosted before it (re)started."""
        out = []
        for path in sorted(self.data_dir.glob(f"shard-*/{DESCRIPTOR_NAME}")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                log.exception("unreadable replica descriptor %s; leaving it alone", path)
        return out

    def _make_replica(self, descriptor: dict[str, Any]) -> Replica:
        shard_id = int(descriptor["shard"])
        return Replica(shard_id, self._replica_dir(shard_id), descriptor["raft_address"],
                       list(descriptor["peers"]), self.secret, settings=self.cluster.raft,
                       link=self.links.delay_s, hub=self._open_hub(), wal=self.wal,
                       client_address_of=self._client_address_of,
                       founding=bool(descriptor.get("founding", False)))

    def _open_hub(self) -> RaftHub:
        """The node's one Raft transport and one Raft log, for all its replicas
        (opened before the first; reading the log back replays every group's)."""
        with self._hub_lock:
            if self.wal is None:
                self.wal = NodeLog(self.data_dir / "wal", groups_root=self.data_dir)
            if self.hub is None:
                raft = self.cluster.raft
                self.hub = RaftHub(f"{self.node.host}:{self.node.raft_port_min}", self.secret,
                                   route=self.cluster.hub_address_of,
                                   tick_period_s=raft.tick_period_s,
                                   connection_retry_s=raft.connection_retry_s,
                                   connection_timeout_s=raft.connection_timeout_s,
                                   name=f"raft-hub-{self.node.id}",
                                   on_crash=lambda: os._exit(EXIT_HUB_FAILED))
            return self.hub

    async def open_replica(self, descriptor: dict[str, Any]) -> None:
        shard_id = int(descriptor["shard"])
        if shard_id in self.replicas or shard_id in self._opening:
            return
        self._opening.add(shard_id)
        try:
            directory = self._replica_dir(shard_id)
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / DESCRIPTOR_NAME
            await trio.to_thread.run_sync(
                write_file_durably, path, json.dumps(descriptor).encode())
            replica = await trio.to_thread.run_sync(self._make_replica, descriptor)
            assert self._relay is not None
            self.replicas[shard_id] = replica
            self.descriptors[shard_id] = descriptor
            self.proposers[shard_id] = Proposer(replica, self._relay, timeout_s=REQUEST_TIMEOUT_S)
            log.info("node %s: opened shard %d", self.node.id, shard_id)
        finally:
            self._opening.discard(shard_id)

    async def close_replica(self, shard_id: int, *, delete: bool) -> None:
        replica = self.replicas.pop(shard_id, None)
        proposer = self.proposers.pop(shard_id, None)
        self.descriptors.pop(shard_id, None)
        self._keyspaces.pop(shard_id, None)
        if proposer is not None:
            proposer.expire(math.inf, Unavailable(f"shard {shard_id} closed on this node"))
        if replica is not None:
            await trio.to_thread.run_sync(replica.destroy)
        if delete:
            def remove() -> None:
                if self.wal is not None:
                    self.wal.drop(self._replica_dir(shard_id) / "journal")
                shutil.rmtree(self._replica_dir(shard_id), ignore_errors=True)
            await trio.to_thread.run_sync(remove)
            log.info("node %s: removed shard %d", self.node.id, shard_id)

    def close(self) -> None:
        for replica in self.replicas.values():
            replica.destroy()
        if self.hub is not None:
            self.hub.close()
        if self.wal is not None:
            self.wal.close()

    # -- serving -------------------------------------------------------------------

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._relay = Relay(self._open_hub(),  # a taken Raft port stops the node here
                            trio.lowlevel.current_trio_token().run_sync_soon)
        listeners = await trio.open_tcp_listeners(self.node.client_port, host=self.node.host)
        self.listen_port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            for descriptor in self.saved_descriptors():
                nursery.start_soon(self.open_replica, descriptor)
            nursery.start_soon(self._expire_stale_batches)
            nursery.start_soon(self._heartbeat_loop)
            task_status.started(self.listen_port)
            await trio.serve_listeners(self._rpc.handle_connection, listeners)

    async def _expire_stale_batches(self) -> None:
        while True:
            await trio.sleep(min(1.0, REQUEST_TIMEOUT_S / 4))
            for proposer in list(self.proposers.values()):
                proposer.expire_stale()

    # -- the shard manager -----------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        async with trio.open_nursery() as nursery:
            pool = ConnectionPool(nursery, connect_timeout_s=1.0)
            rotation = random.randrange(len(self.cluster.managers))  # noqa: S311 - spreading load
            while True:
                address = self._manager_leader or self.cluster.managers[
                    rotation % len(self.cluster.managers)].client_address
                try:
                    reply = await pool.request(address, self._heartbeat(), 2.0)
                    self._manager_leader = address
                    await self._reconcile(reply)
                    await trio.sleep(HEARTBEAT_PERIOD_S)
                except NotLeader as exc:
                    self._manager_leader = exc.leader if exc.leader != address else None
                    if self._manager_leader is None:
                        rotation += 1
                        await trio.sleep(0.1)
                except RaftKVError as exc:
                    # A refusal (say, this node's config changed its host or
                    # ports while it hosts replicas) needs an operator; say so.
                    (log.warning if exc.code == "BAD_REQUEST" else log.debug)(
                        "heartbeat to %s failed: %s", address, exc)
                    self._manager_leader = None
                    rotation += 1
                    await trio.sleep(0.2)

    def _heartbeat(self) -> dict[str, Any]:
        n = self.node
        return {
            "op": "heartbeat",
            "node": {"id": n.id, "dc": n.dc, "host": n.host, "client_port": n.client_port,
                     "raft_port_min": n.raft_port_min, "raft_port_max": n.raft_port_max,
                     "capacity": n.capacity},
            "leaders": sorted(s for s, r in self.replicas.items() if r.is_leader),
            "replicas": sorted(self.replicas),
        }

    async def _reconcile(self, reply: dict[str, Any]) -> None:
        """Open what the manager assigns; close and delete what it removed."""
        version = int(reply["version"])
        self.map_version = max(self.map_version, version)
        assigned = {int(a["shard"]): a for a in reply["assignment"]}
        for shard_id, a in assigned.items():
            if shard_id not in self.replicas:
                try:
                    await self.open_replica({
                        "shard": shard_id, "keyspace": a["keyspace"],
                        "raft_address": f"{self.node.host}:{a['raft_port']}",
                        "peers": list(a["peers"]), "created_version": a["created_version"],
                        "founding": bool(a.get("founding", False))})
                except Exception:  # the next heartbeat tries again; others go on
                    log.exception("node %s: cannot open shard %d", self.node.id, shard_id)
        for shard_id in list(self.replicas):
            created = int(self.descriptors.get(shard_id, {}).get("created_version", 0))
            # A state at least as new as the shard's creation that lacks the shard
            # comes after its removal (states only ever grow in version).
            if shard_id not in assigned and version >= created:
                try:
                    await self.close_replica(shard_id, delete=True)
                except Exception:
                    log.exception("node %s: cannot remove shard %d", self.node.id, shard_id)

    # -- requests ---------------------------------------------------------------

    def _dispatch(self, request: Request, reply: OnDone) -> None:
        """Answer ``request`` through ``reply(result, error)``, now or when Raft
        has committed; raises RaftKVError for a refusal known at once."""
        if isinstance(request, WriteRequest):
            self._write(request, reply)
        elif isinstance(request, GetRequest):
            self._get(request, reply)
        elif isinstance(request, ScanRequest):
            self._scan(request, reply)
        elif isinstance(request, OwnRequest):
            _, proposer = self._leader_for(request.shard)
            proposer.propose(Own(request.keyspace_id, request.keyspace,
                                 request.logical_shards_total, request.logical_shards),
                             _plain(reply))
        elif isinstance(request, DropRequest):
            _, proposer = self._leader_for(request.shard)
            proposer.propose(DropKeyspace(request.keyspace_id, request.keyspace,
                                          request.keys_max), _plain(reply))
        elif isinstance(request, MoveRequest):
            _, proposer = self._leader_for(request.shard)
            cutover = moves.is_cutover(request.step, request.data)
            proposer.propose(moves.MoveStep(request.step, request.keyspace_id,
                                            request.logical_shard, request.move_id,
                                            request.data), _plain(reply),
                             urgent=cutover, separate=not cutover)
        elif isinstance(request, MoveReadRequest):
            self._move_read(request, reply)
        elif isinstance(request, TransferRequest):
            replica, _ = self._leader_for(request.shard)
            replica.transfer_leadership(request.to)
            reply({"requested": True}, None)
        elif isinstance(request, FaultRequest):
            try:
                self.links.set(FaultSpec.from_json(request.spec))
            except ValueError as exc:
                raise BadRequest(f"bad fault spec: {exc}") from exc
            reply(self.links.spec.to_json(), None)
        elif isinstance(request, StatusRequest):
            reply(self.status(), None)
        elif isinstance(request, PingRequest):
            reply({"node": self.node.id}, None)
        else:
            raise BadRequest(f"unsupported request {type(request).__name__}")

    def _replica(self, shard_id: int) -> Replica:
        replica = self.replicas.get(shard_id)
        if replica is None:
            raise UnknownShard(f"node {self.node.id} hosts no replica of shard {shard_id}")
        return replica

    def _leader_for(self, shard_id: int) -> tuple[Replica, Proposer]:
        replica = self._replica(shard_id)
        if not replica.is_leader:
            raise NotLeader(f"node {self.node.id} is not the leader of shard {shard_id}",
                            leader=replica.leader_hint())
        return replica, self.proposers[shard_id]

    def _client_address_of(self, raft_address: str) -> str | None:
        owner = self.cluster.process_of_raft_address(raft_address)
        if owner is None:
            return None
        try:
            return self.cluster.node(owner[0]).client_address
        except configmod.ConfigError:
            return None

    def _keyspace(self, replica: Replica, shard_id: int, name: str) -> tuple[int, int]:
        """(keyspace id, logical shard count) from the group's own records, as
        this replica has applied them (see ``_with_keyspace`` on a leader).

        Found records are cached: a keyspace's id and count never change, and a
        dropped keyspace's cached record is harmless, because writes and reads
        check ownership in the group's current state (there is none any more)."""
        cache = self._keyspaces.setdefault(shard_id, {})
        found = cache.get(name)
        if found is None:
            raw = replica.store.get(layout.keyspace_key(name))
            if raw is None:
                raise WrongShard(f"shard {shard_id} does not serve keyspace {name!r}",
                                 shard=shard_id)
            found = cache[name] = layout.decode_keyspace(raw)
        return found

    def _with_keyspace(self, replica: Replica, shard_id: int, name: str, reply: OnDone,
                       then: Callable[[tuple[int, int]], None]) -> None:
        """``then(_keyspace(...))`` on a leader, now if the record is applied here.

        A leader may not have applied every committed entry yet: one just
        elected learns what was committed only when an entry of its own term
        commits. So a record it lacks is looked up again behind a read index
        (leadership confirmed, log applied up to the commit index), and only
        then is the request refused with WRONG_SHARD."""
        try:
            found = self._keyspace(replica, shard_id, name)
        except WrongShard:
            self._after_read_index(replica, reply,
                                   lambda _: then(self._keyspace(replica, shard_id, name)))
            return
        then(found)

    def _write(self, request: WriteRequest, reply: OnDone) -> None:
        replica, proposer = self._leader_for(request.shard)
        self._with_keyspace(replica, request.shard, request.keyspace, reply,
                            lambda ks: self._propose_write(request, proposer, ks, reply))

    def _propose_write(self, request: WriteRequest, proposer: Proposer,
                       keyspace: tuple[int, int], reply: OnDone) -> None:
        ks_id, total = keyspace
        mutations = []
        size = 0
        for op in request.ops:
            ls = logical_shard(request.keyspace, op.key, total)
            if isinstance(op, PutOp):
                mutations.append(Mutation(PUT, ls, op.key, op.value))
                size += len(op.key) + len(op.value)
            elif isinstance(op, DeleteOp):
                mutations.append(Mutation(DELETE, ls, op.key))
                size += len(op.key)
            else:
                assert isinstance(op, CasOp)
                mutations.append(Mutation(CAS, ls, op.key, op.value, op.expected))
                size += len(op.key) + len(op.value) + len(op.expected or b"")
        if len({m.logical_shard for m in mutations}) > 1:
            raise BadRequest("the keys of a batch must share one logical shard (use one "
                             "hash tag {...} in all of them)")
        command = Write(ks_id, request.client_id, request.seq, request.ack_seq, tuple(mutations))

        def done(result: Any, error: RaftKVError | None) -> None:
            if error is not None:
                reply(None, error)
                return
            err = result.get("err")
            if err == "PRECONDITION_FAILED":
                # A retried write returns its stored result, which omits the value
                # the cas found: `current_known` says whether `current` is meaningful.
                reply(None, PreconditionFailed(
                    f"op {result['op']}: the key does not hold the expected value",
                    op=result["op"], current=result.get("cur"),
                    current_known="cur" in result, index=result.get("i")))
            elif err in ("WRONG_SHARD", "SHARD_MOVING"):
                reply(None, refusal_error(result, request.shard, request.keyspace))
            elif err is not None:
                reply(None, OutcomeUnknown(str(result.get("msg", err))))
            else:
                reply({"index": result["i"], "results": result["r"]}, None)

        proposer.propose(command, done, size)

    MOVE_READ_BYTES_MAX = 1 << 20

    def _move_read(self, request: MoveReadRequest, reply: OnDone) -> None:
        """A page for a move's worker, read on the leader behind a barrier (so it
        holds every change committed before the request; or, with
        ``min_index``, at any applied state that includes that entry): the
        logical shard's raw keys after ``after``, or changelog records from
        ``from_seq``."""
        replica, proposer = self._leader_for(request.shard)

        def done(_barrier: Any, error: RaftKVError | None) -> None:
            if error is not None:
                reply(None, error)
                return
            store, budget = replica.store, self.MOVE_READ_BYTES_MAX
            if request.move_id is None:
                items: list[list[bytes]] = []
                for start, stop in layout.shard_ranges(request.keyspace_id,
                                                       request.logical_shard):
                    begin = max(start, request.after + b"\0") if request.after else start
                    if begin >= stop or len(items) >= request.limit or budget <= 0:
                        continue
                    for key, value in store.scan(begin, stop, request.limit - len(items)):
                        items.append([key, value])
                        budget -= len(key) + len(value)
                        if budget <= 0:
                            break
                more = len(items) >= request.limit or budget <= 0
                # The logical shard's greatest key now: a copy that started after the
                # capture can stop there (later writes are in the changelog), instead
                # of chasing keys that writes keep adding at the end.
                last = None
                for start, stop in layout.shard_ranges(request.keyspace_id,
                                                       request.logical_shard):
                    last = store.last_key(start, stop) or last
                reply({"items": items, "more": more, "end": last}, None)
                return
            records: list[Any] = []
            seq = request.from_seq
            while len(records) < request.limit and budget > 0:
                raw = store.get(layout.changelog_key(request.move_id, seq))
                if raw is None:
                    break
                records.append(cbor2.loads(raw))
                budget -= len(raw)
                seq += 1
            reply({"records": records, "from": request.from_seq}, None)

        if 0 < request.min_index <= replica.last_applied:
            # The caller needs a state at least as new as that entry (its capture
            # or freeze), and this leader's applied state is: no barrier needed.
            done(None, None)
        else:
            proposer.barrier(done)

    def _check_owned(self, replica: Replica, shard_id: int, ks_id: int, ls: int) -> None:
        owner = moves.decode_owner(replica.store.get(layout.owner_key(ks_id, ls)))
        refusal = moves.client_refusal(owner, ks_id, ls)
        if refusal is not None:
            raise refusal_error(refusal, shard_id, None)

    def _read(self, shard_id: int, consistency: str, keyspace: str, *, ls_of: Any,
              read: Any, reply: OnDone) -> None:
        """Serve ``read(replica, ks_id, ls)``: from any replica (eventual) or from
        the leader once its read index for this call is confirmed and applied
        (strong; ``raftkv/replication/readindex.py``).
        The value is read first and ownership checked after: if the group still
        owns the logical shard after the read, no other group could have taken
        a write for it before the read, so the value was current."""
        if consistency == "eventual":
            replica = self._replica(shard_id)
            ks_id, total = self._keyspace(replica, shard_id, keyspace)
            ls = ls_of(total)
            result = read(replica, ks_id, ls)
            self._check_owned(replica, shard_id, ks_id, ls)
            result.update(applied=replica.store.applied_index,
                          lag=max(0, replica.commit_index - replica.last_applied))
            reply(result, None)
            return
        replica, _ = self._leader_for(shard_id)

        def done(barrier: dict[str, Any]) -> None:
            # After the read index: a leader just elected has applied what was
            # committed before it (the keyspace's record among it).
            ks_id, total = self._keyspace(replica, shard_id, keyspace)
            ls = ls_of(total)
            result = read(replica, ks_id, ls)
            self._check_owned(replica, shard_id, ks_id, ls)
            result["index"] = barrier["i"]
            reply(result, None)

        self._after_read_index(replica, reply, done)

    def _after_read_index(self, replica: Replica, reply: OnDone,
                          then: Callable[[dict[str, Any]], None]) -> None:
        """``then(read index)`` here once ``replica`` has confirmed a read index
        (no log entry) on the Raft thread, or ``reply`` the error: that one's
        or the RaftKVError ``then`` raises."""
        relay = self._relay
        assert relay is not None

        def confirmed(barrier: Any, error: RaftKVError | None) -> None:
            if error is not None:
                reply(None, error)
                return
            try:
                then(barrier)
            except RaftKVError as exc:
                reply(None, exc)

        replica.read_index(lambda r, e: relay.run_sync_soon(confirmed, r, e))

    def _get(self, request: GetRequest, reply: OnDone) -> None:
        def read(replica: Replica, ks_id: int, ls: int) -> dict[str, Any]:
            return {"value": replica.store.get(layout.data_key(ks_id, ls, request.key))}

        self._read(request.shard, request.consistency, request.keyspace,
                   ls_of=lambda total: logical_shard(request.keyspace, request.key, total),
                   read=read, reply=reply)

    def _scan(self, request: ScanRequest, reply: OnDone) -> None:
        def ls_of(total: int) -> int:
            if request.logical_shard >= total:
                raise BadRequest(f"logical shard {request.logical_shard} is out of range "
                                 f"(keyspace {request.keyspace!r} has {total})")
            if request.prefix and shard_key(request.prefix) != request.prefix and (
                    logical_shard(request.keyspace, request.prefix, total)
                    != request.logical_shard):
                raise BadRequest("the prefix's hash tag is not in the requested logical shard")
            return request.logical_shard

        def read(replica: Replica, ks_id: int, ls: int) -> dict[str, Any]:
            base = layout.data_prefix(ks_id, ls)
            start = base + request.prefix
            if request.after is not None and base + request.after >= start:
                start = base + request.after + b"\0"
            stop = layout.prefix_end(base + request.prefix) if request.prefix else \
                layout.prefix_end(base)
            pairs = replica.store.scan(start, stop, request.limit + 1)
            items = [[k[len(base):], v] for k, v in pairs[:request.limit]]
            return {"items": items, "more": len(pairs) > request.limit}

        self._read(request.shard, request.consistency, request.keyspace, ls_of=ls_of,
                   read=read, reply=reply)

    def status(self) -> dict[str, Any]:
        shards = []
        for shard_id, replica in sorted(self.replicas.items()):
            leader = replica.leader_address
            proposer = self.proposers.get(shard_id)
            leader_owner = None if leader is None else self.cluster.process_of_raft_address(
                leader)
            shards.append({
                "id": shard_id,
                "keyspace": self.descriptors.get(shard_id, {}).get("keyspace"),
                "role": "leader" if replica.is_leader else "follower",
                "raft_address": replica.self_address,
                "leader_raft_address": leader,
                "leader_node": None if leader_owner is None else leader_owner[0],
                "leader_client_address": replica.leader_hint(),
                "term": replica.term,
                "commit_index": replica.commit_index,
                "applied_index": replica.last_applied,
                "keys": layout.decode_index(replica.store.get(layout.KEY_COUNT_KEY)),
                "disk_bytes": _disk_bytes(self._replica_dir(shard_id)),
                "snapshots_written": replica.snapshots_written,
                "snapshots_installed": replica.snapshots_installed,
                "journal_entries": len(replica.journal),
                "journal_syncs": replica.journal.syncs,
                "entries_proposed": proposer.entries_proposed if proposer else 0,
                "commands_proposed": proposer.commands_proposed if proposer else 0,
                "urgent_proposed": proposer.urgent_proposed if proposer else 0,
                # Strong reads served by read index, and the heartbeat rounds
                # that confirmed them (reads arriving together share a round).
                "reads_served": replica.transport.reads.served,
                "read_rounds": replica.transport.reads.rounds,
            })
        return {
            "node": self.node.id, "dc": self.node.dc, "pid": os.getpid(),
            "client_address": self.node.client_address, "uptime_s": time.time() - self.started_at,
            "map_version": self.map_version, "faults": self.links.spec.to_json(),
            "raft_hub": None if self.hub is None else {
                **self.hub.stats(),
                # wake-ups of this trio loop for results (one per hub round at most)
                "trio_wakes": self._relay.wakes if self._relay is not None else 0},
            # Since start: requests by kind (get, write, move:ingest, ...) and
            # error replies by code.
            "requests": dict(sorted(self._rpc.requests.items())),
            "errors": dict(sorted(self._rpc.errors.items())),
            "gc": None if self.collector is None else self.collector.to_json(),
            "shards": shards,
        }


def refusal_error(refusal: dict[str, Any], shard_id: int, keyspace: str | None) -> RaftKVError:
    """The client error for an apply-time refusal (``moves.client_refusal``)."""
    what = f"logical shard {refusal['ls']}" + (
        f" of keyspace {keyspace!r}" if keyspace is not None else "")
    details: dict[str, Any] = {"shard": shard_id, "ls": refusal["ls"]}
    if refusal.get("dest") is not None:
        details["moved_to"] = refusal["dest"]
    if refusal["err"] == "SHARD_MOVING":
        return ShardMoving(f"{what} is moving (shard {shard_id}); retry shortly", **details)
    return WrongShard(f"shard {shard_id} does not own {what}", **details)


def _plain(reply: OnDone) -> OnDone:
    """Reply with an admin command's apply result as it is."""
    def done(result: Any, error: RaftKVError | None) -> None:
        reply(None if error else result, error)
    return done


def _disk_bytes(directory: Path) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed meanwhile
                total += os.stat(os.path.join(root, name)).st_size
    return total


def run_node(cluster_dir: Path, node_id: str, data_dir: Path | None = None) -> None:
    """Entry point of ``raftkv node``: runs until SIGTERM or SIGINT."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    cluster, secret = configmod.load(cluster_dir)
    data = Path(data_dir) if data_dir else Path(cluster_dir) / node_id
    server = NodeServer(cluster, secret, node_id, data, faults=load_faults(cluster_dir, cluster))
    server.collector = tune_collector()
    run_until_signalled(server.serve, server.close)


def run_until_signalled(serve: Any, close: Any) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    finally:
        close()

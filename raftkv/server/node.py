"""The node process: hosts replicas and serves clients over trio TCP.

One connection carries many requests at once: a reader decodes frames and
starts a task per request (at most ``in_flight_per_connection_max``; past
that the reader stops reading, which pushes back on the client), and replies
go out in completion order, each tagged with its request id.

Bad input never takes the node down: an undecodable request gets a
BAD_REQUEST / TOO_LARGE reply naming the problem; a frame over the limit gets
a TOO_LARGE reply and the connection is closed (its framing is lost). Other
connections are not affected.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import trio

from raftkv import config as configmod
from raftkv.errors import (
    BadRequest,
    InternalError,
    NotLeader,
    OutcomeUnknown,
    PreconditionFailed,
    RaftKVError,
    TooLarge,
    UnknownShard,
)
from raftkv.protocol.framing import FrameDecoder, FrameTooLarge, encode_frame
from raftkv.protocol.messages import (
    DEFAULT_LIMITS,
    CasOp,
    DeleteOp,
    GetRequest,
    Limits,
    PingRequest,
    PutOp,
    Request,
    StatusRequest,
    WriteRequest,
    decode_request,
    encode_error,
    encode_ok,
)
from raftkv.replication.replica import Replica
from raftkv.server.proposer import Proposer
from raftkv.sharding import logical_shard
from raftkv.statemachine import layout
from raftkv.statemachine.commands import CAS, DELETE, PUT, Mutation, Write

log = logging.getLogger(__name__)

IN_FLIGHT_PER_CONNECTION_MAX = 4096
REQUEST_TIMEOUT_S = 10.0
READ_CHUNK_BYTES = 256 * 1024


class NodeServer:
    def __init__(self, cluster: configmod.ClusterConfig, secret: str, node_id: str,
                 data_dir: Path, limits: Limits = DEFAULT_LIMITS) -> None:
        self.cluster = cluster
        self.node = cluster.node(node_id)
        self.data_dir = Path(data_dir)
        self.limits = limits
        self.secret = secret
        self.replicas: dict[int, Replica] = {}
        self.proposers: dict[int, Proposer] = {}
        self._client_by_raft = cluster.client_address_by_raft_address()
        self.started_at = time.time()
        self.listen_port: int | None = None

    # -- lifecycle -------------------------------------------------------------

    def open_replicas(self) -> None:
        for shard in self.cluster.shards:
            mine = [r for r in shard.replicas if r.node == self.node.id]
            if not mine:
                continue
            me = mine[0]
            peers = [self.cluster.raft_address(shard, r) for r in shard.replicas if r is not me]
            self.replicas[shard.id] = Replica(
                shard.id, self.data_dir / f"shard-{shard.id}",
                self.cluster.raft_address(shard, me), peers, self.secret, self.cluster.raft,
            )

    def close(self) -> None:
        for replica in self.replicas.values():
            replica.destroy()

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        token = trio.lowlevel.current_trio_token()
        for shard_id, replica in self.replicas.items():
            self.proposers[shard_id] = Proposer(replica, token)
        listeners = await trio.open_tcp_listeners(self.node.client_port, host=self.node.host)
        self.listen_port = listeners[0].socket.getsockname()[1]
        task_status.started(self.listen_port)
        await trio.serve_listeners(self._handle_connection, listeners)

    # -- connections -------------------------------------------------------------

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        send_lock = trio.Lock()
        limiter = trio.CapacityLimiter(IN_FLIGHT_PER_CONNECTION_MAX)
        decoder = FrameDecoder(self.limits.frame_bytes_max)

        async def reply(body: bytes) -> None:
            async with send_lock:
                await stream.send_all(encode_frame(body))

        async def run_one(request: Request, borrower: object) -> None:
            try:
                body = encode_ok(request.id, await self._dispatch(request))
            except RaftKVError as exc:
                body = encode_error(request.id, exc)
            except Exception as exc:  # a bug: answer, log, keep serving
                log.exception("request %r failed", request)
                body = encode_error(request.id, InternalError(f"{type(exc).__name__}: {exc}"))
            finally:
                limiter.release_on_behalf_of(borrower)
            await reply(body)

        try:
            async with trio.open_nursery() as nursery:
                while True:
                    data = await stream.receive_some(READ_CHUNK_BYTES)
                    if not data:
                        break
                    decoder.feed(data)
                    try:
                        for body in decoder.frames():
                            try:
                                request = decode_request(body, self.limits)
                            except RaftKVError as exc:
                                await reply(encode_error(exc.details.get("request_id"), exc))
                                continue
                            borrower = object()
                            await limiter.acquire_on_behalf_of(borrower)
                            nursery.start_soon(run_one, request, borrower)
                    except FrameTooLarge as exc:
                        await reply(encode_error(None, TooLarge(str(exc))))
                        break
                nursery.cancel_scope.deadline = trio.current_time() + REQUEST_TIMEOUT_S
        except* (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            # The peer went away (reset, or closed while a reply was being sent).
            # Errors from the nursery arrive in an ExceptionGroup; a plain
            # ``except`` would miss them and the error would stop the whole node.
            pass
        finally:
            await stream.aclose()

    # -- requests ---------------------------------------------------------------

    async def _dispatch(self, request: Request) -> Any:
        if isinstance(request, WriteRequest):
            return await self._write(request)
        if isinstance(request, GetRequest):
            return await self._get(request)
        if isinstance(request, StatusRequest):
            return self.status()
        if isinstance(request, PingRequest):
            return {"node": self.node.id}
        raise BadRequest(f"unsupported request {type(request).__name__}")

    def _leader_for(self, shard_id: int) -> tuple[Replica, Proposer]:
        replica = self.replicas.get(shard_id)
        if replica is None:
            raise UnknownShard(f"node {self.node.id} hosts no replica of shard {shard_id}")
        if not replica.is_leader:
            raise NotLeader(f"node {self.node.id} is not the leader of shard {shard_id}",
                            leader=self._leader_hint(replica))
        return replica, self.proposers[shard_id]

    def _leader_hint(self, replica: Replica) -> str | None:
        leader = replica.leader_address
        return None if leader is None else self._client_by_raft.get(leader)

    def _keyspace(self, name: str) -> configmod.KeyspaceConfig:
        ks = self.cluster.keyspace(name)
        if ks is None:
            raise BadRequest(f"unknown keyspace {name!r}")
        return ks

    async def _write(self, request: WriteRequest) -> Any:
        ks = self._keyspace(request.keyspace)
        _, proposer = self._leader_for(request.shard)
        mutations = []
        size = 0
        for op in request.ops:
            ls = logical_shard(ks.name, op.key, ks.logical_shards)
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
        command = Write(ks.id, request.client_id, request.seq, request.ack_seq, tuple(mutations))
        with trio.fail_after(REQUEST_TIMEOUT_S):
            result = await proposer.propose(command, size)
        err = result.get("err")
        if err == "PRECONDITION_FAILED":
            # A retried write returns its stored result, which omits the value
            # the cas found: `current_known` says whether `current` is meaningful.
            raise PreconditionFailed(
                f"op {result['op']}: the key does not hold the expected value",
                op=result["op"], current=result.get("cur"), current_known="cur" in result,
                index=result.get("i"),
            )
        if err is not None:
            raise OutcomeUnknown(str(result.get("msg", err)))
        return {"index": result["i"], "results": result["r"]}

    async def _get(self, request: GetRequest) -> Any:
        ks = self._keyspace(request.keyspace)
        ls = logical_shard(ks.name, request.key, ks.logical_shards)
        key = layout.data_key(ks.id, ls, request.key)
        if request.consistency == "eventual":
            replica = self.replicas.get(request.shard)
            if replica is None:
                raise UnknownShard(f"node {self.node.id} hosts no replica of shard "
                                   f"{request.shard}")
            value = replica.store.get(key)
            return {"value": value, "applied": replica.store.applied_index,
                    "lag": max(0, replica.commit_index - replica.last_applied)}
        replica, proposer = self._leader_for(request.shard)
        with trio.fail_after(REQUEST_TIMEOUT_S):
            index = await proposer.barrier()
        return {"value": replica.store.get(key), "index": index}

    def status(self) -> dict[str, Any]:
        shards = []
        for shard_id, replica in sorted(self.replicas.items()):
            leader = replica.leader_address
            shards.append({
                "id": shard_id,
                "role": "leader" if replica.is_leader else "follower",
                "leader_raft_address": leader,
                "leader_client_address": None if leader is None else self._client_by_raft.get(
                    leader),
                "term": replica.term,
                "commit_index": replica.commit_index,
                "applied_index": replica.last_applied,
                "snapshots_written": replica.snapshots_written,
                "snapshots_installed": replica.snapshots_installed,
                "journal_entries": len(replica.journal),
            })
        return {
            "node": self.node.id, "dc": self.node.dc, "pid": os.getpid(),
            "client_address": self.node.client_address, "uptime_s": time.time() - self.started_at,
            "shards": shards,
        }


def run_node(cluster_dir: Path, node_id: str, data_dir: Path | None = None) -> None:
    """Entry point of ``raftkv node``: runs until SIGTERM or SIGINT."""
    cluster, secret = configmod.load(cluster_dir)
    data = Path(data_dir) if data_dir else Path(cluster_dir) / node_id
    server = NodeServer(cluster, secret, node_id, data)
    server.open_replicas()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    finally:
        server.close()

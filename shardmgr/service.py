"""The shard manager process: one replica of the manager's Raft group, its RPCs,
and, on the leader, the controller that carries decisions out.

Requests (framed cbor, like the node's):

=========== ==================================================================
op          fields -> result
=========== ==================================================================
map         [after, wait_s] -> the client shard map; with ``after``, waits (up to
            ``wait_s``) until the version is newer (long-poll watch). Any replica
            answers from its applied state: a stale map is harmless.
heartbeat   node {id, dc, host, client_port, raft_port_min, raft_port_max,
            capacity}, leaders [shard ids], replicas [shard ids]
            -> {version, assignment}. Leader only.
ks_create   name, [logical_shards, replication_factor, physical_shards]
ks_drop     name
ks_list     -> keyspaces with their state
cluster     -> the whole state plus the leader's view of liveness and leaders
status      -> this replica's Raft status
fault       spec -> sets this process's fault spec (links to other processes)
reshard     ks, physical_shards, [plan] -> starts resharding (or, with ``plan``,
            only says what it would do); reshard_status ks; reshard_abort ks
move_claim  worker, [per_node_max] -> {move, lease_s, shards} or null: a move for
            a resharding worker, with a lease (``shardmgr.reshard``)
move_update worker, move, steps [[phase, result], ...], stats -> the move after
            them: compare-and-set on its phase by the lease holder
ping
=========== ==================================================================

The controller (leader only, every ``CONTROL_PERIOD_S``): tells new groups
which logical shards they own (``own``), has dropped keyspaces' groups delete
their data (``drop``) and then forgets them, finishes reshards whose moves are
over (``reshard.tick``), and moves leadership towards the placement's
preferred leaders with Raft leadership transfer. Every change of
state is computed from the committed state read behind a barrier and
proposed as compare-and-set on its version (``shardmgr.machine``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from raftkv import config as configmod
from raftkv.client.client import ConnectionPool, forget_other_groups, request_leader
from raftkv.errors import (
    BadRequest,
    NotLeader,
    RaftKVError,
    Unavailable,
)
from raftkv.faults import FaultSpec
from raftkv.protocol.messages import DEFAULT_LIMITS, decode_envelope
from raftkv.replication.hub import Relay
from raftkv.replication.replica import Replica
from raftkv.server.collector import CollectorStats, tune_collector
from raftkv.server.node import FaultLinks, load_faults, run_until_signalled
from raftkv.server.proposer import OnDone, Proposer
from raftkv.server.rpc import RpcServer
from raftkv.statemachine.apply import ApplyOutput, StateView
from shardmgr import reshard as rs
from shardmgr import state as st
from shardmgr.machine import (
    STATE_KEY,
    SetState,
    encode_manager_commands,
    manager_apply_state,
    read_state,
)
from shardmgr.moves import FINAL
from shardmgr.placement import (
    DataCenterId,
    Node,
    NodeId,
    PhysicalShardId,
    Shard,
    plan_placement,
)

log = logging.getLogger(__name__)

CONTROL_PERIOD_S = 0.25
NODE_DEAD_AFTER_S = 3.0
HEARTBEAT_WAIT_STEP_S = 0.05
LEADER_BALANCE_PERIOD_S = 2.0
TRANSFER_RETRY_S = 5.0
MAP_WAIT_S_MAX = 30.0
DROP_CHUNK_KEYS = 2000
REQUEST_TIMEOUT_S = 10.0
EXPIRE_PERIOD_S = 1.0


@dataclass(eq=False)
class _Change:
    """One caller's change, waiting to be committed with others."""

    fn: Callable[[st.ClusterState], st.ClusterState]
    result: st.ClusterState | None = None
    error: Exception | None = None
    done: bool = False


@dataclass
class ManagerRequest:
    id: int
    op: str
    fields: dict[str, Any]


def decode_manager_request(body: bytes) -> ManagerRequest:
    msg, request_id = decode_envelope(body)
    op = msg.get("op")
    if op not in _HANDLERS:
        raise BadRequest(f"request {request_id}: unknown shard manager op {op!r}",
                         request_id=request_id)
    return ManagerRequest(request_id, op, msg)


def _int(fields: dict[str, Any], name: str, default: int | None = None) -> int:
    value = fields.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"field '{name}' must be an integer")
    return value


def _str(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str):
        raise BadRequest(f"field '{name}' must be text")
    return value


class ManagerServer:
    def __init__(self, cluster: configmod.ClusterConfig, secret: str, manager_id: str,
                 data_dir: Path, faults: FaultSpec) -> None:
        self.cluster = cluster
        self.me = cluster.manager(manager_id)
        self.data_dir = Path(data_dir)
        self.secret = secret
        self.links = FaultLinks(cluster, manager_id, faults)
        self.replica: Replica | None = None
        self.proposer: Proposer | None = None
        self.state = st.ClusterState()
        self._state_raw: bytes | None = None
        # The state the last applied entry stored (Raft thread only): the next
        # entry's patch applies to it without reading the stored moves.
        self._applied_last: st.ClusterState | None = None
        self._state_changed = trio.Event()
        self._change_lock = trio.Lock()
        self._pending: list[_Change] = []
        self._synced_term: int | None = None
        # The client map and the state version at which it last changed: moves
        # change the state often, the map seldom, and watchers wake only for it.
        self._client_map: dict[str, Any] = self.state.client_map()
        self._client_of_raft = {m.raft_address: m.client_address for m in cluster.managers}
        # The leader's soft state: who heartbeats, and what each node leads.
        self.last_seen: dict[str, float] = {}
        self.leaders_of: dict[str, set[int]] = {}
        self._transfer_at: dict[int, float] = {}
        self._group_leaders: dict[int, str] = {}  # the node that last answered, by group
        self._leading_since: float | None = None
        self.started_at = time.time()
        self.collector: CollectorStats | None = None  # set by run_manager (its own process)
        self._rpc = RpcServer(decode_manager_request, self._dispatch,
                              frame_bytes_max=DEFAULT_LIMITS.frame_bytes_max,
                              drain_timeout_s=REQUEST_TIMEOUT_S)
        self._nursery: trio.Nursery | None = None
        self._relay: Relay | None = None  # the replica's hub thread to trio

    def open(self) -> None:
        peers = [m.raft_address for m in self.cluster.managers if m.id != self.me.id]
        self.replica = Replica(0, self.data_dir / "manager", self.me.raft_address, peers,
                               self.secret, settings=self.cluster.raft, apply_fn=self._apply,
                               link=self.links.delay_s,
                               client_address_of=self._client_of_raft.get,
                               # The manager group is fixed: an empty replica is
                               # one of a new cluster's (or lost its disk).
                               founding=True)

    def close(self) -> None:
        if self.replica is not None:
            self.replica.destroy()

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        assert self.replica is not None
        self._relay = Relay(self.replica.hub, trio.lowlevel.current_trio_token().run_sync_soon)
        self.proposer = Proposer(self.replica, self._relay,
                                 encode=encode_manager_commands, timeout_s=REQUEST_TIMEOUT_S)
        # Notes from apply start now; the state applied before is in the store.
        self._install_state(*read_state(self.replica.store))
        listeners = await trio.open_tcp_listeners(self.me.client_port, host=self.me.host)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._expire_stale)
            nursery.start_soon(self._control_loop)
            task_status.started(listeners[0].socket.getsockname()[1])
            await trio.serve_listeners(self._rpc.handle_connection, listeners)

    # -- state -------------------------------------------------------------------

    def _apply(self, view: StateView, index: int, payload: bytes) -> ApplyOutput:
        """The state machine, plus a note to the trio side when the state
        changed (so map watchers wake at once, without polling)."""
        out, stored = manager_apply_state(view, index, payload, self._applied_last)
        if stored is not None:  # (then the state was written)
            self._applied_last = stored
            relay = self._relay
            if relay is not None:
                relay.run_sync_soon(self._install_state, out.writes[STATE_KEY], stored)
        return out

    def _install_state(self, raw: bytes | None, state: st.ClusterState) -> None:
        if raw == self._state_raw:
            return
        if state.version < self.state.version:
            return  # a late note about an older state
        self._state_raw, self.state = raw, state
        client_map = state.client_map()
        if {**client_map, "version": 0} == {**self._client_map, "version": 0}:
            return  # the map is as it was: watchers sleep on
        self._client_map = client_map
        self._state_changed.set()
        self._state_changed = trio.Event()

    async def _expire_stale(self) -> None:
        assert self.proposer is not None
        while True:
            await trio.sleep(EXPIRE_PERIOD_S)
            self.proposer.expire_stale()

    async def _await(self, submit: Callable[[OnDone], None]) -> Any:
        done = trio.Event()
        out: list[Any] = []

        def on_done(result: Any, error: RaftKVError | None) -> None:
            out.append((result, error))
            done.set()

        submit(on_done)
        await done.wait()
        result, error = out[0]
        if error is not None:
            raise error
        return result

    async def committed_state(self) -> st.ClusterState:
        """The state with every entry committed before this call applied (leader)."""
        assert self.proposer is not None and self.replica is not None
        self._require_leader()
        await self._await(self.proposer.barrier)
        return self._decoded(self.replica.store.get(STATE_KEY))

    def _decoded(self, raw: bytes | None) -> st.ClusterState:
        """The state stored with ``raw``: usually the one installed last (states
        are immutable), so nothing to read; else the store's (that one or later)."""
        assert self.replica is not None
        return self.state if raw == self._state_raw else read_state(self.replica.store)[1]

    async def change(self, fn: Callable[[st.ClusterState], st.ClusterState]) -> st.ClusterState:
        """Apply ``fn`` to the committed state and commit the result (compare-
        and-set on its version, retried on a conflict); the state after ``fn``.
        StateError from ``fn`` propagates: nothing of it changed.

        Group commit: changes that arrive while one is in flight are applied
        in turn to the same state and committed together in one log entry, so
        many workers' reports cost one round of Raft, not one each."""
        slot = _Change(fn)
        self._pending.append(slot)
        async with self._change_lock:
            if not slot.done:
                batch, self._pending = self._pending, []
                await self._commit(batch)
        if slot.error is not None:
            raise slot.error
        assert slot.result is not None
        return slot.result

    async def _commit(self, batch: list[_Change]) -> None:
        assert self.proposer is not None and self.replica is not None
        try:
            for _ in range(10):
                current = await self._state_for_change()
                new = current
                for slot in batch:
                    try:
                        new = slot.fn(new)
                        slot.result, slot.error = new, None
                    except st.StateError as exc:
                        slot.result, slot.error = None, exc
                if new.version == current.version:
                    return
                command = SetState(current.version, new, since=current)
                result = await self._await(functools.partial(self.proposer.propose, command))
                if result.get("ok"):
                    return
                self._synced_term = None  # another leader changed it: read behind a barrier
            for slot in batch:
                slot.result, slot.error = None, Unavailable(
                    "the shard manager state kept changing; try again")
        except BaseException as exc:
            for slot in batch:
                slot.result, slot.error = None, (
                    exc if isinstance(exc, RaftKVError) else Unavailable(f"{exc!r}"))
            raise
        finally:
            for slot in batch:
                slot.done = True

    async def _state_for_change(self) -> st.ClusterState:
        """The committed state. Behind a barrier once per term: after that, every
        change of the state goes through this leader's ``_commit`` and is in
        the store when its proposal returns. (Were another leader elected
        meanwhile, the compare-and-set refuses the proposal, and the next try
        reads behind a barrier again.)"""
        assert self.replica is not None
        term = self.replica.term
        if self._synced_term == term and self.replica.is_leader:
            # The state applied last is installed before its proposer's answer
            # wakes this task: usually no decoding is needed.
            return self._decoded(self.replica.store.get(STATE_KEY))
        state = await self.committed_state()
        self._synced_term = term
        return state

    # -- requests -------------------------------------------------------------------

    def _require_leader(self) -> None:
        assert self.replica is not None
        if not self.replica.is_leader:
            leader = self.replica.leader_address
            raise NotLeader(f"shard manager {self.me.id} is not the leader",
                            leader=None if leader is None else self._client_of_raft.get(leader))

    def _dispatch(self, request: ManagerRequest, reply: OnDone) -> None:
        handler = _HANDLERS[request.op]
        assert self._nursery is not None

        async def run() -> None:
            try:
                reply(await handler(self, request.fields), None)
            except RaftKVError as exc:
                reply(None, exc)
            except st.StateError as exc:
                reply(None, BadRequest(str(exc)))
            except Exception as exc:
                log.exception("manager request %r failed", request)
                reply(None, Unavailable(f"{type(exc).__name__}: {exc}"))

        self._nursery.start_soon(run)

    async def _map(self, fields: dict[str, Any]) -> Any:
        """The client map: any replica's (possibly stale, which is harmless), or
        with ``fresh``, the leader's after a barrier (every committed change)."""
        if fields.get("fresh"):
            return (await self.committed_state()).client_map()
        after = fields.get("after")
        if after is not None:
            wait_s = min(float(fields.get("wait_s", 10.0)), MAP_WAIT_S_MAX)
            with trio.move_on_after(wait_s):
                while self._client_map["version"] <= _int(fields, "after"):
                    await self._state_changed.wait()
        return self._client_map

    async def _heartbeat(self, fields: dict[str, Any]) -> Any:
        self._require_leader()
        raw = fields.get("node")
        if not isinstance(raw, dict):
            raise BadRequest("field 'node' must be a map")
        try:
            node = st.NodeInfo(**raw)
        except TypeError as exc:
            raise BadRequest(f"bad node description: {exc}") from exc
        self.last_seen[node.id] = trio.current_time()
        self.leaders_of[node.id] = {int(s) for s in fields.get("leaders", [])}
        if self.state.nodes.get(node.id) != node:
            await self.change(lambda s: st.register_node(s, node))
        return {"version": self.state.version,
                "assignment": [vars(a) for a in self.state.assignment(node.id)]}

    async def _wait_for_heartbeats(self) -> None:
        """A new leader knows no node is alive until they heartbeat to it: wait
        for one dead-node period after taking over before judging liveness,
        or until every registered node has heartbeated to it (then there is
        nothing more to learn: a cluster just started places its first
        keyspace about 2.5 s sooner)."""
        nodes = (await self.committed_state()).nodes
        deadline = (self._leading_since or trio.current_time()) + NODE_DEAD_AFTER_S
        while trio.current_time() < deadline:
            since = self._leading_since
            if since is not None and nodes and all(
                    self.last_seen.get(n, -math.inf) >= since for n in nodes):
                return
            await trio.sleep(HEARTBEAT_WAIT_STEP_S)

    def alive(self) -> set[str]:
        now = trio.current_time()
        return {n for n, t in self.last_seen.items() if now - t < NODE_DEAD_AFTER_S}

    async def _ks_create(self, fields: dict[str, Any]) -> Any:
        defaults = self.cluster.keyspace_defaults
        name = _str(fields, "name")
        self._require_leader()
        await self._wait_for_heartbeats()
        alive = self.alive()
        new = await self.change(lambda s: st.create_keyspace(
            s, name,
            logical_shards=_int(fields, "logical_shards", defaults.logical_shards),
            replication_factor=_int(fields, "replication_factor", defaults.replication_factor),
            physical_shards=_int(fields, "physical_shards", defaults.physical_shards),
            alive=alive))
        return _keyspace_json(new, new.keyspaces[name])

    async def _ks_drop(self, fields: dict[str, Any]) -> Any:
        name = _str(fields, "name")
        new = await self.change(lambda s: st.drop_keyspace(s, name))
        return _keyspace_json(new, new.keyspaces[name]) if name in new.keyspaces else None

    async def _ks_list(self, fields: dict[str, Any]) -> Any:
        state = await self.committed_state()
        return [_keyspace_json(state, k) for k in sorted(state.keyspaces.values(),
                                                         key=lambda k: k.name)]

    async def _cluster(self, fields: dict[str, Any]) -> Any:
        state = await self.committed_state()
        now = trio.current_time()
        return {
            "state": state.to_json(),
            "manager_leader": self.me.id,
            "nodes": {n: {"alive": n in self.alive(),
                          "last_heartbeat_s_ago": None if n not in self.last_seen
                          else round(now - self.last_seen[n], 3),
                          "leads": sorted(self.leaders_of.get(n, ()))}
                      for n in state.nodes},
        }

    async def _status(self, fields: dict[str, Any]) -> Any:
        replica = self.replica
        assert replica is not None
        leader = replica.leader_address
        return {
            "manager": self.me.id, "dc": self.me.dc, "pid": os.getpid(),
            "client_address": self.me.client_address,
            "role": "leader" if replica.is_leader else "follower",
            "leader_client_address": None if leader is None else self._client_of_raft.get(
                leader),
            "term": replica.term, "commit_index": replica.commit_index,
            "applied_index": replica.last_applied, "state_version": self.state.version,
            "uptime_s": time.time() - self.started_at, "faults": self.links.spec.to_json(),
            # Since start: requests by op and error replies by code.
            "requests": dict(sorted(self._rpc.requests.items())),
            "errors": dict(sorted(self._rpc.errors.items())),
            "gc": None if self.collector is None else self.collector.to_json(),
        }

    # -- resharding ---------------------------------------------------------------

    async def _reshard(self, fields: dict[str, Any]) -> Any:
        name, count = _str(fields, "ks"), _int(fields, "physical_shards")
        if fields.get("plan"):
            return rs.preview(await self.committed_state(), name, count)
        self._require_leader()
        await self._wait_for_heartbeats()
        alive = self.alive()
        new = await self.change(lambda s: rs.start(s, name, count, alive=alive,
                                                   now=time.time()))
        return rs.progress(new, name)

    async def _reshard_status(self, fields: dict[str, Any]) -> Any:
        name = _str(fields, "ks")
        state = await self.committed_state()
        if name not in state.keyspaces:
            raise BadRequest(f"no keyspace {name!r}")
        return rs.progress(state, name)

    async def _reshard_abort(self, fields: dict[str, Any]) -> Any:
        name = _str(fields, "ks")
        return rs.progress(await self.change(lambda s: rs.abort(s, name)), name)

    async def _move_claim(self, fields: dict[str, Any]) -> Any:
        worker = _str(fields, "worker")
        per_node_max = self._per_node_max(fields)
        self._require_leader()
        if not any(rs.running(self.state, k) for k in self.state.keyspaces):
            return None  # the applied state says there is nothing: no log entry needed
        claimed: list[Any] = []

        def claim(s: st.ClusterState) -> st.ClusterState:
            new, move = rs.claim(s, worker, now=time.time(), per_node_max=per_node_max)
            claimed[:] = [move]
            return new

        new = await self.change(claim)
        return _claim_json(new, claimed[0] if claimed else None)

    @staticmethod
    def _per_node_max(fields: dict[str, Any]) -> int:
        per_node_max = _int(fields, "per_node_max", rs.PER_NODE_MAX_DEFAULT)
        if per_node_max < 1:
            raise BadRequest("field 'per_node_max' must be at least 1")
        return per_node_max

    async def _move_update(self, fields: dict[str, Any]) -> Any:
        """With ``claim_next``, a move that ends is followed by a claim of the
        next in the same state change: {"move", "next"}."""
        worker, move_id = _str(fields, "worker"), _int(fields, "move")
        steps, stats = fields.get("steps", []), fields.get("stats", {})
        if not isinstance(steps, list) or not all(
                isinstance(x, list) and len(x) == 2 and isinstance(x[0], str) for x in steps):
            raise BadRequest("field 'steps' must be a list of [phase, result]")
        if not isinstance(stats, dict):
            raise BadRequest("field 'stats' must be a map")
        claim_next = bool(fields.get("claim_next"))
        per_node_max = self._per_node_max(fields)
        claimed: list[Any] = []

        def update(s: st.ClusterState) -> st.ClusterState:
            now = time.time()
            new = rs.update(s, worker, move_id, [(p, r) for p, r in steps], stats, now=now)
            claimed.clear()
            move = new.moves[move_id]
            if claim_next and (move.phase in FINAL or move.stuck is not None):
                new, following = rs.claim(new, worker, now=now, per_node_max=per_node_max)
                claimed.append(following)
            return new

        new = await self.change(update)
        if not claim_next:
            return new.moves[move_id].to_json()
        return {"move": new.moves[move_id].to_json(),
                "next": _claim_json(new, claimed[0] if claimed else None)}

    async def _fault(self, fields: dict[str, Any]) -> Any:
        spec = fields.get("spec")
        if not isinstance(spec, dict):
            raise BadRequest("field 'spec' must be a map")
        try:
            self.links.set(FaultSpec.from_json(spec))
        except (ValueError, TypeError, AttributeError) as exc:
            raise BadRequest(f"bad fault spec: {exc}") from exc
        return self.links.spec.to_json()

    async def _ping(self, fields: dict[str, Any]) -> Any:
        return {"manager": self.me.id}

    # -- the controller (leader only) ------------------------------------------------

    async def _control_loop(self) -> None:
        assert self.replica is not None
        async with trio.open_nursery() as nursery:
            pool = ConnectionPool(nursery, connect_timeout_s=1.0)
            last_balance = 0.0
            while True:
                await trio.sleep(CONTROL_PERIOD_S)
                if not self.replica.is_leader:
                    self._leading_since = None
                    continue
                now = trio.current_time()
                if self._leading_since is None:
                    # A new leader knows nothing of liveness yet: wait one dead-node
                    # period of heartbeats before judging (and balancing) anything.
                    self._leading_since = now
                    self.last_seen.clear()
                    self.leaders_of.clear()
                try:
                    # The applied state says whether there is work; only then is
                    # the committed state read (behind a barrier, a log entry).
                    if _pending_work(self.state):
                        state = await self.committed_state()
                        await self._tell_owners(pool, state)
                        await self._purge_dropped(pool, state)
                        if any(rs.running(state, k) for k in state.keyspaces):
                            await self.change(lambda s: rs.tick(s, now=time.time()))
                    state = self.state
                    forget_other_groups(self._group_leaders, state.shards)
                    forget_other_groups(self._transfer_at, state.shards)
                    if (now - self._leading_since > NODE_DEAD_AFTER_S
                            and now - last_balance > LEADER_BALANCE_PERIOD_S):
                        last_balance = now
                        await self._balance_leaders(pool, state)
                except RaftKVError as exc:
                    log.info("controller round failed: %s", exc)

    async def _group_request(self, pool: ConnectionPool, state: st.ClusterState,
                             shard: st.ShardInfo, msg: dict[str, Any]) -> Any:
        """A request to a group's leader, trying each replica (and leader hints)."""
        addresses = [state.nodes[r.node].client_address for r in shard.replicas]
        return await request_leader(pool, addresses, {**msg, "shard": shard.id}, 5.0,
                                    leaders=self._group_leaders)

    async def _tell_owners(self, pool: ConnectionPool, state: st.ClusterState) -> None:
        pending = [s for s in state.shards.values()
                   if not s.owned and state.keyspaces[s.keyspace].state != st.KEYSPACE_DROPPING]
        if not pending:
            return
        done: list[int] = []

        async def own(shard: st.ShardInfo) -> None:
            ks = state.keyspaces[shard.keyspace]
            try:
                await self._group_request(pool, state, shard, {
                    "op": "own", "ks": ks.name, "ks_id": ks.id, "L": ks.logical_shards,
                    "ls": list(ks.logical_shards_of(shard.id))})
                done.append(shard.id)
            except RaftKVError as exc:
                log.debug("own for shard %d not applied yet: %s", shard.id, exc)

        async with trio.open_nursery() as nursery:
            for shard in pending:
                nursery.start_soon(own, shard)

        def mark(s: st.ClusterState) -> st.ClusterState:
            for shard_id in done:
                s = st.mark_owned(s, shard_id)
            return s

        if done:
            await self.change(mark)

    async def _purge_dropped(self, pool: ConnectionPool, state: st.ClusterState) -> None:
        for ks in [k for k in state.keyspaces.values() if k.state == st.KEYSPACE_DROPPING]:
            shards = [s for s in state.shards.values() if s.keyspace == ks.name]
            for shard in shards:
                while True:
                    result = await self._group_request(pool, state, shard, {
                        "op": "drop", "ks": ks.name, "ks_id": ks.id, "n": DROP_CHUNK_KEYS})
                    if not result.get("more"):
                        break
            await self.change(functools.partial(st.remove_keyspace, name=ks.name))

    async def _balance_leaders(self, pool: ConnectionPool, state: st.ClusterState) -> None:
        alive = self.alive()
        leader_of = {shard: node for node, shards in self.leaders_of.items() if node in alive
                     for shard in shards}
        nodes = [Node(NodeId(n.id), DataCenterId(n.dc), n.capacity, n.id in alive)
                 for n in state.nodes.values()]
        shards = [Shard(PhysicalShardId(s.id), len(s.replicas),
                        tuple(NodeId(r.node) for r in s.replicas),
                        NodeId(leader_of[s.id]) if s.id in leader_of else None)
                  for s in state.shards.values() if s.owned]
        if not shards:
            return
        plan = plan_placement(nodes, shards, concurrent_moves_per_node_max=1)
        now = trio.current_time()
        for target in plan.targets:
            shard = state.shards[int(target.shard)]
            current = leader_of.get(shard.id)
            members = {r.node: r for r in shard.replicas}
            if (current is None or target.leader is None or target.leader == current
                    or target.leader not in members
                    or now - self._transfer_at.get(shard.id, -1e9) < TRANSFER_RETRY_S):
                continue
            self._transfer_at[shard.id] = now
            try:
                await pool.request(state.nodes[current].client_address, {
                    "op": "transfer", "shard": shard.id,
                    "to": state.raft_address(members[target.leader])}, 2.0)
                log.info("shard %d: leadership %s -> %s", shard.id, current, target.leader)
            except RaftKVError as exc:
                log.info("shard %d: transfer request failed: %s", shard.id, exc)


def _claim_json(state: st.ClusterState, move: Any) -> dict[str, Any] | None:
    """A claimed move for its worker, with the client addresses of its groups."""
    if move is None:
        return None
    return {"move": move.to_json(), "lease_s": rs.LEASE_S,
            "shards": {str(i): [state.nodes[r.node].client_address
                                for r in state.shards[i].replicas]
                       for i in (move.src, move.dst) if i in state.shards}}


def _pending_work(state: st.ClusterState) -> bool:
    """Groups to tell what they own, or dropped keyspaces to purge."""
    return any(not s.owned for s in state.shards.values()) or any(
        k.state == st.KEYSPACE_DROPPING or rs.running(state, k.name) is not None
        for k in state.keyspaces.values())


def _keyspace_json(state: st.ClusterState, ks: st.KeyspaceInfo) -> dict[str, Any]:
    return {"name": ks.name, "id": ks.id, "logical_shards": ks.logical_shards,
            "replication_factor": ks.replication_factor, "state": ks.state,
            "physical_shards": list(ks.shard_ids)}


_HANDLERS: dict[str, Callable[[ManagerServer, dict[str, Any]], Any]] = {
    "map": ManagerServer._map,
    "heartbeat": ManagerServer._heartbeat,
    "ks_create": ManagerServer._ks_create,
    "ks_drop": ManagerServer._ks_drop,
    "ks_list": ManagerServer._ks_list,
    "cluster": ManagerServer._cluster,
    "status": ManagerServer._status,
    "fault": ManagerServer._fault,
    "reshard": ManagerServer._reshard,
    "reshard_status": ManagerServer._reshard_status,
    "reshard_abort": ManagerServer._reshard_abort,
    "move_claim": ManagerServer._move_claim,
    "move_update": ManagerServer._move_update,
    "ping": ManagerServer._ping,
}


def run_manager(cluster_dir: Path, manager_id: str, data_dir: Path | None = None) -> None:
    """Entry point of ``raftkv shardmgr``: runs until SIGTERM or SIGINT."""
    cluster, secret = configmod.load(cluster_dir)
    server = ManagerServer(cluster, secret, manager_id,
                           Path(data_dir) if data_dir else Path(cluster_dir) / manager_id,
                           load_faults(Path(cluster_dir), cluster))
    server.open()
    server.collector = tune_collector()
    run_until_signalled(server.serve, server.close)

"""A resharding worker (``raftkv reshard-worker``): claims moves from the
shard manager and carries out their phases in the groups.

The worker keeps nothing that matters: the move's phase lives in the
manager's state, and every step it sends a group is idempotent. It reports
the groups' answers (``move_update``, a compare-and-set on the phase that
also renews its lease) twice per move: before the freeze, and at the end,
where the same manager change claims its next move (``_REPORT_BEFORE``;
every report is a change of the manager's replicated state). If a report is
refused, the move went to another worker (or was aborted) and this one drops
it. Nothing is reported inside the cutover (freeze, the last delta that
activates, moved), so the logical shard is unavailable only for the groups'
own steps; a worker dying there leaves the move in ``freeze``, which its
successor redoes (a frozen source answers the same final seq).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import time
from dataclasses import replace
from typing import Any

import trio

from raftkv.client.client import (
    AsyncClient,
    ConnectionPool,
    forget_other_groups,
    open_client,
    request_leader,
)
from raftkv.errors import BadRequest, RaftKVError
from raftkv.statemachine import layout
from shardmgr.moves import FINAL, PAGE_KEYS, Move, MoveError, action, advance

log = logging.getLogger(__name__)

SHIP_RECORDS = 500
CATCHUP_LAG_RECORDS = 20  # freeze once a round of catch-up ships fewer than this
CATCHUP_ROUNDS_MAX = 50
PROGRESS_EVERY_S = 2.0
IDLE_POLL_S = 0.3
GROUP_TIMEOUT_S = 30.0  # a step waits out leader elections up to this long
# The worker reports to the manager (a state change there) only before these
# phases, or when PROGRESS_EVERY_S has passed: before the freeze (where an abort
# is still cheap) and at the end (the map changes with it). Never inside the
# cutover, which stays as short as the groups' own steps.
_REPORT_BEFORE = ("freeze", "done", "aborted")
_CUTOVER = ("ship", "activate", "moved")


class MoveDropped(Exception):
    """The manager no longer gives this worker the move."""


class Worker:
    def __init__(self, kv: AsyncClient, pool: ConnectionPool, worker_id: str, *,
                 per_node_max: int, keys_per_s: float | None = None) -> None:
        self.kv = kv
        self.pool = pool
        self.id = worker_id
        self.per_node_max = per_node_max
        self.keys_per_s = keys_per_s  # a budget for the copy: the reshard's pace (0, None: none)
        self._paced_at = time.monotonic()
        self._tokens = 0.0
        self.moves_done = 0
        self._shipped: dict[int, int] = {}
        self._min_index: dict[int, int] = {}
        self._leaders: dict[int, str] = {}  # the address that last answered, by group
        self._next: dict[str, Any] | None = None  # claimed with the last move's last report
        self._stats: dict[str, Any] = {}  # figures for the next report
        self._last_report = time.monotonic()

    async def run(self, *, exit_when_idle: bool = False) -> None:
        """Claim and drive moves until cancelled (or, with ``exit_when_idle``,
        until the manager has none to give)."""
        while True:
            try:
                claim, self._next = self._next, None
                if claim is None:
                    claim = await self.kv.manager({"op": "move_claim", "worker": self.id,
                                                   "per_node_max": self.per_node_max})
            except RaftKVError as exc:
                log.warning("claim failed: %s", exc)
                await trio.sleep(1.0)
                continue
            if claim is None:
                if exit_when_idle:
                    return
                await trio.sleep(IDLE_POLL_S)
                continue
            try:
                await self.drive(Move.from_json(claim["move"]),
                                 {int(k): v for k, v in claim["shards"].items()})
            except MoveDropped as exc:
                log.info("%s", exc)
            except RaftKVError as exc:
                # The lease runs out and another worker (or this one) takes over.
                log.warning("move %s: %s", claim["move"]["id"], exc)
                await trio.sleep(1.0)

    async def drive(self, move: Move, shards: dict[int, list[str]]) -> None:
        """Carry ``move`` from its phase to its end (or until it is dropped)."""
        forget_other_groups(self._leaders, shards)
        try:
            await self._drive(move, shards)
        finally:
            self._shipped.pop(move.id, None)
            self._min_index.pop(move.id, None)

    async def _drive(self, move: Move, shards: dict[int, list[str]]) -> None:
        pending: list[list[Any]] = []  # [phase, result] not reported yet
        frozen_at: float | None = None
        self._stats = {}
        self._last_report = time.monotonic()
        frozen: dict[str, Any] | None = None  # the freeze's answer, with records
        activated_at: float | None = None
        while move.phase not in FINAL and move.stuck is None:
            act = action(move)
            if move.phase == "freeze":
                # The source answers with the records since the catch-up, and
                # sends clients to the destination while it is frozen.
                frozen_at = time.monotonic()
                result = frozen = await self._send(move, move.src, "freeze", {
                    "dest": move.dst, "from": self._shipped.get(move.id, 0) + 1}, shards)
            elif move.phase == "activate" and activated_at is not None:
                result = {"active": True}  # the last delta activated it
            elif act.kind == "step":
                assert act.shard is not None and act.step is not None
                result = await self._send(move, act.shard, act.step, act.data, shards)
            elif act.kind == "copy":
                result = await self._copy(move, shards)
            elif act.kind == "ship":
                result = await self._ship(move, shards, act.data.get("upto"), frozen)
            else:
                raise MoveError(f"move {move.id}: no worker action for {act.kind}")
            if result.get("active") and move.phase in ("ship", "activate") \
                    and activated_at is None:
                activated_at = time.monotonic()
                if frozen_at is not None:
                    # Freeze to activation: the frozen source sends clients to the
                    # destination, which serves them from its activation on.
                    self._stats["unavailable_ms"] = round((activated_at - frozen_at) * 1000, 3)
                    log.info("move %d: logical shard %d, %d -> %d, frozen at %.6f for %.1f ms",
                             move.id, move.ls, move.src, move.dst,
                             time.time() - (activated_at - frozen_at),
                             self._stats["unavailable_ms"])
            if move.phase in ("capture", "freeze") and isinstance(result.get("i"), int):
                # Reads of the source need a state that includes this entry, and
                # not a barrier each (see the node's move_read).
                self._min_index[move.id] = max(self._min_index.get(move.id, 0), result["i"])
            pending.append([move.phase, {k: v for k, v in result.items() if k != "records"}])
            try:
                after: Move | None = advance(move, result)
            except MoveError:
                after = None  # reported: the manager marks the move stuck
            if after is not None and after.phase == "publish":
                # The manager publishes when it hears of the moved step: that is
                # in the next report (the frozen source redirects clients meanwhile).
                after = replace(after, phase="cleanup")
            if after is not None and after.phase not in _REPORT_BEFORE and (
                    after.phase in _CUTOVER
                    or time.monotonic() - self._last_report < PROGRESS_EVERY_S):
                move = after  # idempotent steps: a successor would redo them
                continue
            move = await self._report(move.id, pending)
            pending = []
        if move.phase == "done":
            self.moves_done += 1

    async def _report(self, move_id: int, steps: list[list[Any]]) -> Move:
        stats, self._stats = self._stats, {}
        self._last_report = time.monotonic()
        try:
            # A move that ends claims the next in the same change of the manager's state.
            raw = await self.kv.manager({"op": "move_update", "worker": self.id, "move": move_id,
                                         "steps": steps, "stats": stats, "claim_next": True,
                                         "per_node_max": self.per_node_max})
        except BadRequest as exc:
            raise MoveDropped(f"move {move_id} dropped: {exc.message}") from exc
        self._next = raw["next"]
        return Move.from_json(raw["move"])

    async def _progress(self, move: Move) -> None:
        """Renew the lease during a long phase (and report figures so far)."""
        if time.monotonic() - self._last_report >= PROGRESS_EVERY_S:
            await self._report(move.id, [])

    async def _group(self, shards: dict[int, list[str]], shard: int,
                     msg: dict[str, Any]) -> Any:
        """``msg`` to the leader of ``shard``, waiting out an election."""
        deadline = trio.current_time() + GROUP_TIMEOUT_S
        delay = 0.05
        while True:
            try:
                return await request_leader(self.pool, shards[shard], {**msg, "shard": shard},
                                            10.0, leaders=self._leaders)
            except BadRequest:
                raise  # a bug, not an election: waiting will not help
            except RaftKVError:
                if trio.current_time() + delay > deadline:
                    raise
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _send(self, move: Move, shard: int, step: str, data: dict[str, Any],
                    shards: dict[int, list[str]]) -> dict[str, Any]:
        result: dict[str, Any] = await self._group(shards, shard, {
            "op": "move", "step": step, "ks_id": move.ks_id, "ls": move.ls, "move": move.id,
            "data": data})
        return result

    async def _copy(self, move: Move, shards: dict[int, list[str]]) -> dict[str, Any]:
        """Page the logical shard's keys from the source into the destination,
        from where the destination's cursor is, up to the greatest key at the
        first page (keys written since are in the changelog)."""
        cursor, end, keys = b"", None, 0
        first = True
        while True:
            page = await self._group(shards, move.src, {
                "op": "move_read", "ks_id": move.ks_id, "ls": move.ls, "after": cursor,
                "limit": PAGE_KEYS, "min_index": self._min_index.get(move.id, 0)})
            if first:
                end, first = page["end"], False
            items = page["items"]
            if not items or end is None:
                break
            last = bytes(items[-1][0])
            result = await self._send(move, move.dst, "ingest",
                                      {"cursor": cursor, "next": last, "kvs": items}, shards)
            if result.get("active"):
                break  # a predecessor went through the cutover and died before reporting
            if result.get("stale"):
                cursor = bytes(result["cursor"])  # a predecessor copied up to there
                if cursor >= end:
                    break
                continue
            if "err" in result:
                return result
            copied = sum(1 for k, _ in items if bytes(k).startswith(layout.DATA_PREFIX))
            keys += copied
            await self._pace(len(items))
            self._add("keys", copied)
            self._add("bytes", sum(len(k) + len(v) for k, v in items))
            cursor = last
            if not page["more"] or cursor >= end:
                break
            await self._progress(move)
        return {"copied": keys}  # the count goes in the stats (as the copy goes)

    async def _ship(self, move: Move, shards: dict[int, list[str]], upto: int | None,
                    frozen: dict[str, Any] | None = None) -> dict[str, Any]:
        """Changelog records into the destination: until a round is small
        (catch-up), or up to the final seq ``upto``, activating the copy with
        the last of them (the cutover; ``frozen``: the freeze's answer, whose
        records need no read)."""
        # Where this worker's catch-up left the destination (a guess: a stale
        # answer corrects it): the cutover then ships only what is new.
        applied, rounds = self._shipped.get(move.id, 0), 0
        while True:
            rounds += 1
            if upto is not None and applied > upto:
                return {"err": "MOVE_REFUSED", "state": None, "move": move.id,
                        "msg": f"the destination applied {applied} records, past the "
                               f"final seq {upto}"}
            if upto is not None and applied == upto:
                records: list[Any] = []
            elif frozen is not None and frozen.get("from") == applied + 1:
                records, frozen = frozen["records"], None
            else:
                got = await self._group(shards, move.src, {
                    "op": "move_read", "ks_id": move.ks_id, "ls": move.ls, "move": move.id,
                    "from": applied + 1, "limit": SHIP_RECORDS,
                    "min_index": self._min_index.get(move.id, 0)})
                records = got["records"]
                if not records:
                    if upto is None:
                        break
                    return {"err": "MOVE_REFUSED", "state": None, "move": move.id,
                            "msg": f"the source's changelog ends at {applied}, before {upto}"}
            data: dict[str, Any] = {"from": applied + 1, "records": records}
            if upto is not None:
                data["activate"] = upto
            result = await self._send(move, move.dst, "delta", data, shards)
            if result.get("active"):
                self._add("records", len(records))
                return {"seq": applied if upto is None else upto, "active": True}
            if result.get("stale"):
                applied = int(result["seq"])  # the destination has these already
                continue
            if "err" in result:
                return result
            applied = int(result["seq"])
            self._add("records", len(records))
            if upto is None and (len(records) < CATCHUP_LAG_RECORDS
                                 or rounds >= CATCHUP_ROUNDS_MAX):
                break
            if upto is None:  # never a report inside the cutover
                await self._progress(move)
        self._shipped[move.id] = applied
        return {"seq": applied}

    async def _pace(self, keys: int) -> None:
        """Keep this worker's copy at ``keys_per_s`` (each key copied is applied,
        and later deleted, on every replica of two groups: CPU the groups'
        clients share)."""
        if not self.keys_per_s:
            return
        # A token bucket holding at most a page of keys: an idle spell (the
        # move's steps) earns no burst that would copy a logical shard at once.
        now = time.monotonic()
        self._tokens = min(PAGE_KEYS, self._tokens + (now - self._paced_at)
                           * self.keys_per_s) - keys
        self._paced_at = now
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self.keys_per_s)

    def _add(self, name: str, n: int) -> None:
        self._stats[name] = self._stats.get(name, 0) + n


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


async def run_workers(managers: list[str], count: int, *, per_node_max: int,
                      keys_per_s: float | None = None,
                      exit_when_idle: bool = False, worker_id: str | None = None) -> None:
    """``count`` workers in this process (``raftkv reshard-worker``)."""
    base = worker_id or default_worker_id()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_client(managers, watch_map=False, retry_budget_s=30.0) as kv, \
                trio.open_nursery() as nursery:
            pool = ConnectionPool(nursery)

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("signal %d: stopping", signum)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            async with trio.open_nursery() as workers:
                for i in range(count):
                    worker = Worker(kv, pool, base if count == 1 else f"{base}.{i}",
                                    per_node_max=per_node_max, keys_per_s=keys_per_s)
                    workers.start_soon(functools.partial(worker.run,
                                                         exit_when_idle=exit_when_idle))
            nursery.cancel_scope.cancel()

"""Resharding, as the shard manager's replicated state sees it: pure functions
from one ``ClusterState`` to the next, no I/O. The manager's leader calls them
(inside its compare-and-set change) for the ``reshard`` requests of the CLI
and the ``move_claim`` / ``move_update`` requests of the workers, and its
controller calls ``tick`` to finish what is finished.

A reshard of keyspace K to N physical shards:

1. ``start``: creates the new groups a split needs (placed like a new
   keyspace's), chooses the groups the logical shards spread over (a merge
   keeps the fullest), and records one ``Move`` per logical shard that must
   change group (``shardmgr.moves.plan``: balanced, minimal).
2. Workers ``claim`` moves with a lease (``LEASE_S``), at most
   ``per_node_max`` leased moves touching any node (a node hosting a replica
   of the source or the destination group), and report each phase's results
   with ``update``: a compare-and-set on the move's phase by the lease
   holder. A worker that dies loses its lease; the next claim hands the move
   to another worker, which redoes the phase it finds (every step is
   idempotent in the groups). ``publish`` is the manager's own step: when a
   move reaches it, the map sends the logical shard to its destination in the
   same state change.
3. ``tick``: when every move has finished, groups that hold no logical shard
   any more are removed (their nodes close and delete the replicas), and the
   reshard is ``done`` with a summary of what moved.

``abort`` turns back every move that has not activated; moves that finished
are then moved back (``rolling_back``), and the new groups removed, so the
keyspace ends on its old layout (``aborted``).
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any

from shardmgr.moves import (
    FINAL,
    RESHARD_ABORTED,
    RESHARD_ABORTING,
    RESHARD_DONE,
    RESHARD_LIVE,
    RESHARD_ROLLING_BACK,
    RESHARD_RUNNING,
    Move,
    MoveError,
    Reshard,
    advance,
    plan,
    request_abort,
)
from shardmgr.state import (
    KEYSPACE_ACTIVE,
    PHYSICAL_SHARDS_PER_KEYSPACE_MAX,
    ClusterState,
    StateError,
    _bump,
    new_shards,
)

LEASE_S = 10.0
PER_NODE_MAX_DEFAULT = 4
# Keys a worker copies per second unless told otherwise (``--max-keys-per-s``;
# 0 there for no limit). Each key copied is applied, and later deleted, on
# every replica of two groups: CPU and disk the groups' clients share. With
# the default two workers this keeps `raftkv bench reshard`'s background p99
# at about twice its value before the reshard here, where an unpaced copy
# raises it 2.4-5.7x (docs/PERFORMANCE.md, 2026-12-05).
COPY_KEYS_PER_S_DEFAULT = 1750.0


class MoveLost(StateError):
    """The move is not this worker's any more (its lease passed to another
    worker, or an abort turned it): the worker drops it."""


def running(state: ClusterState, keyspace: str) -> Reshard | None:
    job = state.reshards.get(keyspace)
    return job if job is not None and job.state in RESHARD_LIVE else None


def preview(state: ClusterState, keyspace: str, physical_shards: int) -> dict[str, Any]:
    """What ``start`` would do: the groups kept, made and removed, and the moves
    (new groups shown as ``+1``, ``+2``, ...)."""
    ks, targets, created = _targets(state, keyspace, physical_shards)
    # The ids start would give the new groups, so the plan is the same.
    new_ids = range(state.next_shard_id, state.next_shard_id + created)
    targets = [t for t in targets if t > 0] + list(new_ids)
    names: dict[int, int | str] = {t: t for t in targets}
    names.update({shard: f"+{i}" for i, shard in enumerate(new_ids, 1)})
    moves = plan(list(ks.logical_map), targets)
    return {"keyspace": keyspace, "from": list(ks.shard_ids), "to": physical_shards,
            "new_shards": created,
            "removed": [s for s in ks.shard_ids if s not in targets],
            "moves": [[ls, src, names[dst]] for ls, src, dst in moves]}


def _targets(state: ClusterState, keyspace: str,
             physical_shards: int) -> tuple[Any, list[int], int]:
    """The keyspace, the shards its logical shards will spread over (new ones
    as -1, -2, ...), and how many new ones that takes."""
    ks = state.keyspaces.get(keyspace)
    if ks is None:
        raise StateError(f"no keyspace {keyspace!r}")
    if ks.state != KEYSPACE_ACTIVE:
        raise StateError(f"keyspace {keyspace!r} is {ks.state}, not active")
    if not 1 <= physical_shards <= min(ks.logical_shards, PHYSICAL_SHARDS_PER_KEYSPACE_MAX):
        raise StateError(f"physical shards must be from 1 to the keyspace's logical shard "
                         f"count ({ks.logical_shards}), not {physical_shards}")
    current = list(ks.shard_ids)
    if physical_shards >= len(current):
        created = physical_shards - len(current)
        return ks, current + [-i for i in range(1, created + 1)], created
    # A merge keeps the groups that hold the most (fewest keys to move).
    held = {s: ks.logical_map.count(s) for s in current}
    kept = sorted(current, key=lambda s: (-held[s], s))[:physical_shards]
    return ks, sorted(kept), 0


def start(state: ClusterState, keyspace: str, physical_shards: int, *,
          alive: set[str], now: float) -> ClusterState:
    """Begin resharding ``keyspace`` to ``physical_shards`` groups. The same
    request again while it runs changes nothing; another target is refused."""
    job = running(state, keyspace)
    if job is not None:
        if job.target == physical_shards and job.state == RESHARD_RUNNING:
            return state
        raise StateError(f"keyspace {keyspace!r} is already being resharded to "
                         f"{job.target} physical shards ({job.state}); wait for it or "
                         "abort it first")
    ks, targets, created = _targets(state, keyspace, physical_shards)
    shards, new_ids = dict(state.shards), list[int]()
    if created:
        live = sorted(alive & set(state.nodes))
        if len(live) < ks.replication_factor:
            raise StateError(f"new groups need {ks.replication_factor} live nodes; "
                             f"{len(live)} are live")
        shards, new_ids = new_shards(state, keyspace, created, ks.replication_factor, live)
        targets = [t for t in targets if t > 0] + new_ids
    reshard_id = max([r.id for r in state.reshards.values()] + [0]) + 1
    moves = dict(state.moves)
    next_id = state.next_move_id
    planned = plan(list(ks.logical_map), targets)
    for ls, src, dst in planned:
        moves[next_id] = Move(next_id, keyspace, ks.id, ks.logical_shards, ls, src, dst,
                              reshard=reshard_id)
        next_id += 1
    job = Reshard(reshard_id, keyspace, physical_shards, ks.shard_ids, tuple(sorted(targets)),
                  RESHARD_RUNNING, now, moves_total=len(planned))
    return _bump(state, shards=shards, next_shard_id=state.next_shard_id + created,
                 moves=moves, next_move_id=next_id,
                 reshards={**state.reshards, keyspace: job})


def abort(state: ClusterState, keyspace: str) -> ClusterState:
    """Turn a running reshard back (see the module's doc). Again while it
    turns back: nothing changes."""
    job = state.reshards.get(keyspace)
    if job is None or job.state not in RESHARD_LIVE:
        raise StateError(f"keyspace {keyspace!r} has no reshard running")
    if job.state != RESHARD_RUNNING:
        return state
    moves = dict(state.moves)
    for move in _moves_of(state, job):
        if move.phase in FINAL:
            continue
        if move.stuck is not None:  # the operator's abort gives it another try
            moves[move.id] = replace(move, stuck=None, worker=None, lease_until=0.0)
        if not move.started:
            moves[move.id] = replace(move, phase="aborted", error="aborted before it started")
        else:
            turned = request_abort(moves[move.id])
            if turned.phase != move.phase:  # the holder finds it changed; anyone may claim it
                moves[move.id] = replace(turned, worker=None, lease_until=0.0)
    return _bump(state, moves=moves,
                 reshards={**state.reshards, keyspace: replace(job, state=RESHARD_ABORTING)})


def _moves_of(state: ClusterState, job: Reshard) -> list[Move]:
    return [m for _, m in sorted(state.moves.items()) if m.reshard == job.id]


def _nodes_of(state: ClusterState, move: Move) -> set[str]:
    return {r.node for shard in (move.src, move.dst) if shard in state.shards
            for r in state.shards[shard].replicas}


def claim(state: ClusterState, worker: str, *, now: float,
          per_node_max: int = PER_NODE_MAX_DEFAULT) -> tuple[ClusterState, Move | None]:
    """A move for ``worker`` (with a fresh lease), or None if none may start
    now. A worker asking again gets the move it holds."""
    live = [m for m in state.moves.values() if m.phase not in FINAL and m.stuck is None]
    for move in sorted(live, key=lambda m: m.id):
        if move.worker == worker and move.lease_until > now:
            renewed = _lease(state, move, worker, now)
            return renewed, renewed.moves[move.id]
    busy: dict[str, int] = {}
    for move in live:
        if move.worker is not None and move.lease_until > now:
            for node in _nodes_of(state, move):
                busy[node] = busy.get(node, 0) + 1
    # Moves that have started first (a dead worker's), then in id order.
    for move in sorted(live, key=lambda m: (not m.started, m.id)):
        if move.worker is not None and move.lease_until > now:
            continue
        if not all(
                s in state.shards and state.shards[s].owned for s in (move.src, move.dst)):
            continue  # a new group not serving yet
        if any(busy.get(n, 0) >= per_node_max for n in _nodes_of(state, move)):
            continue
        new = _lease(state, replace(move, started=True), worker, now)
        return new, new.moves[move.id]
    return state, None


def _lease(state: ClusterState, move: Move, worker: str, now: float) -> ClusterState:
    moves = {**state.moves, move.id: replace(move, worker=worker, lease_until=now + LEASE_S)}
    return _bump(state, moves=moves)


def update(state: ClusterState, worker: str, move_id: int, steps: list[tuple[str, Any]],
           stats: dict[str, Any], *, now: float) -> ClusterState:
    """``worker`` reports results of its move's phases, in order (``steps``:
    ``(phase, result)``), and figures (``stats``: ``bytes``, ``keys``,
    ``records`` to add; ``unavailable_ms``). The lease is renewed, also with no
    steps. MoveLost if the move is not the worker's, or not in the first
    step's phase any more."""
    move = state.moves.get(move_id)
    if move is None or move.worker != worker or move.lease_until <= now:
        raise MoveLost(f"move {move_id} is not held by worker {worker!r}")
    if steps and steps[0][0] != move.phase:
        raise MoveLost(f"move {move_id} is in phase {move.phase}, not {steps[0][0]}")
    keyspaces = dict(state.keyspaces)
    for phase, result in steps:
        if phase != move.phase:
            raise StateError(f"move {move_id}: step for phase {phase} after {move.phase}")
        if not isinstance(result, dict):
            raise StateError(f"move {move_id}: the result of {phase} must be a map")
        try:
            move = advance(move, result)
        except MoveError as exc:
            move = replace(move, stuck=str(exc))
            break
        if move.phase == "publish":  # the manager's own step: the map changes now
            ks = keyspaces[move.keyspace]
            mapped = list(ks.logical_map)
            mapped[move.ls] = move.dst
            keyspaces[ks.name] = replace(ks, logical_map=tuple(mapped))
            move = replace(move, phase="cleanup")
    move = replace(
        move,
        copied_keys=move.copied_keys + _count(stats, "keys"),
        copied_bytes=move.copied_bytes + _count(stats, "bytes"),
        shipped=move.shipped + _count(stats, "records"),
        unavailable_ms=_ms(stats.get("unavailable_ms"), move.unavailable_ms))
    if move.phase in FINAL or move.stuck is not None:
        move = replace(move, worker=None, lease_until=0.0)
    else:
        move = replace(move, lease_until=now + LEASE_S)
    return _bump(state, moves={**state.moves, move_id: move}, keyspaces=keyspaces)


def _count(stats: dict[str, Any], name: str) -> int:
    value = stats.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StateError(f"stats field {name!r} must be a count")
    return value


def _ms(value: Any, old: float | None) -> float | None:
    if value is None:
        return old
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise StateError("stats field 'unavailable_ms' must be a duration")
    return float(value)


def tick(state: ClusterState, *, now: float) -> ClusterState:
    """Carry every reshard whose moves have all finished to its next state."""
    for job in list(state.reshards.values()):
        if job.state not in RESHARD_LIVE:
            continue
        moves = _moves_of(state, job)
        if any(m.phase not in FINAL for m in moves):
            continue
        if job.state == RESHARD_ABORTING and any(m.phase == "done" for m in moves):
            state = _roll_back(state, job, moves)
            continue
        state = _finish(state, job, moves, now)
    return state


def _roll_back(state: ClusterState, job: Reshard, moves: list[Move]) -> ClusterState:
    """Move back what had moved: each finished move's logical shard goes home."""
    new_moves = dict(state.moves)
    next_id = state.next_move_id
    summary = _summary(job.summary, moves)
    for move in moves:
        del new_moves[move.id]
        if move.phase == "done":
            new_moves[next_id] = Move(next_id, move.keyspace, move.ks_id, move.total, move.ls,
                                      move.dst, move.src, reshard=job.id)
            next_id += 1
    job = replace(job, state=RESHARD_ROLLING_BACK, summary=summary)
    return _bump(state, moves=new_moves, next_move_id=next_id,
                 reshards={**state.reshards, job.keyspace: job})


def _finish(state: ClusterState, job: Reshard, moves: list[Move], now: float) -> ClusterState:
    """Remove the groups left with no logical shard, forget the moves, keep a summary."""
    ks = state.keyspaces[job.keyspace]
    mapped = set(ks.logical_map)
    shards = {i: s for i, s in state.shards.items()
              if s.keyspace != job.keyspace or i in mapped}
    final = RESHARD_DONE if job.state == RESHARD_RUNNING else RESHARD_ABORTED
    summary = _summary(job.summary, moves)
    summary["removed_shards"] = sorted(set(state.shards) - set(shards))
    job = replace(job, state=final, finished_at=now, summary=summary)
    return _bump(state, shards=shards,
                 moves={i: m for i, m in state.moves.items() if m.reshard != job.id},
                 reshards={**state.reshards, job.keyspace: job})


def _summary(before: dict[str, Any], moves: list[Move]) -> dict[str, Any]:
    out = dict(before)
    for name, value in (("keys", sum(m.copied_keys for m in moves)),
                        ("bytes", sum(m.copied_bytes for m in moves)),
                        ("records", sum(m.shipped for m in moves)),
                        ("moved", sum(1 for m in moves if m.phase == "done")),
                        ("aborted", sum(1 for m in moves if m.phase == "aborted"))):
        out[name] = out.get(name, 0) + value
    out["unavailable_ms"] = sorted(out.get("unavailable_ms", []) + [
        round(m.unavailable_ms, 3) for m in moves if m.unavailable_ms is not None])
    return out


def progress(state: ClusterState, keyspace: str) -> dict[str, Any] | None:
    """The keyspace's latest reshard and its moves' figures so far."""
    job = state.reshards.get(keyspace)
    if job is None:
        return None
    moves = _moves_of(state, job)
    live = _summary(job.summary, moves)
    phases: dict[str, int] = {}
    for move in moves:
        phases[move.phase] = phases.get(move.phase, 0) + 1
    unavailable = live.pop("unavailable_ms")
    return {
        **job.to_json(), "summary": None,
        "moves_done": live["moved"], "moves_aborted": live["aborted"],
        "keys": live["keys"], "bytes": live["bytes"], "records": live["records"],
        "phases": phases,
        "stuck": [{"move": m.id, "ls": m.ls, "phase": m.phase, "error": m.stuck}
                  for m in moves if m.stuck is not None],
        "leases": [{"move": m.id, "worker": m.worker, "phase": m.phase}
                   for m in moves if m.worker is not None and m.phase not in FINAL],
        "unavailable_ms": percentiles(unavailable),
        "removed_shards": job.summary.get("removed_shards", []),
    }


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None, "count": 0}
    ordered = sorted(values)
    return {"p50": round(statistics.median(ordered), 3),
            "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
            "max": round(ordered[-1], 3), "count": len(ordered)}

"""Resharding, the coordinator's side: which logical shards move where, and
each move's phases. Pure: plain values in and out; the shard manager keeps
moves in its replicated state and workers carry out the actions.

A move's ``phase`` names the next thing to do. ``action(move)`` says what
that is (a step in one group, the bulk copy, shipping the changelog, or a
change of the map); a worker does it and ``advance(move, result)`` gives the
move after it, from the group's answer. Every step is idempotent in the
groups (``raftkv/statemachine/moves.py``), so a successor that finds a move
in any phase (its worker or the coordinator crashed) simply does the
phase's action again:

    prepare -> capture -> copy -> catchup -> freeze -> ship -> activate
            -> moved -> publish -> cleanup -> done

An abort is possible until the destination activates: ``abort`` (in the
destination's log, where it races ``activate`` and the first one applied
wins), then ``unfreeze`` the source and ``purge`` the partial copy:

    abort -> unfreeze -> purge -> aborted

If the destination answers that it already activated, the move goes on
forward instead (``moved``): nothing is lost either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

FORWARD = ("prepare", "capture", "copy", "catchup", "freeze", "ship", "activate", "moved",
           "publish", "cleanup", "done")
BACKWARD = ("abort", "unfreeze", "purge", "aborted")
PHASES = FORWARD + BACKWARD
FINAL = ("done", "aborted")
# Phases from which an abort is still possible (the destination has not activated).
ABORTABLE = FORWARD[:FORWARD.index("activate") + 1]
# Keys one entry of a move touches at most: a copy page, and a cleanup (or
# purge) chunk. A node's hub thread applies the entries of every group it
# hosts, so an entry deleting a whole logical shard (2,000 keys, until
# 2026-12-05) held all of them back for milliseconds, and raised the clients'
# p99 latency during a reshard by about a quarter (docs/PERFORMANCE.md).
PAGE_KEYS = 100
DELETE_CHUNK = PAGE_KEYS


@dataclass(frozen=True, slots=True)
class Move:
    """Logical shard ``ls`` of keyspace ``keyspace`` (id ``ks_id``, ``total``
    logical shards) from physical shard ``src`` to ``dst``."""

    id: int
    keyspace: str
    ks_id: int
    total: int
    ls: int
    src: int
    dst: int
    phase: str = "prepare"
    final_seq: int | None = None
    copied_keys: int = 0
    error: str | None = None
    reshard: int = 0
    """The reshard this move belongs to."""
    worker: str | None = None
    lease_until: float = 0.0
    """Wall-clock time (the manager leader's) until which ``worker`` holds the move."""
    started: bool = False
    """A worker has claimed it: its steps may have reached the groups."""
    copied_bytes: int = 0
    shipped: int = 0
    """Changelog records shipped."""
    unavailable_ms: float | None = None
    """Freeze to moved, as the worker measured it: the logical shard's cutover."""
    stuck: str | None = None
    """A result that fits no phase (``MoveError``): no worker gets the move
    until an operator aborts the reshard."""

    def to_json(self) -> dict[str, Any]:
        """Fields that differ from their defaults: a reshard keeps every move
        in the manager's state, a record each (``shardmgr.machine``)."""
        out = {}
        for name, default in _MOVE_FIELDS:
            value = getattr(self, name)
            if value is not default and value != default:
                out[name] = value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Move:
        return cls(**data)


_MOVE_FIELDS = [(f.name, f.default) for f in fields(Move)]  # MISSING: always written


@dataclass(frozen=True)
class Action:
    """What the move's phase needs done.

    ``kind``: ``step`` (send ``step`` with ``data`` to the leader of
    ``shard``), ``copy`` (bulk copy from ``src`` into ``shard``), ``ship``
    (changelog records from ``src`` into ``shard``, up to ``data["upto"]``
    when given, else until the lag is small), ``publish`` (the shard manager
    maps the logical shard to ``shard``), or ``none`` (the move is over)."""

    kind: str
    shard: int | None = None
    step: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


class MoveError(Exception):
    """A result that does not fit the move's phase (a bug, or a group that
    lost its state): the move needs an operator."""


def action(move: Move) -> Action:
    phase = move.phase
    if phase == "prepare":
        return Action("step", move.dst, "prepare", {"name": move.keyspace, "total": move.total})
    if phase in ("capture", "freeze"):
        return Action("step", move.src, phase)
    if phase == "copy":
        return Action("copy", move.dst)
    if phase == "catchup":
        return Action("ship", move.dst)
    if phase == "ship":
        return Action("ship", move.dst, data={"upto": move.final_seq})
    if phase == "activate":
        return Action("step", move.dst, "activate", {"seq": move.final_seq})
    if phase == "moved":
        return Action("step", move.src, "moved", {"dest": move.dst})
    if phase == "publish":
        return Action("publish", move.dst)
    if phase == "cleanup":
        return Action("step", move.src, "cleanup", {"n": DELETE_CHUNK})
    if phase == "abort":
        return Action("step", move.dst, "abort")
    if phase == "unfreeze":
        return Action("step", move.src, "unfreeze")
    if phase == "purge":
        return Action("step", move.dst, "purge", {"n": DELETE_CHUNK})
    return Action("none")


def _next(phase: str) -> str:
    order = FORWARD if phase in FORWARD else BACKWARD
    return order[order.index(phase) + 1]


def advance(move: Move, result: dict[str, Any]) -> Move:
    """The move after its phase's action answered ``result`` (a group step's
    apply result; for copy and ship, the worker's summary)."""
    phase = move.phase
    if phase in FINAL:
        return move
    refused = result.get("err") == "MOVE_REFUSED"
    if phase == "activate" and refused:
        # Only an abort applied first refuses an activation of this move.
        return replace(move, phase="unfreeze", error="aborted before activation")
    if phase == "abort" and refused and result.get("state") == "ACTIVE":
        return replace(move, phase="moved", error=None)  # activated first: finish it
    if refused:
        raise MoveError(f"move {move.id} ({phase}): {result.get('msg')} "
                        f"(found {result.get('state')} of move {result.get('move')})")
    if phase in ("cleanup", "purge") and result.get("more"):
        return move  # another chunk
    if phase == "freeze":
        return replace(move, phase="ship", final_seq=int(result["seq"]))
    if phase in ("ship", "activate") and result.get("stale"):
        return move  # the destination is behind: ship again
    if phase == "copy":
        return replace(move, phase="catchup")  # the keys were counted in the reports
    return replace(move, phase=_next(phase))


def request_abort(move: Move) -> Move:
    """Stop a move that has not activated: turn back. From ``activate`` an
    activation may be in flight, so the abort step itself decides, in the
    destination's log. Later (or when already turning back), nothing changes."""
    if move.phase in ABORTABLE:
        return replace(move, phase="abort", error="aborted on request")
    return move


def plan(assignment: list[int], targets: list[int]) -> list[tuple[int, int, int]]:
    """Moves ``(logical shard, from, to)`` that spread the logical shards of
    ``assignment`` (logical shard -> physical shard) evenly over ``targets``
    (each gets ``len // len(targets)`` or one more), moving as few as possible:
    a logical shard stays where it is when that shard is a target with room.
    Deterministic: ties go to the lower shard id."""
    if not targets:
        raise ValueError("a keyspace needs at least one physical shard")
    targets = sorted(set(targets))
    base, extra = divmod(len(assignment), len(targets))
    # The shards that already hold the most keep the larger quotas: fewer moves.
    held = {t: sum(1 for s in assignment if s == t) for t in targets}
    by_load = sorted(targets, key=lambda t: (-held[t], t))
    quota = {t: base + (1 if i < extra else 0) for i, t in enumerate(by_load)}
    kept = dict.fromkeys(targets, 0)
    leaving = []
    for ls, shard in enumerate(assignment):
        if shard in kept and kept[shard] < quota[shard]:
            kept[shard] += 1
        else:
            leaving.append(ls)
    moves = []
    for ls in leaving:
        dest = min(targets, key=lambda t: (kept[t] - quota[t], t))
        kept[dest] += 1
        moves.append((ls, assignment[ls], dest))
    return moves


RESHARD_RUNNING, RESHARD_ABORTING, RESHARD_ROLLING_BACK = "running", "aborting", "rolling_back"
RESHARD_DONE, RESHARD_ABORTED = "done", "aborted"
RESHARD_LIVE = (RESHARD_RUNNING, RESHARD_ABORTING, RESHARD_ROLLING_BACK)


@dataclass(frozen=True)
class Reshard:
    """One resharding of a keyspace to ``target`` physical shards.

    ``state``: ``running`` (its moves go forward), ``aborting`` (moves not yet
    activated turn back; the others finish), ``rolling_back`` (moves that had
    finished are moved back, so the old layout serves again), then ``done`` or
    ``aborted``. ``before`` are the physical shards it started from, ``targets``
    those the logical shards spread over. Finished moves leave their figures
    in ``summary``."""

    id: int
    keyspace: str
    target: int
    before: tuple[int, ...]
    targets: tuple[int, ...]
    state: str
    started_at: float
    finished_at: float | None = None
    moves_total: int = 0
    summary: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = dict(vars(self))
        out["before"], out["targets"] = list(self.before), list(self.targets)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reshard:
        return cls(**{**data, "before": tuple(data["before"]),
                      "targets": tuple(data["targets"])})

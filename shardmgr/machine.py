"""The shard manager group's state machine: a versioned document, changed by
compare-and-set. Pure: the replica adapter supplies reads and writes.

Log entries are cbor lists of commands:

- ``["patch", expected_version, base, moves, removed]``: change the state if
  the stored version is ``expected_version``: ``base`` is the new state
  without its moves (``ClusterState.base_json``), ``moves`` the moves added
  or changed (``Move.to_json`` each), ``removed`` the ids of moves gone.
  Result ``{"i": index, "ok": bool, "version": stored version afterwards}``.
  The leader proposes every change so: an entry carries what changed, not the
  whole state, which grows with the moves of a reshard (192 moves of a 2 to 8
  split of 256 logical shards are 35 KB, and a reshard changes the state
  about twice per move).
- ``["set", expected_version, state]``: the same with the whole state (as
  ``ClusterState.to_json``); what earlier versions proposed, still applied
  from their logs.
- ``["b"]``: a read barrier (``{"i": index}``), for linearizable reads.

Stored: the version (``VERSION_KEY``), the state without its moves
(``STATE_KEY``) and each move under ``MOVE_PREFIX`` + its id. A store
written by earlier versions holds the whole state under ``STATE_KEY``; the
first change rewrites it in parts.

The manager's leader computes every new state from its own (possibly stale)
view; the compare-and-set refuses a proposal from a leader that missed a
change, so two leaders can never both apply conflicting decisions. A patch is
computed against the state at ``expected_version``, so it applies to exactly
that state or to none.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import Any

import cbor2

from raftkv.statemachine import layout
from raftkv.statemachine.apply import ApplyOutput, StateView
from raftkv.statemachine.commands import Barrier, MalformedEntry
from shardmgr.moves import Move
from shardmgr.state import ClusterState

STATE_KEY = b"m/state"
VERSION_KEY = b"m/version"
"""The stored state's version, written with it: an apply reads 8 bytes, not
the state. A store written before it existed has only the state; the version
is then read from there."""
MOVE_PREFIX = b"m/move/"
PARTS_KEY = b"m/parts"
"""Present once the state is stored in parts (moves under keys of their own)."""
_MOVE_ID = struct.Struct(">Q")
MOVES_MAX = 1 << 32  # more than any state holds: a scan's limit


def move_key(move_id: int) -> bytes:
    return MOVE_PREFIX + _MOVE_ID.pack(move_id)


@dataclass(frozen=True, slots=True)
class SetState:
    """Make ``state`` the stored state if the stored version is
    ``expected_version``. ``since``: the state at ``expected_version`` that
    ``state`` was computed from; the entry then carries only the moves that
    are not the same objects in both (states are immutable) and the ids of
    those gone. Without it, the whole state."""

    expected_version: int
    state: ClusterState
    since: ClusterState | None = None


@dataclass(frozen=True, slots=True)
class PatchState:
    """A decoded ``patch``: ``base`` is the new state without moves."""

    expected_version: int
    base: ClusterState
    moves: tuple[Move, ...]
    removed: tuple[int, ...]


ManagerCommand = SetState | PatchState | Barrier


def encode_manager_commands(commands: list[Any]) -> bytes:
    out: list[object] = []
    for c in commands:
        if isinstance(c, SetState) and c.since is not None:
            before = c.since.moves
            out.append(["patch", c.expected_version, c.state.base_json(),
                        [m.to_json() for i, m in sorted(c.state.moves.items())
                         if before.get(i) is not m],
                        sorted(i for i in before if i not in c.state.moves)])
        elif isinstance(c, SetState):
            out.append(["set", c.expected_version, c.state.to_json()])
        elif isinstance(c, PatchState):
            out.append(["patch", c.expected_version, c.base.base_json(),
                        [m.to_json() for m in c.moves], list(c.removed)])
        else:
            assert isinstance(c, Barrier), c
            out.append(["b"])
    return cbor2.dumps(out)


def read_state(view: StateView) -> tuple[bytes | None, ClusterState]:
    """The stored state, and what ``STATE_KEY`` holds with it (a new value
    for every version). Safe from a thread other than the one applying: the
    parts are read again until ``STATE_KEY`` did not change under them."""
    while True:
        raw = view.get(STATE_KEY)
        state = _load(view, raw)
        if view.get(STATE_KEY) == raw:
            return raw, state


def _load(view: StateView, raw: bytes | None) -> ClusterState:
    """The state stored with ``raw`` under ``STATE_KEY``."""
    if raw is None:
        return ClusterState()
    data = cbor2.loads(raw)
    if "moves" in data:  # the earlier, whole form
        return ClusterState.from_json(data)
    moves = [cbor2.loads(v) for _, v in view.scan(
        MOVE_PREFIX, layout.prefix_end(MOVE_PREFIX), MOVES_MAX)]
    return ClusterState.from_json({**data, "moves": moves})


def manager_apply(view: StateView, index: int, payload: bytes) -> ApplyOutput:
    return manager_apply_state(view, index, payload)[0]


def manager_apply_state(view: StateView, index: int, payload: bytes,
                        previous: ClusterState | None = None,
                        ) -> tuple[ApplyOutput, ClusterState | None]:
    """``manager_apply``, and the state it stored (None if none): the caller
    passes it back as ``previous`` with the next entry, which then need not
    read the stored moves to apply a patch (any other ``previous``, or
    none, gives the same output: one of another version is not used)."""
    out = ApplyOutput()
    out.writes[layout.APPLIED_KEY] = layout.encode_index(index)
    stored: ClusterState | None = None
    try:
        commands = _decode(payload)
        results: list[Any] = []
        version = _stored_version(view)
        current: ClusterState | None = None
        whole = False  # the store holds the earlier, whole form (or nothing)
        for command in commands:
            if isinstance(command, Barrier):
                results.append({"i": index})
                continue
            new_version = (command.state if isinstance(command, SetState)
                           else command.base).version
            if command.expected_version != version or new_version <= version:
                results.append({"i": index, "ok": False, "version": version})
                continue
            if current is None:  # (read only for an entry that changes the state)
                whole = view.get(PARTS_KEY) is None
                if previous is not None and previous.version == version and not whole:
                    current = previous
                else:
                    current = _load(view, view.get(STATE_KEY))
            new, changed, removed = _next_state(current, command)
            # Re-encoded, not stored as proposed: encoding checks the state is
            # well-typed (one that cannot be encoded would wedge the manager).
            out.writes[STATE_KEY] = cbor2.dumps(new.base_json())
            for move in (new.moves.values() if whole else changed):
                out.writes[move_key(move.id)] = cbor2.dumps(move.to_json())
            for move_id in removed:
                out.writes[move_key(move_id)] = None
            if whole:
                out.writes[PARTS_KEY] = b"1"
                whole = False
            version, current = new.version, new
            stored = new
            out.writes[VERSION_KEY] = layout.encode_index(version)
            results.append({"i": index, "ok": True, "version": version})
    except Exception as exc:  # a malformed entry (or state) changes nothing but the index
        return ApplyOutput(writes={layout.APPLIED_KEY: layout.encode_index(index)},
                           error=f"malformed manager entry at index {index}: {exc!r}"), None
    out.results = results
    return out, stored


def _next_state(current: ClusterState, command: SetState | PatchState,
                ) -> tuple[ClusterState, list[Move], list[int]]:
    """The state after ``command``, the moves it adds or changes, the ids it removes."""
    if isinstance(command, SetState):
        new = command.state
        changed = [m for i, m in new.moves.items() if current.moves.get(i) != m]
    else:
        moves: dict[int, Move] = {i: m for i, m in current.moves.items()
                                  if i not in command.removed}
        moves.update((m.id, m) for m in command.moves)
        new = replace(command.base, moves=moves)
        changed = list(command.moves)
    removed = [i for i in current.moves if i not in new.moves]
    return new, changed, removed


def _stored_version(view: StateView) -> int:
    raw = view.get(VERSION_KEY)
    if raw is not None:
        return layout.decode_index(raw)
    raw = view.get(STATE_KEY)
    if raw is None:
        return 0
    version = cbor2.loads(raw)["version"]
    assert isinstance(version, int)
    return version


def _decode(payload: bytes) -> list[ManagerCommand]:
    raw = cbor2.loads(payload)
    if not isinstance(raw, list):
        raise MalformedEntry("entry is not a list")
    commands: list[ManagerCommand] = []
    for item in raw:
        if item == ["b"]:
            commands.append(Barrier())
        elif isinstance(item, list) and len(item) == 3 and item[0] == "set" and _is_int(item[1]):
            state = ClusterState.from_json(_map(item[2], "a state"))
            _check_version(state)
            commands.append(SetState(item[1], state))
        elif isinstance(item, list) and len(item) == 5 and item[0] == "patch" \
                and _is_int(item[1]):
            base_data = _map(item[2], "a patch's state")
            if "moves" in base_data:
                raise MalformedEntry("a patch's state holds moves")
            base = ClusterState.from_json(base_data)
            _check_version(base)
            if not isinstance(item[3], list) or not isinstance(item[4], list) \
                    or not all(_is_int(i) for i in item[4]):
                raise MalformedEntry("a patch's moves or removed ids are not lists")
            moves = tuple(Move.from_json(_map(m, "a move")) for m in item[3])
            if len({m.id for m in moves}) != len(moves) or not all(_is_int(m.id) for m in moves):
                raise MalformedEntry("a patch's moves have repeated or ill-typed ids")
            commands.append(PatchState(item[1], base, moves, tuple(item[4])))
        else:
            raise MalformedEntry(f"unknown manager command {item!r}")
    return commands


def _map(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedEntry(f"{what} that is not a map: {type(value).__name__}")
    return value


def _check_version(state: ClusterState) -> None:
    if not _is_int(state.version):
        raise MalformedEntry(f"state version {state.version!r} is not an integer")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

"""The shard manager group's state machine: a versioned document, changed by
compare-and-set. Pure: the replica adapter supplies reads and writes.

Log entries are cbor lists of commands:

- ``["set", expected_version, state]``: replace the state (a ``ClusterState``
  as json-like data) if the stored version is ``expected_version``. Result
  ``{"i": index, "ok": bool, "version": stored version afterwards}``.
- ``["b"]``: a read barrier (``{"i": index}``), for linearizable reads.

The manager's leader computes every new state from its own (possibly stale)
view; the compare-and-set refuses a proposal from a leader that missed a
change, so two leaders can never both apply conflicting decisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cbor2

from raftkv.statemachine import layout
from raftkv.statemachine.apply import ApplyOutput, StateView
from raftkv.statemachine.commands import Barrier, MalformedEntry
from shardmgr.state import ClusterState, Previous

STATE_KEY = b"m/state"
VERSION_KEY = b"m/version"
"""The stored state's version, written with it: an apply reads 8 bytes, not
the whole state (tens of KB while a reshard runs). A store written before it
existed has only the state; the version is then read from there."""


@dataclass(frozen=True, slots=True)
class SetState:
    expected_version: int
    state: ClusterState
    data: dict[str, Any] | None = None
    """``state.to_json()``, when the proposer has it already."""



ManagerCommand = SetState | Barrier


def encode_manager_commands(commands: list[Any]) -> bytes:
    out: list[object] = []
    for c in commands:
        if isinstance(c, SetState):
            out.append(["set", c.expected_version,
                        c.data if c.data is not None else c.state.to_json()])
        else:
            assert isinstance(c, Barrier), c
            out.append(["b"])
    return cbor2.dumps(out)


def load_state(raw: bytes | None) -> ClusterState:
    return ClusterState() if raw is None else ClusterState.from_json(cbor2.loads(raw))


def manager_apply(view: StateView, index: int, payload: bytes) -> ApplyOutput:
    return manager_apply_state(view, index, payload)[0]


def manager_apply_state(view: StateView, index: int, payload: bytes,
                        previous: Previous | None = None,
                        ) -> tuple[ApplyOutput, Previous | None]:
    """``manager_apply``, and the state it stored (None if none) as data and
    decoded: the caller need not decode what was just decoded, and passes it
    back as ``previous`` with the next entry (any earlier stored state, or
    none, gives the same output, only slower)."""
    out = ApplyOutput()
    out.writes[layout.APPLIED_KEY] = layout.encode_index(index)
    stored: Previous | None = None
    try:
        commands = _decode(payload, previous)
        results: list[Any] = []
        version = _stored_version(view)
        for command in commands:
            if isinstance(command, Barrier):
                results.append({"i": index})
            elif command.expected_version == version and command.state.version > version:
                # Re-encoded, not stored as proposed: to_json checks the state is
                # well-typed (a state that cannot be encoded would wedge the
                # manager). With ``previous``, unchanged moves are not encoded again.
                data = command.state.to_json(previous)
                out.writes[STATE_KEY] = cbor2.dumps(data)
                version, stored = command.state.version, (data, command.state)
                previous = stored
                out.writes[VERSION_KEY] = layout.encode_index(version)
                results.append({"i": index, "ok": True, "version": version})
            else:
                results.append({"i": index, "ok": False, "version": version})
    except Exception as exc:  # a malformed entry (or state) changes nothing but the index
        return ApplyOutput(writes={layout.APPLIED_KEY: layout.encode_index(index)},
                           error=f"malformed manager entry at index {index}: {exc!r}"), None
    out.results = results
    return out, stored


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


def _decode(payload: bytes, previous: Previous | None = None) -> list[ManagerCommand]:
    raw = cbor2.loads(payload)
    if not isinstance(raw, list):
        raise MalformedEntry("entry is not a list")
    commands: list[ManagerCommand] = []
    for item in raw:
        if item == ["b"]:
            commands.append(Barrier())
        elif isinstance(item, list) and len(item) == 3 and item[0] == "set" and _is_int(item[1]):
            if not isinstance(item[2], dict):
                raise MalformedEntry(f"a state that is not a map: {type(item[2]).__name__}")
            state = ClusterState.from_json(item[2], previous)
            if not _is_int(state.version):
                raise MalformedEntry(f"state version {state.version!r} is not an integer")
            commands.append(SetState(item[1], state))
        else:
            raise MalformedEntry(f"unknown manager command {item!r}")
    return commands


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

"""Errors a raftkv client can see, with stable codes.

Every error says whether the operation **definitely did not happen**
(``definite = True``, Jepsen's ``:fail``) or **may have happened**
(``definite = False``, Jepsen's ``:info``). A caller may retry a definite error
freely. An indefinite error may only be retried with the same
``(client_id, seq)``, which the replicated dedup table makes exactly-once; the
SDK does that for you.

The codes travel on the wire as strings and never change meaning.
"""

from __future__ import annotations

from typing import Any, ClassVar


class RaftKVError(Exception):
    """Base class. ``code`` is stable; ``definite`` says the op did not happen."""

    code: ClassVar[str] = "INTERNAL"
    definite: ClassVar[bool] = False

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"code": self.code, "definite": self.definite, "msg": self.message}
        wire.update(self.details)
        return wire

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class NotLeader(RaftKVError):
    """The node is not the leader of the shard. ``leader`` is the client address
    of the leader it knows of, or None. Raised before the op entered the log."""

    code = "NOT_LEADER"
    definite = True

    @property
    def leader(self) -> str | None:
        value = self.details.get("leader")
        return value if isinstance(value, str) else None


class WrongShard(RaftKVError):
    """The physical shard does not serve this key's logical shard (any more), or
    not this keyspace: the sender routed by a stale map. Checked when the op is
    applied, so it definitely did not happen; refresh the shard map and retry."""

    code = "WRONG_SHARD"
    definite = True


class UnknownKeyspace(RaftKVError):
    """The shard map has no keyspace of that name (never created, or dropped)."""

    code = "UNKNOWN_KEYSPACE"
    definite = True


class ShardMoving(RaftKVError):
    """The logical shard is frozen for a move; back off and retry."""

    code = "SHARD_MOVING"
    definite = True


class UnknownShard(RaftKVError):
    """The node hosts no replica of the requested physical shard."""

    code = "UNKNOWN_SHARD"
    definite = True


class PreconditionFailed(RaftKVError):
    """A compare-and-set found a different value. The op ran and changed nothing."""

    code = "PRECONDITION_FAILED"
    definite = True


class BadRequest(RaftKVError):
    """The request is malformed: wrong field types, unknown op, missing field."""

    code = "BAD_REQUEST"
    definite = True


class TooLarge(RaftKVError):
    """A key, value, batch or frame is over its limit (the message names which)."""

    code = "TOO_LARGE"
    definite = True


class Overloaded(RaftKVError):
    """The node's queues are full; the op was not queued. Back off and retry."""

    code = "OVERLOADED"
    definite = True


class Unavailable(RaftKVError):
    """No leader is known (election in progress, or no quorum); the op was not queued."""

    code = "UNAVAILABLE"
    definite = True


class Timeout(RaftKVError):
    """No answer in time. The op may or may not have happened."""

    code = "TIMEOUT"
    definite = False


class ConnectionLost(RaftKVError):
    """The connection closed with the op in flight. It may or may not have happened."""

    code = "CONNECTION_LOST"
    definite = False


class OutcomeUnknown(RaftKVError):
    """Raft lost track of the op (leader changed after it was sent). It may have happened."""

    code = "OUTCOME_UNKNOWN"
    definite = False


class InternalError(RaftKVError):
    """A bug or an I/O failure inside the node. It may or may not have happened."""

    code = "INTERNAL"
    definite = False


class ClusterUnavailable(RaftKVError):
    """The client found no leader within its retry budget, and no attempt may
    have taken effect (otherwise the SDK raises that attempt's indefinite error)."""

    code = "CLUSTER_UNAVAILABLE"
    definite = True


_BY_CODE: dict[str, type[RaftKVError]] = {
    cls.code: cls
    for cls in (
        NotLeader,
        WrongShard,
        UnknownKeyspace,
        ShardMoving,
        UnknownShard,
        PreconditionFailed,
        BadRequest,
        TooLarge,
        Overloaded,
        Unavailable,
        Timeout,
        ConnectionLost,
        OutcomeUnknown,
        InternalError,
        ClusterUnavailable,
    )
}


def error_from_wire(wire: Any) -> RaftKVError:
    """Rebuild an error from its wire form; an unknown code becomes InternalError."""
    if not isinstance(wire, dict):
        return InternalError(f"malformed error from server: {wire!r}")
    code = wire.get("code")
    cls = _BY_CODE.get(code if isinstance(code, str) else "", InternalError)
    details = {k: v for k, v in wire.items() if k not in ("code", "definite", "msg")}
    message = wire.get("msg")
    # Set details after construction: a malformed map may hold keys that are not
    # valid keyword arguments (non-text keys, or "message").
    error = cls(message if isinstance(message, str) else str(code))
    error.details = details
    return error

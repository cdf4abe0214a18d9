"""Helpers shared by the replication tests (in-process replicas on 127.0.0.1)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from raftkv.errors import RaftKVError
from raftkv.replication.replica import RaftSettings, Replica
from raftkv.statemachine.commands import PUT, Mutation, Own, Write, encode_commands

FAST = RaftSettings(election_timeout_s_min=0.3, election_timeout_s_max=0.6,
                    heartbeat_period_s=0.05, connection_timeout_s=1.0)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def put_command(seq: int, key: bytes, value: bytes = b"v", client_id: bytes = b"c" * 16) -> bytes:
    """An entry with one put, as the node server would propose it. It starts
    with the (idempotent) ownership command a new group gets from the shard
    manager, so the put's result is the entry's last."""
    return encode_commands([Own(0, "default", 256, (0,)),
                            Write(0, client_id, seq, seq - 1, (Mutation(PUT, 0, key, value),))])


def submit(replica: Replica, payload: bytes, timeout_s: float = 10.0) -> tuple[Any, Any]:
    """Propose and wait: (result, None), (None, error), or (None, None) on timeout."""
    done = threading.Event()
    out: list[tuple[Any, RaftKVError | None]] = []

    def on_done(result: Any, error: RaftKVError | None) -> None:
        out.append((result, error))
        done.set()

    replica.submit(payload, on_done)
    if not done.wait(timeout_s):
        return None, None
    return out[0]

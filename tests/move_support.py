"""Two pure groups for move tests: the state machine applying entries as a
Raft group would (tests/property/test_move_steps.py, tests/shardmgr/test_moves.py)."""

from __future__ import annotations

from typing import Any

from raftkv.sharding import logical_shard
from raftkv.statemachine import layout
from raftkv.statemachine.apply import MemoryState, apply_entry
from raftkv.statemachine.commands import PUT, Command, Mutation, Own, Write, encode_commands
from raftkv.statemachine.moves import MoveStep, decode_owner

KS, NAME, TOTAL = 3, "users", 16
MOVE = 41
KEYS = [b"{m}%d" % i for i in range(12)]
LS = logical_shard(NAME, KEYS[0], TOTAL)
OTHER_KEY = next(k for k in (b"x%d" % i for i in range(100)) if logical_shard(NAME, k, TOTAL) != LS)
CLIENTS = [bytes([c]) * 16 for c in (1, 2)]
A_ID, B_ID = 1, 2


class Group:
    """One replica's state, applying entries as the Raft group would."""

    def __init__(self) -> None:
        self.state = MemoryState()
        self.index = 0

    def run(self, *commands: Command) -> list[Any]:
        self.index += 1
        out = apply_entry(self.state, self.index, encode_commands(list(commands)))
        assert out.error is None, out.error
        self.state.commit(out.writes)
        assert out.results is not None
        return out.results

    def step(self, step: str, **data: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.run(MoveStep(step, KS, LS, MOVE, data))[0]
        return result

    def owner(self) -> Any:
        return decode_owner(self.state.get(layout.owner_key(KS, LS)))

    def shard_keys(self) -> dict[bytes, bytes]:
        return {k: v for k, v in self.state.data.items() if layout.in_shard(k, KS, LS)}

    def user_key_count(self) -> int:
        return layout.decode_index(self.state.get(layout.KEY_COUNT_KEY))


def source() -> Group:
    group = Group()
    group.run(Own(KS, NAME, TOTAL, (LS, logical_shard(NAME, OTHER_KEY, TOTAL))))
    return group


def put(cid: bytes, seq: int, key: bytes, value: bytes, ack: int = 0) -> Write:
    return Write(KS, cid, seq, ack, (Mutation(PUT, logical_shard(NAME, key, TOTAL), key, value),))

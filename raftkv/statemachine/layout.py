"""Byte layout of one replica's LevelDB (DESIGN section 4).

- ``d`` ks(4) ls(4) key       -> value                 user data, one range per logical shard
- ``r`` client_id(16)         -> floor(8)              every seq <= floor is forgotten
- ``r`` client_id(16) seq(8)  -> cbor result           the result of write (client_id, seq)
- ``!applied``                -> index(8)              last applied Raft log index

Data, dedup records and ``!applied`` are written in one WriteBatch, so a
replay of the journal after a restart skips every index <= ``!applied``.
"""

from __future__ import annotations

import struct

APPLIED_KEY = b"!applied"
DATA_PREFIX = b"d"
DEDUP_PREFIX = b"r"
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def data_key(keyspace_id: int, logical_shard: int, key: bytes) -> bytes:
    return DATA_PREFIX + _U32.pack(keyspace_id) + _U32.pack(logical_shard) + key


def split_data_key(stored: bytes) -> tuple[int, int, bytes]:
    assert stored[:1] == DATA_PREFIX, stored
    return _U32.unpack_from(stored, 1)[0], _U32.unpack_from(stored, 5)[0], stored[9:]


def dedup_key(client_id: bytes) -> bytes:
    """The client's dedup floor."""
    return DEDUP_PREFIX + client_id


def dedup_result_key(client_id: bytes, seq: int) -> bytes:
    return DEDUP_PREFIX + client_id + _U64.pack(seq)


def encode_index(index: int) -> bytes:
    return _U64.pack(index)


def decode_index(raw: bytes | None) -> int:
    return 0 if raw is None else _U64.unpack(raw)[0]

"""Byte layout of one replica's LevelDB (DESIGN section 4).

- ``d`` ks(4) ls(4) key                 -> value        user data, one range per logical shard
- ``r`` ks(4) ls(4) client_id(16)       -> floor(8) [s seq(8)...]  every seq <= floor is
                                           forgotten (in ls); after ``s``, the seqs whose
                                           results are stored (when at most 64)
- ``r`` ks(4) ls(4) client_id(16) seq(8) -> cbor result the result of write (client_id, seq)
- ``o`` ks(4) ls(4)                      -> owner record the group's part in logical shard ls
- ``c`` move(8) seq(8)                   -> cbor effects the changelog of a logical shard moving out
- ``k`` keyspace name (utf-8)            -> cbor [ks id, L] the keyspaces this group serves
- ``!applied``                           -> index(8)     last applied Raft log index
- ``!keys``                              -> count(8)     user keys stored (all keyspaces)

Dedup records live under their logical shard, so they move with it (a write
retried after its logical shard moved is answered by the new group). A
logical shard's keys are two ranges, its data and its dedup records
(``shard_ranges``), in that key order.

Data, dedup records and ``!applied`` are written in one WriteBatch, so a
replay of the journal after a restart skips every index <= ``!applied``.
"""

from __future__ import annotations

import struct

import cbor2

APPLIED_KEY = b"!applied"
KEY_COUNT_KEY = b"!keys"
DATA_PREFIX = b"d"
DEDUP_PREFIX = b"r"
OWNER_PREFIX = b"o"
KEYSPACE_PREFIX = b"k"
CHANGELOG_PREFIX = b"c"
# The owner record of a logical shard this group serves; moves add the other
# states (see raftkv/statemachine/moves.py).
OWNER_ACTIVE = cbor2.dumps({"state": "ACTIVE"})
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def data_key(keyspace_id: int, logical_shard: int, key: bytes) -> bytes:
    return DATA_PREFIX + _U32.pack(keyspace_id) + _U32.pack(logical_shard) + key


def split_data_key(stored: bytes) -> tuple[int, int, bytes]:
    assert stored[:1] == DATA_PREFIX, stored
    return _U32.unpack_from(stored, 1)[0], _U32.unpack_from(stored, 5)[0], stored[9:]


def data_prefix(keyspace_id: int, logical_shard: int | None = None) -> bytes:
    """Prefix of a keyspace's data, or of one logical shard's."""
    prefix = DATA_PREFIX + _U32.pack(keyspace_id)
    return prefix if logical_shard is None else prefix + _U32.pack(logical_shard)


def owner_key(keyspace_id: int, logical_shard: int) -> bytes:
    return OWNER_PREFIX + _U32.pack(keyspace_id) + _U32.pack(logical_shard)


def owner_prefix(keyspace_id: int) -> bytes:
    return OWNER_PREFIX + _U32.pack(keyspace_id)


def keyspace_key(name: str) -> bytes:
    return KEYSPACE_PREFIX + name.encode()


def encode_keyspace(keyspace_id: int, logical_shards: int) -> bytes:
    return cbor2.dumps([keyspace_id, logical_shards])


def decode_keyspace(raw: bytes) -> tuple[int, int]:
    keyspace_id, logical_shards = cbor2.loads(raw)
    return int(keyspace_id), int(logical_shards)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    assert stripped, "a prefix of only 0xff bytes has no end"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def dedup_key(keyspace_id: int, logical_shard: int, client_id: bytes) -> bytes:
    """The client's dedup floor in one logical shard."""
    return DEDUP_PREFIX + _U32.pack(keyspace_id) + _U32.pack(logical_shard) + client_id


def dedup_result_key(keyspace_id: int, logical_shard: int, client_id: bytes,
                     seq: int) -> bytes:
    return dedup_key(keyspace_id, logical_shard, client_id) + _U64.pack(seq)


def dedup_result_seq(result_key: bytes) -> int:
    seq: int = _U64.unpack_from(result_key, len(result_key) - 8)[0]
    return seq


_TRACKED = b"s"


def encode_dedup_floor(floor: int, stored: list[int] | None) -> bytes:
    """A client's floor in one logical shard and, when ``stored`` is given, the
    seqs above it whose results are stored (none others are)."""
    if stored is None:
        return _U64.pack(floor)
    return _U64.pack(floor) + _TRACKED + struct.pack(f">{len(stored)}Q", *stored)


def decode_dedup_floor(raw: bytes | None) -> tuple[int, list[int] | None]:
    """(floor, stored seqs), the seqs None when the record does not list them:
    no record, or a bare floor (more than were tracked, or an earlier version's)."""
    if raw is None:
        return 0, None
    floor: int = _U64.unpack_from(raw)[0]
    if len(raw) == 8:
        return floor, None
    assert raw[8:9] == _TRACKED and (len(raw) - 9) % 8 == 0, raw
    return floor, list(struct.unpack_from(f">{(len(raw) - 9) // 8}Q", raw, 9))


def shard_ranges(keyspace_id: int, logical_shard: int) -> list[tuple[bytes, bytes]]:
    """The key ranges ``[start, stop)`` holding a logical shard's data and dedup
    records, in key order: what moves with it."""
    shard = _U32.pack(keyspace_id) + _U32.pack(logical_shard)
    return [(prefix + shard, prefix_end(prefix + shard)) for prefix in (DATA_PREFIX,
                                                                       DEDUP_PREFIX)]


def in_shard(key: bytes, keyspace_id: int, logical_shard: int) -> bool:
    return any(start <= key < stop for start, stop in shard_ranges(keyspace_id, logical_shard))


def changelog_key(move_id: int, seq: int) -> bytes:
    return CHANGELOG_PREFIX + _U64.pack(move_id) + _U64.pack(seq)


def changelog_prefix(move_id: int) -> bytes:
    return CHANGELOG_PREFIX + _U64.pack(move_id)


def encode_index(index: int) -> bytes:
    return _U64.pack(index)


def decode_index(raw: bytes | None) -> int:
    return 0 if raw is None else _U64.unpack(raw)[0]

"""Keys to logical shards: a stable hash, the same in every process and release.

The shard key is the whole key, or the bytes inside the first ``{...}`` when
that is non-empty (a hash tag, as in Redis Cluster), so related keys can share
a logical shard. The logical shard is ``blake2b(keyspace, shard key) mod L``.
"""

from __future__ import annotations

import hashlib


def shard_key(key: bytes) -> bytes:
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def logical_shard(keyspace: str, key: bytes, logical_shards: int) -> int:
    """The logical shard of ``key``; ``logical_shards`` must be a power of two."""
    if logical_shards <= 0 or logical_shards & (logical_shards - 1):
        raise ValueError(f"logical shard count must be a power of two, got {logical_shards}")
    digest = hashlib.blake2b(
        keyspace.encode() + b"\x00" + shard_key(key), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") & (logical_shards - 1)

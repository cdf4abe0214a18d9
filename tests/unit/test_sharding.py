"""Key -> logical shard mapping: hash tags, range, stability, argument checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.sharding import logical_shard, shard_key

# ---------------------------------------------------------------------------
# hash tags


def test_hash_tag_selects_the_bytes_inside_braces() -> None:
    assert shard_key(b"{user1}:a") == b"user1"
    assert shard_key(b"{user1}:b") == b"user1"
    assert shard_key(b"prefix{user1}suffix") == b"user1"


def test_keys_with_the_same_hash_tag_share_a_shard() -> None:
    assert shard_key(b"{user1}:a") == shard_key(b"{user1}:b")
    for shards in (1, 2, 256, 4096):
        assert logical_shard("default", b"{user1}:a", shards) == logical_shard(
            "default", b"{user1}:b", shards
        )
    # and the tagged key hashes exactly like the bare tag
    assert logical_shard("default", b"{user1}:a", 4096) == logical_shard(
        "default", b"user1", 4096
    )


def test_empty_hash_tag_uses_the_whole_key() -> None:
    assert shard_key(b"{}x") == b"{}x"
    assert shard_key(b"{}") == b"{}"
    # first '{' with an immediately following '}' counts as empty, like Redis
    assert shard_key(b"a{}{b}") == b"a{}{b}"


def test_no_closing_brace_uses_the_whole_key() -> None:
    assert shard_key(b"{user1:a") == b"{user1:a"
    assert shard_key(b"abc{") == b"abc{"
    assert shard_key(b"}user{") == b"}user{"


def test_only_the_first_tag_counts() -> None:
    assert shard_key(b"{a}{b}") == b"a"
    assert shard_key(b"x{a}y{b}z") == b"a"
    # the tag ends at the first '}' after the first '{'
    assert shard_key(b"{a{b}c}") == b"a{b"


def test_no_braces_uses_the_whole_key() -> None:
    assert shard_key(b"plain-key") == b"plain-key"
    assert shard_key(b"") == b""


# ---------------------------------------------------------------------------
# logical_shard


def test_pinned_values() -> None:
    """Values computed once from the current implementation. The mapping must
    never change between releases: data already lives in these shards."""
    assert logical_shard("default", b"user:42", 256) == 158
    assert logical_shard("orders", b"{acct7}:invoice:9", 1024) == 546
    assert logical_shard("default", b"hello", 2**16) == 31131


def test_keyspace_is_part_of_the_hash() -> None:
    keys = [f"k{i}".encode() for i in range(64)]
    a = [logical_shard("default", k, 2**16) for k in keys]
    b = [logical_shard("other", k, 2**16) for k in keys]
    assert a != b


@settings(max_examples=200, deadline=None)
@given(
    keyspace=st.text(min_size=1, max_size=20),
    key=st.binary(max_size=64),
    exponent=st.integers(min_value=0, max_value=20),
)
def test_logical_shard_in_range_and_stable(keyspace: str, key: bytes, exponent: int) -> None:
    shards = 2**exponent
    value = logical_shard(keyspace, key, shards)
    assert 0 <= value < shards
    assert logical_shard(keyspace, key, shards) == value
    # a smaller power of two is the same hash masked: splitting shards in two
    # keeps every key in one of the halves of its old shard
    if exponent:
        assert logical_shard(keyspace, key, shards // 2) == value % (shards // 2)


@pytest.mark.parametrize("shards", [0, -1, -256, 3, 6, 100, 255, 257, 1000])
def test_count_must_be_a_power_of_two(shards: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        logical_shard("default", b"key", shards)


@pytest.mark.parametrize("shards", [1, 2, 4, 1024, 2**30])
def test_powers_of_two_are_accepted(shards: int) -> None:
    assert 0 <= logical_shard("default", b"key", shards) < shards

"""The Raft wire format (raftkv/replication/wire.py): frames open only with the
right key, in order, exactly once, however the bytes are split on the way."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.replication import wire

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))

messages = st.lists(st.tuples(
    st.text(max_size=30), st.text(max_size=30),
    st.dictionaries(st.text(max_size=10), st.one_of(st.integers(), st.binary(max_size=200),
                                                      st.booleans(), st.none()), max_size=5)),
    max_size=20)


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(messages, max_size=6), cuts=st.lists(st.integers(0, 1 << 20), max_size=12),
       target=st.integers(1, 4096))
def test_messages_arrive_whole_and_in_order_however_the_stream_is_cut(
        batches: list[list[wire.Message]], cuts: list[int], target: int) -> None:
    sealer, opener = wire.Sealer(KEY), wire.Opener(KEY)
    stream = b"".join(sealer.seal(p) for batch in batches
                      for p in wire.payloads((wire.encode_message(m) for m in batch), target))
    received = [m for piece in splits(stream, cuts) for payload in opener.feed(piece)
                for m in wire.decode_payload(payload)]
    assert received == [m for batch in batches for m in batch]
    assert opener.buffered == 0


@given(sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=30), target=st.integers(1, 5000))
def test_payloads_stay_near_their_target(sizes: list[int], target: int) -> None:
    items = [bytes(n) for n in sizes]
    out = list(wire.payloads(items, target))
    assert b"".join(out) == b"".join(items)
    for payload in out:
        # Over the target only when one item alone is bigger.
        assert len(payload) <= target or any(len(i) == len(payload) for i in items)


def test_a_frame_sealed_with_another_key_does_not_open() -> None:
    frame = wire.Sealer(OTHER_KEY).seal(wire.encode_message(("a:1", "b:2", {"type": "x"})))
    with pytest.raises(wire.WireError, match="authentication"):
        wire.Opener(KEY).feed(frame)


def test_a_replayed_or_reordered_frame_does_not_open() -> None:
    sealer = wire.Sealer(KEY)
    first, second = sealer.seal(b"one"), sealer.seal(b"two")
    opener = wire.Opener(KEY)
    assert opener.feed(first) == [b"one"]
    with pytest.raises(wire.WireError):
        opener.feed(first)  # replayed
    with pytest.raises(wire.WireError):
        wire.Opener(KEY).feed(second)  # the first one was dropped


@given(position=st.integers(0, 200), bit=st.integers(0, 7))
def test_a_flipped_bit_anywhere_is_caught(position: int, bit: int) -> None:
    frame = bytearray(wire.Sealer(KEY).seal(b"x" * 100))
    position %= len(frame)
    frame[position] ^= 1 << bit
    try:
        out = wire.Opener(KEY).feed(bytes(frame))
    except wire.WireError:
        return
    # A flip in the length field can only make the frame look incomplete.
    assert out == [] and position < 4


def test_an_oversized_length_is_refused_before_buffering() -> None:
    opener = wire.Opener(KEY, frame_bytes_max=1000)
    with pytest.raises(wire.WireError, match="limit 1000"):
        opener.feed((5000).to_bytes(4, "little") + b"\0" * 10)


def test_payloads_that_are_not_messages_are_refused() -> None:
    with pytest.raises(wire.WireError, match="ends inside"):
        wire.decode_payload(b"\x10\0\0\0abc")
    body = pickle.dumps(["not", "a", "tuple"])
    with pytest.raises(wire.WireError, match=r"not \(to, from, message\)"):
        wire.decode_payload(len(body).to_bytes(4, "little") + body)
    with pytest.raises(wire.WireError, match="undecodable"):
        wire.decode_payload(b"\x03\0\0\0\x80\x05Q")


def test_hellos_and_keys() -> None:
    hello, nonce = wire.new_hello()
    assert wire.parse_hello(hello) == nonce
    with pytest.raises(wire.WireError, match="not a raftkv Raft peer"):
        wire.parse_hello(b"GET / HTTP/1.1\r\n\r\n\0\0")
    master = wire.master_key("secret")
    assert wire.master_key("secret") == master != wire.master_key("other")
    a, b = wire.new_hello()[1], wire.new_hello()[1]
    assert wire.connection_key(master, a, b) != wire.connection_key(master, b, a)

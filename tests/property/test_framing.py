"""FrameDecoder: whole bodies out, in order, whatever the chunking."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from raftkv.protocol.framing import FrameDecoder, FrameTooLarge, encode_frame

SETTINGS = settings(max_examples=200, deadline=None)

# small bodies, and some over 255 bytes so the length uses two header bytes
body_strategy = st.binary(max_size=40) | st.binary(min_size=250, max_size=300)
bodies_strategy = st.lists(body_strategy, max_size=20)


def drain(decoder: FrameDecoder, most: int = 100) -> list[bytes]:
    """All frames ready now; a decoder that yields forever fails instead of hanging."""
    out = list(itertools.islice(decoder.frames(), most + 1))
    assert len(out) <= most
    return out


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = []
    previous = 0
    for point in [*points, len(data)]:
        chunks.append(data[previous:point])  # may be empty: feeding b"" must be harmless
        previous = point
    return chunks


def test_encode_frame_layout() -> None:
    assert encode_frame(b"") == b"\x00\x00\x00\x00"
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"x" * 258)[:4] == b"\x00\x00\x01\x02"


@SETTINGS
@given(bodies=bodies_strategy, cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_any_chunking_yields_the_bodies_in_order(bodies: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    decoder = FrameDecoder(frame_bytes_max=300)
    out: list[bytes] = []
    fed = 0
    consumed = 0
    for chunk in _split(stream, cuts):
        decoder.feed(chunk)
        fed += len(chunk)
        # islice: a decoder that yields forever must fail, not hang
        for body in itertools.islice(decoder.frames(), len(bodies) + 1):
            assert isinstance(body, bytes)
            out.append(body)
            consumed += 4 + len(body)
        assert decoder.buffered_bytes == fed - consumed
        # whatever is buffered is strictly less than the next whole frame
        if len(out) < len(bodies):
            assert decoder.buffered_bytes < 4 + len(bodies[len(out)])
    assert out == bodies
    assert decoder.buffered_bytes == 0
    assert drain(decoder) == []


@SETTINGS
@given(bodies=bodies_strategy)
def test_byte_by_byte(bodies: list[bytes]) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    decoder = FrameDecoder()
    out: list[bytes] = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        out.extend(itertools.islice(decoder.frames(), len(bodies) + 1))
    assert out == bodies
    assert decoder.buffered_bytes == 0


def test_buffered_bytes_counts_partial_header_and_body() -> None:
    decoder = FrameDecoder()
    assert decoder.buffered_bytes == 0
    decoder.feed(b"\x00\x00")
    assert drain(decoder) == []
    assert decoder.buffered_bytes == 2
    decoder.feed(b"\x00\x05ab")
    assert drain(decoder) == []
    assert decoder.buffered_bytes == 6
    decoder.feed(b"cde" + encode_frame(b"z")[:3])
    assert drain(decoder) == [b"abcde"]
    assert decoder.buffered_bytes == 3


def test_large_frame_in_odd_chunks() -> None:
    body = bytes(range(256)) * 300  # 76800 bytes: a three-byte length
    stream = encode_frame(body) + encode_frame(b"tail")
    decoder = FrameDecoder()
    out: list[bytes] = []
    for start in range(0, len(stream), 4093):
        decoder.feed(stream[start : start + 4093])
        out.extend(itertools.islice(decoder.frames(), 3))
    assert out == [body, b"tail"]
    assert decoder.buffered_bytes == 0


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    decoder = FrameDecoder(frame_bytes_max=10)
    decoder.feed(encode_frame(b"0123456789"))
    assert drain(decoder) == [b"0123456789"]


@SETTINGS
@given(
    limit=st.integers(min_value=0, max_value=1000),
    excess=st.integers(min_value=1, max_value=2**32 - 1),
    before=st.lists(st.binary(max_size=50), max_size=5),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
def test_oversized_header_raises_as_soon_as_the_header_is_in(
    limit: int, excess: int, before: list[bytes], cuts: list[int]
) -> None:
    length = min(limit + excess, 2**32 - 1)
    before = [b[:limit] for b in before]
    valid = b"".join(encode_frame(b) for b in before)
    header = struct.pack(">I", length)
    decoder = FrameDecoder(frame_bytes_max=limit)
    out: list[bytes] = []
    # everything before the oversized header, chunked arbitrarily
    for chunk in _split(valid, cuts):
        decoder.feed(chunk)
        out.extend(drain(decoder))
    assert out == before
    # the first three header bytes: nothing happens yet
    for i in range(3):
        decoder.feed(header[i : i + 1])
        assert drain(decoder) == []
        assert decoder.buffered_bytes == i + 1
    # the fourth header byte, and not a single body byte
    decoder.feed(header[3:])
    with pytest.raises(FrameTooLarge) as info:
        drain(decoder)
    assert info.value.length == length
    assert info.value.limit == limit
    assert str(length) in str(info.value)
    assert str(limit) in str(info.value)


def test_oversized_header_after_valid_frames_in_one_chunk() -> None:
    """Frames before the bad header are still delivered, then it raises."""
    decoder = FrameDecoder(frame_bytes_max=8)
    decoder.feed(encode_frame(b"a") + encode_frame(b"bb") + struct.pack(">I", 9))
    frames = decoder.frames()
    assert next(frames) == b"a"
    assert next(frames) == b"bb"
    with pytest.raises(FrameTooLarge) as info:
        next(frames)
    assert (info.value.length, info.value.limit) == (9, 8)


def test_default_limit() -> None:
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", 8 * 1024 * 1024 + 1))
    with pytest.raises(FrameTooLarge) as info:
        drain(decoder)
    assert info.value.limit == 8 * 1024 * 1024


# ---------------------------------------------------------------------------
# interleavings of feed() and partial consumption of frames()


class DecoderMachine(RuleBasedStateMachine):
    """Feeds a stream in pieces while consumers take some frames and stop.

    The decoder must hand out every body exactly once, in order, whatever the
    consumer does with its iterator (exhaust it, break early, drop it, keep it
    suspended across feeds)."""

    @initialize()
    def setup(self) -> None:
        self.decoder = FrameDecoder(frame_bytes_max=200)
        self.pending = b""  # encoded but not yet fed
        self.bodies: list[bytes] = []  # all bodies encoded so far
        self.fed = 0
        self.received: list[bytes] = []
        self.consumed_bytes = 0
        self.kept: Iterator[bytes] | None = None  # kept suspended across rules

    def _got(self, body: bytes) -> None:
        index = len(self.received)
        assert index < len(self.bodies), "decoder yielded a frame that was never sent"
        assert body == self.bodies[index]
        self.received.append(body)
        self.consumed_bytes += 4 + len(body)

    def _complete_fed(self) -> int:
        """How many bodies have been fully fed."""
        total = 0
        count = 0
        for body in self.bodies:
            total += 4 + len(body)
            if total > self.fed:
                break
            count += 1
        return count

    @rule(body=st.binary(max_size=20) | st.binary(min_size=150, max_size=200))
    def encode(self, body: bytes) -> None:
        self.bodies.append(body)
        self.pending += encode_frame(body)

    @rule(size=st.integers(min_value=0, max_value=300))
    def feed(self, size: int) -> None:
        chunk, self.pending = self.pending[:size], self.pending[size:]
        self.decoder.feed(chunk)
        self.fed += len(chunk)

    @rule(take=st.integers(min_value=0, max_value=4), close=st.booleans())
    def take_some_then_stop(self, take: int, close: bool) -> None:
        frames = self.decoder.frames()
        for _ in range(take):
            try:
                body = next(frames)
            except StopIteration:
                break
            self._got(body)
        else:
            if close:
                frames.close()  # type: ignore[attr-defined]
            del frames
            return
        # the iterator ran dry: it must have given everything fully fed
        assert len(self.received) == self._complete_fed()

    @rule()
    def drain(self) -> None:
        for body in itertools.islice(self.decoder.frames(), len(self.bodies) + 1):
            self._got(body)
        assert len(self.received) == self._complete_fed()

    @rule()
    def start_kept_iterator(self) -> None:
        self.kept = self.decoder.frames()

    @precondition(lambda self: self.kept is not None)
    @rule()
    def pull_from_kept_iterator(self) -> None:
        assert self.kept is not None
        try:
            body = next(self.kept)
        except StopIteration:
            self.kept = None
            assert len(self.received) == self._complete_fed()
            return
        self._got(body)

    @invariant()
    def buffered_bytes_is_fed_minus_consumed(self) -> None:
        assert self.decoder.buffered_bytes == self.fed - self.consumed_bytes

    @invariant()
    def never_ahead_of_the_stream(self) -> None:
        assert len(self.received) <= self._complete_fed()

    def teardown(self) -> None:
        # feed the rest and drain with fresh iterators: every body comes out once
        self.kept = None
        self.decoder.feed(self.pending)
        self.fed += len(self.pending)
        self.pending = b""
        for body in itertools.islice(self.decoder.frames(), len(self.bodies) + 1):
            self._got(body)
        assert self.received == self.bodies
        assert self.decoder.buffered_bytes == 0


DecoderMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestDecoderMachine = DecoderMachine.TestCase

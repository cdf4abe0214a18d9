"""Length-prefixed frames, with no I/O.

A frame on the wire is a 4-byte big-endian unsigned length followed by that
many bytes of body. ``FrameDecoder`` takes bytes in chunks of any size and
yields whole bodies; a length over ``frame_bytes_max`` raises ``FrameTooLarge``
as soon as the 4 header bytes are in, before any body is buffered, so a peer
cannot make the node allocate more than the limit.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

HEADER = struct.Struct(">I")
FRAME_BYTES_MAX_DEFAULT = 8 * 1024 * 1024


class FrameTooLarge(Exception):
    """A frame header announced a body longer than the decoder's limit."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame of {length} bytes is over the limit of {limit} bytes")
        self.length = length
        self.limit = limit


def encode_frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder: ``feed(chunk)`` then iterate ``frames()``."""

    def __init__(self, frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT) -> None:
        self.frame_bytes_max = frame_bytes_max
        self._buffer = bytearray()
        self._offset = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def frames(self) -> Iterator[bytes]:
        """Yield every complete body buffered so far.

        Raises FrameTooLarge if the next header is over the limit; the decoder
        is then unusable (the stream has lost framing) and the connection
        should be closed after replying.
        """
        buffer = self._buffer
        while True:
            available = len(buffer) - self._offset
            if available < HEADER.size:
                break
            (length,) = HEADER.unpack_from(buffer, self._offset)
            if length > self.frame_bytes_max:
                raise FrameTooLarge(length, self.frame_bytes_max)
            if available < HEADER.size + length:
                break
            start = self._offset + HEADER.size
            body = bytes(buffer[start : start + length])
            self._offset = start + length
            yield body
        if self._offset:
            del buffer[: self._offset]
            self._offset = 0

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer) - self._offset

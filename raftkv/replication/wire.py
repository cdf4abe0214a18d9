"""Raft traffic between processes, as bytes: keys, sealed frames, message batches.

Pure (no sockets, no threads), so it is tested on its own; ``hub.py`` moves
these bytes over TCP.

A connection carries Raft messages one way, from the process that opened it
(the client) to the one that accepted it (the server):

1. each side sends a hello, ``MAGIC | 16 random bytes``;
2. both derive the connection key
   ``HKDF-SHA256(master, salt = client nonce | server nonce)``, where the
   master key comes from the cluster secret (PBKDF2, once per process). A
   fresh server nonce per connection means frames recorded from an old
   connection do not open on a new one;
3. the client sends frames: ``u32 length | AES-256-GCM(payload)``, the nonce
   being a counter both sides keep, so a dropped, replayed or reordered frame
   fails authentication and the server closes the connection. Nothing is
   unpickled before it is authenticated.

A payload holds messages, each ``u32 length | pickle((to, from, message))``:
``to`` and ``from`` are Raft addresses of group members (``host:port``
identities), so one connection carries every group the two processes share.
"""

from __future__ import annotations

import functools
import os
import pickle
import struct
from collections.abc import Iterable, Iterator
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

MAGIC = b"RKR1"
NONCE_BYTES = 16
HELLO_BYTES = len(MAGIC) + NONCE_BYTES
KEY_BYTES = 32
TAG_BYTES = 16
_LENGTH = struct.Struct("<I")
# A frame is split below this many payload bytes (a single larger message,
# such as a snapshot chunk, gets a frame of its own).
FRAME_PAYLOAD_BYTES_TARGET = 1 << 20
# The most a frame may claim: beyond it the peer is broken or hostile.
FRAME_BYTES_MAX = 256 << 20

Message = tuple[str, str, Any]  # (to address, from address, pysyncobj message)


class WireError(Exception):
    """The peer sent bytes that are not a valid frame or hello: bad magic, a
    length over the limit, or a frame that fails authentication (wrong secret,
    replayed, reordered, corrupted). The connection must be closed."""


@functools.lru_cache(maxsize=8)
def master_key(secret: str) -> bytes:
    """The cluster secret stretched into the key every connection key derives from."""
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=KEY_BYTES,
                     salt=b"raftkv raft transport v1", iterations=100_000)
    return kdf.derive(secret.encode())


def new_hello() -> tuple[bytes, bytes]:
    """(the hello to send, its nonce)."""
    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + nonce, nonce


def parse_hello(data: bytes) -> bytes:
    """The nonce in a peer's hello (exactly ``HELLO_BYTES``)."""
    if len(data) != HELLO_BYTES or data[:len(MAGIC)] != MAGIC:
        raise WireError(f"bad hello {data[:8]!r}: not a raftkv Raft peer (or another version)")
    return data[len(MAGIC):]


def connection_key(master: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=client_nonce + server_nonce,
                info=b"raftkv raft client to server").derive(master)


def _nonce(counter: int) -> bytes:
    return counter.to_bytes(12, "little")


class Sealer:
    """The client side of a connection: payloads in, frames out."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._counter = 0

    def seal(self, payload: bytes) -> bytes:
        sealed = self._aead.encrypt(_nonce(self._counter), payload, None)
        self._counter += 1
        return _LENGTH.pack(len(sealed)) + sealed


class Opener:
    """The server side of a connection: bytes as they arrive in, payloads out."""

    def __init__(self, key: bytes, frame_bytes_max: int = FRAME_BYTES_MAX) -> None:
        self._aead = AESGCM(key)
        self._counter = 0
        self._buffer = bytearray()
        self.frame_bytes_max = frame_bytes_max

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        """Every payload completed by ``data``; raises ``WireError``."""
        buffer = self._buffer
        buffer += data
        payloads = []
        offset = 0
        while len(buffer) - offset >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer, offset)
            if not TAG_BYTES <= length <= self.frame_bytes_max:
                raise WireError(f"frame of {length} bytes (limit {self.frame_bytes_max})")
            end = offset + _LENGTH.size + length
            if len(buffer) < end:
                break
            try:
                payloads.append(self._aead.decrypt(
                    _nonce(self._counter), bytes(buffer[offset + _LENGTH.size:end]), None))
            except InvalidTag:
                raise WireError("a frame failed authentication (wrong cluster secret, "
                                "or a replayed, reordered or corrupted frame)") from None
            self._counter += 1
            offset = end
        if offset:
            del buffer[:offset]
        return payloads

    @property
    def buffered(self) -> int:
        return len(self._buffer)


def encode_message(message: Message) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


def payloads(encoded: Iterable[bytes],
             target_bytes: int = FRAME_PAYLOAD_BYTES_TARGET) -> Iterator[bytes]:
    """Encoded messages joined into payloads of about ``target_bytes``."""
    chunk: list[bytes] = []
    size = 0
    for item in encoded:
        if chunk and size + len(item) > target_bytes:
            yield b"".join(chunk)
            chunk, size = [], 0
        chunk.append(item)
        size += len(item)
    if chunk:
        yield b"".join(chunk)


def decode_payload(payload: bytes) -> list[Message]:
    """The messages in an authenticated payload; raises ``WireError`` if it
    does not hold whole (to, from, message) records."""
    out = []
    view = memoryview(payload)
    offset = 0
    while offset < len(payload):
        if len(payload) - offset < _LENGTH.size:
            raise WireError("a payload ends inside a message length")
        (length,) = _LENGTH.unpack_from(payload, offset)
        start = offset + _LENGTH.size
        if start + length > len(payload):
            raise WireError("a payload ends inside a message")
        try:
            # Only authenticated payloads get here (from holders of the secret).
            item = pickle.loads(view[start:start + length])  # noqa: S301
        except Exception as exc:
            raise WireError(f"an undecodable message: {exc}") from None
        if not (isinstance(item, tuple) and len(item) == 3 and isinstance(item[0], str)
                and isinstance(item[1], str)):
            raise WireError(f"a message that is not (to, from, message): {type(item).__name__}")
        out.append(item)
        offset = start + length
    return out

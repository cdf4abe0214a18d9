"""A synchronous facade over the trio client, for scripts and the CLI.

    with Client(["127.0.0.1:7001"]) as kv:   # shard manager addresses
        kv.put("k", "v")
        kv.get("k")   # b"v"

A background thread runs a trio event loop; every call is forwarded to it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import trio

from raftkv.client.client import AsyncClient, Bytesish, WriteResult, open_client
from raftkv.protocol.messages import WriteOp


class Client:
    def __init__(self, addresses: list[str], **options: Any) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._client: AsyncClient | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(
            target=self._main, args=(addresses, options), name="raftkv-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self, addresses: list[str], options: dict[str, Any]) -> None:
        async def run() -> None:
            try:
                async with open_client(addresses, **options) as client:
                    self._client = client
                    self._token = trio.lowlevel.current_trio_token()
                    self._stop = trio.Event()
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as exc:
                self._error = exc
                self._ready.set()

        trio.run(run)

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        assert self._token is not None
        return trio.from_thread.run(lambda: fn(*args, **kwargs), trio_token=self._token)

    @property
    def client(self) -> AsyncClient:
        assert self._client is not None
        return self._client

    def get(self, key: Bytesish, *, consistency: str = "strong") -> bytes | None:
        return self._run(self.client.get, key, consistency=consistency)  # type: ignore[no-any-return]

    def put(self, key: Bytesish, value: Bytesish) -> WriteResult:
        return self._run(self.client.put, key, value)  # type: ignore[no-any-return]

    def delete(self, key: Bytesish) -> bool:
        return self._run(self.client.delete, key)  # type: ignore[no-any-return]

    def cas(self, key: Bytesish, expected: Bytesish | None, value: Bytesish) -> WriteResult:
        return self._run(self.client.cas, key, expected, value)  # type: ignore[no-any-return]

    def batch(self, ops: list[WriteOp]) -> WriteResult:
        return self._run(self.client.batch, ops)  # type: ignore[no-any-return]

    def scan(self, prefix: Bytesish, *, limit: int | None = None,
             consistency: str = "strong") -> list[tuple[bytes, bytes]]:
        return self._run(  # type: ignore[no-any-return]
            self.client.scan, prefix, limit=limit, consistency=consistency)

    def manager(self, msg: dict[str, Any]) -> Any:
        return self._run(self.client.manager, msg)

    def status(self, address: str) -> dict[str, Any]:
        return self._run(self.client.status, address)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._stop is not None and self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(timeout=10)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The trio-native client SDK: routes by the shard map, retries, exactly-once.

    async with open_client(["127.0.0.1:7001", "127.0.0.1:7002"]) as kv:  # shard managers
        await kv.put("greeting", "hello")
        assert await kv.get("greeting") == b"hello"

Retries: definite refusals (NOT_LEADER, UNAVAILABLE, OVERLOADED, SHARD_MOVING,
a refused connection) are retried at the leader hint or the next node, with
jittered backoff. Indefinite failures (TIMEOUT, CONNECTION_LOST,
OUTCOME_UNKNOWN) are retried with the **same** ``(client_id, seq)``, which the
replicated dedup table turns into exactly-once. When the retry budget runs
out, the error raised is indefinite if any attempt's outcome was unknown.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import cbor2
import trio

from raftkv.client.shardmap import Route, ShardMap
from raftkv.errors import (
    BadRequest,
    ClusterUnavailable,
    ConnectionLost,
    NotLeader,
    Overloaded,
    RaftKVError,
    ShardMoving,
    Timeout,
    Unavailable,
    UnknownKeyspace,
    UnknownShard,
    WrongShard,
    error_from_wire,
)
from raftkv.protocol.framing import FrameDecoder, FrameTooLarge, encode_frame
from raftkv.protocol.messages import (
    CLIENT_ID_BYTES,
    DEFAULT_KEYSPACE,
    CasOp,
    DeleteOp,
    PutOp,
    WriteOp,
    encode_op,
)
from raftkv.sharding import shard_key

Bytesish = bytes | str


def _b(value: Bytesish) -> bytes:
    return value.encode() if isinstance(value, str) else value


log = logging.getLogger(__name__)

_RETRY_DEFINITE = (NotLeader, Unavailable, Overloaded, ShardMoving)
WATCH_WAIT_S = 20.0
MAP_REFRESH_ON_NO_LEADER_S = 1.0
MAP_REFRESH_BRIEF_S = 0.5  # a refresh inside an operation's retries waits no longer
MOVING_BACKOFF_MAX_S = 0.02


@dataclass(frozen=True)
class WriteResult:
    """Where the write landed in the shard's log, and per-op results
    (put: None, delete: whether the key existed, cas: True)."""

    index: int
    results: list[Any]


def _reply(body: bytes) -> dict[str, Any]:
    """A reply frame's map; ValueError if it is not one (not a raftkv server)."""
    msg = cbor2.loads(body)
    if not isinstance(msg, dict):
        raise ValueError(f"a reply that is not a map: {type(msg).__name__}")  # noqa: TRY004
    return msg


class _Connection:
    """One TCP connection with many requests in flight, matched by id.

    Requests are queued and a single writer task sends everything queued in
    one write: the requests that callers issue in one pass of trio's scheduler
    (many, when one reply frame wakes many callers) cost one system call, and
    the server reads them in one receive."""

    def __init__(self, address: str, stream: trio.SocketStream) -> None:
        self.address = address
        self._stream = stream
        self._next_id = 0
        self._waiters: dict[int, tuple[trio.Event, list[Any]]] = {}
        self._unsent: list[bytes] = []
        self._wakeup = trio.Event()
        self.closed = False

    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._read)
        nursery.start_soon(self._write)

    async def _write(self) -> None:
        try:
            while not self.closed:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                while self._unsent and not self.closed:
                    data = b"".join(self._unsent)
                    self._unsent.clear()
                    await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if not self.closed:
                log.info("connection to %s failed while sending: %s", self.address, exc)
            # Requests in flight may or may not have reached the server: they
            # fail with CONNECTION_LOST (indefinite), and the reader stops.
            self._fail_all()
            await trio.aclose_forcefully(self._stream)

    async def _read(self) -> None:
        decoder = FrameDecoder()
        try:
            while True:
                data = await self._stream.receive_some(256 * 1024)
                if not data:
                    break
                decoder.feed(data)
                for body in decoder.frames():
                    msg = _reply(body)
                    waiter = self._waiters.pop(msg.get("id"), None)  # type: ignore[arg-type]
                    if waiter is not None:
                        waiter[1].append(msg)
                        waiter[0].set()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except (FrameTooLarge, ValueError) as exc:
            # Not a raftkv server (or a broken one): this connection's requests
            # fail with CONNECTION_LOST; the client and its other connections go on.
            log.warning("closing the connection to %s: %s", self.address, exc)
            await self._stream.aclose()
        finally:
            self._fail_all()

    def _fail_all(self) -> None:
        self.closed = True
        self._unsent.clear()
        self._wakeup.set()  # the writer stops
        for event, slot in self._waiters.values():
            slot.append(None)
            event.set()
        self._waiters.clear()

    async def request(self, msg: dict[str, Any], timeout_s: float) -> Any:
        if self.closed:
            raise ConnectionLost(f"connection to {self.address} is closed")
        self._next_id += 1
        request_id = self._next_id
        msg["id"] = request_id
        event = trio.Event()
        slot: list[Any] = []
        self._waiters[request_id] = (event, slot)
        self._unsent.append(encode_frame(cbor2.dumps(msg)))
        self._wakeup.set()
        with trio.move_on_after(timeout_s):
            await event.wait()
        if not slot:
            self._waiters.pop(request_id, None)
            raise Timeout(f"no reply from {self.address} in {timeout_s} s")
        reply = slot[0]
        if reply is None:
            raise ConnectionLost(f"connection to {self.address} closed with the request in flight")
        if "err" in reply:
            raise error_from_wire(reply["err"])
        return reply["ok"]

    async def aclose(self) -> None:
        await self._stream.aclose()


class ConnectionPool:
    """One connection per address, opened on first use, shared by all callers."""

    def __init__(self, nursery: trio.Nursery, connect_timeout_s: float = 2.0) -> None:
        self._nursery = nursery
        self.connect_timeout_s = connect_timeout_s
        self._connections: dict[str, _Connection] = {}
        self._connecting: dict[str, trio.Event] = {}

    async def connection(self, address: str) -> _Connection:
        while True:
            conn = self._connections.get(address)
            if conn is not None and not conn.closed:
                return conn
            pending = self._connecting.get(address)
            if pending is None:
                break
            await pending.wait()
        event = self._connecting[address] = trio.Event()
        try:
            host, port = address.rsplit(":", 1)
            try:
                with trio.fail_after(self.connect_timeout_s):
                    stream = await trio.open_tcp_stream(host, int(port))
            except (OSError, trio.TooSlowError, ValueError) as exc:
                raise Unavailable(f"cannot connect to {address}: {exc}") from exc
            conn = _Connection(address, stream)
            self._connections[address] = conn
            conn.start(self._nursery)
            return conn
        finally:
            del self._connecting[address]
            event.set()

    async def request(self, address: str, msg: dict[str, Any], timeout_s: float) -> Any:
        conn = await self.connection(address)
        return await conn.request(msg, timeout_s)

    async def aclose(self) -> None:
        for conn in list(self._connections.values()):
            await conn.aclose()
        self._connections.clear()


def forget_other_groups(cache: dict[int, Any], groups: Iterable[int]) -> None:
    """Drop from a per-group cache (a leader, a time) every group not in
    ``groups``: a reshard removes groups, and a long-lived process would
    otherwise keep an entry for each group it ever talked to."""
    keep = set(groups)
    for gone in [g for g in cache if g not in keep]:
        del cache[gone]


async def request_leader(pool: ConnectionPool, addresses: list[str], msg: dict[str, Any],
                         timeout_s: float, *, leaders: dict[int, str] | None = None) -> Any:
    """``msg`` (with its ``shard``) to the leader of a group whose replicas
    serve at ``addresses``: each is tried in turn, following its NOT_LEADER
    hint once. Raises the last error if none answered.

    ``leaders``: the address that last answered for each shard, tried first
    and kept up to date, so that a caller sending many requests to a group
    does not pay a NOT_LEADER round trip for most of them."""
    shard = msg["shard"]
    known = leaders.get(shard) if leaders is not None else None
    if known in addresses:
        addresses = [known, *(a for a in addresses if a != known)]
    last: RaftKVError | None = None
    for first in addresses:
        address = first
        for _ in range(2):
            try:
                result = await pool.request(address, msg, timeout_s)
                if leaders is not None:
                    leaders[shard] = address
                return result
            except NotLeader as exc:
                last = exc
                if exc.leader is None or exc.leader == address:
                    break
                address = exc.leader
            except RaftKVError as exc:
                last = exc
                break
    raise last or Unavailable("the group has no replicas")


class AsyncClient:
    """Use ``open_client`` to make one.

    ``managers`` are the shard manager's client addresses: the client fetches
    the shard map from them, keeps it fresh with a long-poll watch, routes
    each key to the leader of its physical shard, and refreshes the map when a
    node answers WRONG_SHARD (or does not host the shard)."""

    def __init__(self, nursery: trio.Nursery, managers: list[str], *,
                 keyspace: str = DEFAULT_KEYSPACE, request_timeout_s: float = 5.0,
                 retry_budget_s: float = 20.0, connect_timeout_s: float = 2.0,
                 watch_map: bool = True) -> None:
        if not managers:
            raise ValueError("a client needs at least one shard manager address")
        self._nursery = nursery
        self.managers = list(managers)
        self.keyspace = keyspace
        self.request_timeout_s = request_timeout_s
        self.retry_budget_s = retry_budget_s
        self.client_id = os.urandom(CLIENT_ID_BYTES)
        self._pool = ConnectionPool(nursery, connect_timeout_s)
        self._map: ShardMap | None = None
        self._map_fetch: trio.Event | None = None
        self._map_fetched_at = -1e9
        self._watch = watch_map
        self._watching = False
        self._manager_leader: str | None = None
        self._manager_rotation = random.randrange(len(self.managers))
        self._leaders: dict[int, str] = {}
        # Logical shards a group told us have moved (WRONG_SHARD with moved_to),
        # used until the map says so too: the map is published after the move.
        self._moved: dict[int, int] = {}
        self._rotation = random.randrange(1 << 16)
        self._seq = 0
        self._outstanding: set[int] = set()
        self.retries = 0
        self.map_refreshes = 0

    # -- public API -----------------------------------------------------------

    async def get(self, key: Bytesish, *, consistency: str = "strong") -> bytes | None:
        """The value of ``key``, or None. ``strong`` (default) is linearizable;
        ``eventual`` may be stale (any replica)."""
        msg = {"op": "get", "ks": self.keyspace, "key": _b(key), "cons": consistency}
        result = await self._call(msg, ls=await self.logical_shard(key),
                                  leader_only=consistency == "strong")
        value = result["value"]
        return value if value is None else bytes(value)

    async def put(self, key: Bytesish, value: Bytesish) -> WriteResult:
        return await self.batch([PutOp(_b(key), _b(value))], kind="put")

    async def delete(self, key: Bytesish) -> bool:
        """Delete ``key``; returns whether it existed."""
        result = await self.batch([DeleteOp(_b(key))], kind="delete")
        return bool(result.results[0])

    async def cas(self, key: Bytesish, expected: Bytesish | None, value: Bytesish) -> WriteResult:
        """Set ``key`` to ``value`` if it holds ``expected`` (None: if absent).
        Raises PreconditionFailed (with ``details['current']``) otherwise."""
        return await self.batch(
            [CasOp(_b(key), None if expected is None else _b(expected), _b(value))], kind="cas")

    async def batch(self, ops: list[WriteOp], *, kind: str = "batch") -> WriteResult:
        """Apply ``ops`` atomically: all or (if any cas fails) none. The keys of
        a batch must share one logical shard (give them one hash tag ``{...}``)."""
        if not ops:
            raise BadRequest("a batch needs at least one op")
        ls = await self.logical_shard(ops[0].key)
        if any([await self.logical_shard(o.key) != ls for o in ops[1:]]):
            raise BadRequest("the keys of a batch must share one logical shard: give them "
                             "the same hash tag, as in {user42}:name and {user42}:email")
        self._seq += 1
        seq = self._seq
        self._outstanding.add(seq)
        try:
            msg: dict[str, Any] = {"ks": self.keyspace, "cid": self.client_id, "seq": seq}
            if kind == "batch":
                msg.update(op="batch", ops=[encode_op(o) for o in ops])
            else:
                msg.update(encode_op(ops[0]))
            result = await self._call(msg, ls=ls, leader_only=True, seq=seq)
            return WriteResult(int(result["index"]), list(result["results"]))
        finally:
            self._outstanding.discard(seq)

    async def scan(self, prefix: Bytesish, *, limit: int | None = None,
                   consistency: str = "strong") -> list[tuple[bytes, bytes]]:
        """Keys starting with ``prefix`` and their values, in key order. The
        prefix must contain a hash tag (``{user42}:``), so that every key it
        matches lies in one logical shard; each page is read with ``consistency``."""
        prefix = _b(prefix)
        if shard_key(prefix) == prefix:
            raise BadRequest("scan needs a prefix with a complete hash tag, such as "
                             "{user42}: (keys without one are spread over all shards)")
        ls = await self.logical_shard(prefix)
        out: list[tuple[bytes, bytes]] = []
        async for page in self._pages(ls, prefix, consistency):
            out.extend(page)
            if limit is not None and len(out) >= limit:
                return out[:limit]
        return out

    async def export(self, *, consistency: str = "strong",
                     page_keys: int = 1000) -> AsyncIterator[list[tuple[bytes, bytes]]]:
        """Every key of the keyspace, one page at a time, logical shard by
        logical shard (each page is one read: consistent in itself)."""
        await self.logical_shard(b"")  # the keyspace exists (or UnknownKeyspace)
        total = int((await self.shard_map()).keyspace(self.keyspace)["logical_shards"])
        for ls in range(total):
            async for page in self._pages(ls, b"", consistency, page_keys):
                yield page

    async def _pages(self, ls: int, prefix: bytes, consistency: str,
                     page_keys: int = 1000) -> AsyncIterator[list[tuple[bytes, bytes]]]:
        after: bytes | None = None
        while True:
            msg: dict[str, Any] = {"op": "scan", "ks": self.keyspace, "ls": ls,
                                   "prefix": prefix, "after": after, "limit": page_keys,
                                   "cons": consistency}
            result = await self._call(msg, ls=ls, leader_only=consistency == "strong")
            items = [(bytes(k), bytes(v)) for k, v in result["items"]]
            if items:
                yield items
            if not result["more"] or not items:
                return
            after = items[-1][0]

    async def status(self, address: str) -> dict[str, Any]:
        """One node's (or shard manager replica's) status (no retries)."""
        result: dict[str, Any] = await self._pool.request(address, {"op": "status"},
                                                         self.request_timeout_s)
        return result

    async def manager(self, msg: dict[str, Any]) -> Any:
        """A request to the shard manager's leader (keyspace create, drop, ...)."""
        return await self._manager_call(msg, leader_only=True)

    async def aclose(self) -> None:
        await self._pool.aclose()

    # -- the shard map -----------------------------------------------------------

    async def logical_shard(self, key: Bytesish) -> int:
        """The logical shard of ``key`` in this client's keyspace."""
        try:
            return (await self.shard_map()).logical_shard(self.keyspace, _b(key))
        except UnknownKeyspace:
            # The keyspace may be newer than the cached map, or than the map of
            # the manager replica that answered: ask the leader for every change.
            return (await self.shard_map(refresh=True, fresh=True)).logical_shard(
                self.keyspace, _b(key))

    async def shard_map(self, *, refresh: bool = False, fresh: bool = False) -> ShardMap:
        """The cached map (fetched on first use); ``refresh``: a newer one now
        (``fresh``: from the manager's leader, with every committed change)."""
        if self._map is None or refresh:
            pending = self._map_fetch
            if pending is not None:
                await pending.wait()  # one fetch at a time serves every caller
            else:
                self._map_fetch = trio.Event()
                try:
                    request = {"op": "map", "fresh": True} if fresh else {"op": "map"}
                    self._install(await self._manager_call(request, leader_only=fresh))
                finally:
                    self._map_fetch.set()
                    self._map_fetch = None
                    self._map_fetched_at = trio.current_time()
                    self.map_refreshes += 1
        if self._watch and not self._watching:
            self._watching = True
            self._nursery.start_soon(self._watch_map)
        assert self._map is not None
        return self._map

    async def _refresh_map_briefly(self) -> None:
        """A newer map if the shard manager answers within
        ``MAP_REFRESH_BRIEF_S``; else the cached map stays. The groups serve
        without the manager (a restarted node reopens its replicas from disk),
        so an operation must not fail, nor wait out the whole retry budget,
        because the manager is down."""
        with trio.move_on_after(MAP_REFRESH_BRIEF_S), \
                contextlib.suppress(ClusterUnavailable):
            await self.shard_map(refresh=True)

    def _install(self, document: Any) -> None:
        if self._map is None or int(document["version"]) > self._map.version:
            self._map = ShardMap(document)

    async def _watch_map(self) -> None:
        """Long-poll the shard manager for newer maps, for as long as the client lives."""
        while True:
            version = self._map.version if self._map else 0
            try:
                document = await self._manager_call(
                    {"op": "map", "after": version, "wait_s": WATCH_WAIT_S},
                    leader_only=False, timeout_s=WATCH_WAIT_S + self.request_timeout_s)
                self._install(document)
            except RaftKVError:
                await trio.sleep(1.0)

    async def _manager_call(self, msg: dict[str, Any], *, leader_only: bool,
                            timeout_s: float | None = None) -> Any:
        deadline = trio.current_time() + self.retry_budget_s
        backoff_s = 0.01
        last: RaftKVError | None = None
        while True:
            address = self._manager_leader or self.managers[
                self._manager_rotation % len(self.managers)]
            try:
                result = await self._pool.request(address, dict(msg),
                                                  timeout_s or self.request_timeout_s)
                if leader_only:
                    self._manager_leader = address
                return result
            except NotLeader as exc:
                last = exc
                self._manager_leader = exc.leader if exc.leader != address else None
                if self._manager_leader is None:
                    self._manager_rotation += 1
                else:
                    continue
            except (Unavailable, Overloaded, ConnectionLost, Timeout) as exc:
                last = exc
                self._manager_leader = None
                self._manager_rotation += 1
            if trio.current_time() + backoff_s > deadline:
                raise ClusterUnavailable(
                    f"no shard manager answered within {self.retry_budget_s} s "
                    f"(last error: {last})")
            await trio.sleep(backoff_s * (0.5 + random.random()))
            backoff_s = min(backoff_s * 2, 0.5)

    # -- machinery ------------------------------------------------------------

    def _ack(self) -> int:
        return min(self._outstanding) - 1 if self._outstanding else self._seq

    async def _rerouted(self, exc: RaftKVError, route: Route, ls: int) -> bool:
        """After WRONG_SHARD or UNKNOWN_SHARD: True to retry at once, at the group
        the logical shard moved to (a hint not followed before); else the map is
        refreshed and the caller backs off."""
        moved_to = exc.details.get("moved_to")
        if isinstance(moved_to, int) and moved_to != route.shard \
                and self._moved.get(ls) != moved_to:
            self._moved[ls] = moved_to
            return True
        # Routed by a stale map, or the node has not opened the replica yet.
        self._moved.pop(ls, None)
        self._rotate(route.shard)
        await self.shard_map(refresh=True)
        return False

    async def _current_route(self, ls: int) -> Route:
        smap = await self.shard_map()
        moved_to = self._moved.get(ls)
        if moved_to is not None and not smap.replicas(moved_to):
            # A group newer than this client's map: ask the manager's leader.
            smap = await self.shard_map(refresh=True, fresh=True)
            if not smap.replicas(moved_to):
                self._moved.pop(ls, None)  # not even the leader knows it: drop the hint
        return self._route(smap, ls)

    def _route(self, smap: ShardMap, ls: int) -> Route:
        """The map's route for logical shard ``ls``, unless a group said it moved
        to a shard the map does not show yet."""
        route = smap.route_logical(self.keyspace, ls)
        moved_to = self._moved.get(ls)
        if moved_to is None or moved_to == route.shard:
            self._moved.pop(ls, None)
            return route
        return Route(self.keyspace, ls, moved_to, smap.replicas(moved_to))

    def _pick(self, route: Route, leader_only: bool) -> str:
        if not leader_only and route.replicas:
            # Eventual reads spread over every replica: that is what they are for
            # (and why they may be stale).
            return random.choice(route.replicas)
        leader = self._leaders.get(route.shard)
        if leader is not None:
            return leader
        if not route.replicas:
            raise Unavailable(f"the shard map lists no replica of shard {route.shard}")
        return route.replicas[self._rotation % len(route.replicas)]

    def _rotate(self, shard: int) -> None:
        self._leaders.pop(shard, None)
        self._rotation += 1

    async def _call(self, msg: dict[str, Any], *, ls: int, leader_only: bool,
                    seq: int | None = None) -> Any:
        """Send ``msg`` for logical shard ``ls`` of this client's keyspace to
        the node the map says (the leader for ``leader_only``), with retries."""
        deadline = trio.current_time() + self.retry_budget_s
        maybe_happened: RaftKVError | None = None
        last: RaftKVError | None = None
        backoff_s = 0.01
        while True:
            route = await self._current_route(ls)
            msg["shard"] = route.shard
            try:
                address = self._pick(route, leader_only)
                if seq is not None:
                    msg["ack"] = self._ack()
                result = await self._pool.request(address, msg, self.request_timeout_s)
                if leader_only:
                    self._leaders[route.shard] = address
                return result
            except NotLeader as exc:
                last = exc
                hint = exc.leader
                if hint is not None and hint != address:
                    self._leaders[route.shard] = hint
                    continue  # a hint is worth one immediate retry
                self._rotate(route.shard)
                if trio.current_time() - self._map_fetched_at > MAP_REFRESH_ON_NO_LEADER_S:
                    # No hint: maybe an election, maybe the replicas moved.
                    await self._refresh_map_briefly()
            except ShardMoving as exc:
                # The logical shard is cutting over to another group: back off and
                # try again, at the group it is going to if the frozen one says
                # (it serves the shard as soon as it activates).
                last = exc
                moved_to = exc.details.get("moved_to")
                if isinstance(moved_to, int) and moved_to != route.shard:
                    self._moved[ls] = moved_to
            except (WrongShard, UnknownShard) as exc:
                last = exc
                if await self._rerouted(exc, route, ls):
                    continue
            except _RETRY_DEFINITE as exc:
                last = exc
                self._rotate(route.shard)
            except RaftKVError as exc:
                if exc.definite:
                    raise
                last = maybe_happened = exc
                self._rotate(route.shard)
            if trio.current_time() + backoff_s > deadline:
                if maybe_happened is not None:
                    raise maybe_happened
                raise ClusterUnavailable(
                    f"no leader reachable within {self.retry_budget_s} s (last error: {last})")
            self.retries += 1
            await trio.sleep(backoff_s * (0.5 + random.random()))
            # A cutover (SHARD_MOVING) lasts milliseconds: poll it closely.
            backoff_s = min(backoff_s * 2, MOVING_BACKOFF_MAX_S
                            if isinstance(last, ShardMoving) else 0.5)


@asynccontextmanager
async def open_client(addresses: list[str], **options: Any) -> AsyncIterator[AsyncClient]:
    """Open a client; connections are closed when the block exits."""
    async with trio.open_nursery() as nursery:
        client = AsyncClient(nursery, addresses, **options)
        try:
            yield client
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()

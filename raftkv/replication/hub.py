"""One Raft transport per process: every Raft group on one thread, one
connection per peer process (multi-Raft, as ZippyDB, TiKV and CockroachDB do).

pysyncobj on its own gives every group a thread, a listening port and a TCP
connection per peer, and pickles, compresses and Fernet-encrypts each message
on its own. With eight groups per process that cost about 2 ms of CPU per Raft
entry and eight threads fighting for the GIL (docs/PERFORMANCE.md). The hub
instead runs one loop per process:

1. wait on one epoll for sockets and the wake pipe (other threads' calls,
   such as a proposal: ``call_soon``), and hand each received message to its
   group (``member.deliver``), which says whether it must tick for it;
2. tick the groups that got something (every group once per tick period, for
   heartbeats and elections): pysyncobj's ``doTick``;
3. send what the ticks queued that may leave at once (a leader's
   append-entries), one frame per peer process for all groups;
4. sync the Raft log if a group appended to it: the groups of a process share
   one log (``journal.NodeLog``), so this is one write and one fdatasync for
   all of them;
5. send what had to wait for that sync (a follower's ack: an ack only ever
   covers entries on disk; DESIGN section 5).

Results go back to the node's trio loop through a ``Relay``: one wake-up of
that loop per round, after the ticks, not one per result.

Sockets, frames and keys are in ``wire.py``; a group's side (durability and
fault rules) is ``replica._HubTransport``. Everything here runs on the hub
thread except ``call``/``call_soon``/``close`` and ``subscribe`` (used while a
group is constructed, before it is added).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from raftkv.replication import wire

log = logging.getLogger(__name__)

Route = Callable[[str], str | None]

CONNECT_RETRY_S_MIN = 0.05


class Relay:
    """Calls from the hub thread to another thread's event loop, one wake-up
    of that loop per hub round instead of one per call.

    ``wake(fn)`` makes the other loop run ``fn`` soon, from any thread (trio's
    ``TrioToken.run_sync_soon``). Each such call writes to a socket and wakes
    the other thread: per strong read and per Raft entry, that was a tenth of
    a node's CPU with 8 groups (docs/PERFORMANCE.md). Here the hub thread
    queues its calls, and the first wakes the loop at the end of the hub's
    round (``RaftHub.at_round_end``), after every group ticked. Calls from
    other threads (an immediate refusal on the caller's own thread) wake it at
    once. Every call runs exactly once, in the order queued."""

    def __init__(self, hub: RaftHub, wake: Callable[..., object]) -> None:
        self._hub = hub
        self._wake = wake
        self._calls: collections.deque[tuple[Callable[..., object], tuple[Any, ...]]] = \
            collections.deque()
        self._wake_pending = False  # the loop will run _run_calls, and has not begun
        self._flush_queued = False  # _flush waits for the hub's round to end
        self.wakes = 0

    def run_sync_soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the other loop, soon (``TrioToken``'s signature)."""
        self._calls.append((fn, args))
        if self._wake_pending:
            return  # _run_calls clears this before it takes the calls: it will see fn
        if self._hub.on_hub_thread():
            if not self._flush_queued:
                self._flush_queued = True
                self._hub.at_round_end(self._flush)
        else:
            self._wake_now()

    def _flush(self) -> None:  # hub thread
        self._flush_queued = False
        if self._calls and not self._wake_pending:
            self._wake_now()

    def _wake_now(self) -> None:
        self._wake_pending = True
        self.wakes += 1
        self._wake(self._run_calls)

    def _run_calls(self) -> None:  # the other loop's thread
        self._wake_pending = False  # before taking the calls (see run_sync_soon)
        calls = self._calls
        while calls:
            fn, args = calls.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("%r failed", fn)


class HubMember(Protocol):
    """A Raft group's transport, as the hub sees it."""

    address: str  # the group member's own Raft address

    def peer_addresses(self) -> Iterable[str]: ...
    def deliver(self, source: str, message: Any) -> bool:
        """Take a peer's message; True if the member must tick for it."""
    def peer_link(self, hub_address: str, up: bool) -> None: ...
    def tick(self) -> None: ...
    @property
    def unsynced(self) -> bool: ...
    def sync(self) -> None: ...
    def end_round(self) -> None: ...
    def release_due(self, now: float) -> float | None: ...


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


class _Outgoing:
    """A connection this process opened to send to a peer process."""

    def __init__(self, address: str, sock: socket.socket) -> None:
        self.address = address
        self.sock = sock
        self.state = "connecting"  # -> "hello" (ours sent) -> "up"
        self.nonce = b""
        self.inbox = bytearray()  # the server's hello
        self.out = bytearray()
        self.sealer: wire.Sealer | None = None
        self.started = time.monotonic()


class _Incoming:
    """A connection a peer process opened to send to this one."""

    def __init__(self, sock: socket.socket, nonce: bytes) -> None:
        self.sock = sock
        self.nonce = nonce
        self.inbox = bytearray()  # the client's hello
        self.opener: wire.Opener | None = None
        self.started = time.monotonic()


class RaftHub:
    """The Raft transport of one process. ``route(raft_address)`` names the
    hub (``host:port``) of the process hosting a group member, or ``None`` if
    unknown; the default is the address itself (one group per process)."""

    RECV_BYTES = 1 << 18
    INCOMING_MAX = 1024
    OUT_BUFFER_BYTES_MAX = 64 << 20

    def __init__(self, address: str, secret: str, *, route: Route | None = None,
                 tick_period_s: float = 0.05, connection_retry_s: float = 0.5,
                 connection_timeout_s: float = 2.0, name: str = "raft-hub",
                 on_crash: Callable[[], None] | None = None) -> None:
        self.address = address
        self.on_crash = on_crash
        self._route = route or (lambda a: a)
        self._master = wire.master_key(secret)
        self.tick_period_s = tick_period_s
        self.connection_retry_s = connection_retry_s
        self.connection_timeout_s = connection_timeout_s
        self._members: dict[str, HubMember] = {}
        self._routes: dict[str, str | None] = {}
        self._touched: set[HubMember] = set()
        self._delaying: set[HubMember] = set()
        self._next_due = float("inf")
        self._early: dict[str, list[wire.Message]] = collections.defaultdict(list)
        self._late: dict[str, list[wire.Message]] = collections.defaultdict(list)
        self._local: list[wire.Message] = []
        self._outgoing: dict[str, _Outgoing] = {}
        self._last_attempt: dict[str, float] = {}
        self._retry_s: dict[str, float] = {}  # wait before the next attempt, by peer
        self._incoming: dict[int, _Incoming] = {}
        self._wanted: set[str] = set()
        self._wanted_dirty = False
        self._calls: collections.deque[Callable[[], object]] = collections.deque()
        # A byte is in the wake pipe or about to be, and the loop has not yet
        # taken the calls queued before it: callers need not write another.
        self._wake_pending = False
        self._round_end: list[Callable[[], object]] = []
        self._fd_callbacks: dict[int, Callable[[int], None]] = {}
        self._stopping = False
        # One receive buffer, reused: a fresh 256 KiB bytes per recv cost an
        # mmap/munmap pair each time.
        self._recv_buffer = bytearray(self.RECV_BYTES)
        self._recv_view = memoryview(self._recv_buffer)
        self.frames_sent = self.messages_sent = self.messages_dropped = 0
        self.ticks = self.rounds = self.messages_received = 0
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.subscribe(self._wake_r, self._drain_wake, select.EPOLLIN)
        host, port = split_address(address)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(128)
        except OSError:
            self._listener.close()
            self._close_fds()
            raise
        self._listener.setblocking(False)
        self.subscribe(self._listener.fileno(), self._on_accept, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._ident: int | None = None
        self._thread.start()

    # -- for other threads -----------------------------------------------------------

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the hub thread, soon. Calls queued before the loop gets
        to them share one write to the wake pipe (a system call, and the wake
        of a thread, each)."""
        self._calls.append(fn)
        if self._wake_pending:
            return  # the loop clears this before it takes the calls: it will see fn
        self._wake_pending = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def call(self, fn: Callable[[], Any], timeout_s: float = 30.0) -> Any:
        """Run ``fn`` on the hub thread and return its result (or raise its error)."""
        if self.on_hub_thread():
            return fn()
        done = threading.Event()
        out: list[Any] = []

        def run() -> None:
            try:
                out.append((True, fn()))
            except BaseException as exc:
                out.append((False, exc))
            finally:
                done.set()

        if not self._thread.is_alive():
            raise RuntimeError(f"the Raft hub at {self.address} is stopped")
        self.call_soon(run)
        if not done.wait(timeout_s):
            raise TimeoutError(f"the Raft hub at {self.address} did not answer in {timeout_s} s")
        ok, value = out[0]
        if not ok:
            raise value
        return value

    def stats(self) -> dict[str, int]:
        """Counters since start (read from any thread; each is one int)."""
        return {"groups": len(self._members), "peer_connections": sum(
                    o.state == "up" for o in list(self._outgoing.values())),
                "rounds": self.rounds, "ticks": self.ticks,
                "frames_sent": self.frames_sent, "messages_sent": self.messages_sent,
                "messages_received": self.messages_received,
                "messages_dropped": self.messages_dropped}

    def on_hub_thread(self) -> bool:
        return threading.get_ident() == self._ident

    def subscribe(self, fd: int, callback: Callable[[int], None], mask: int) -> None:
        """Call ``callback(epoll mask)`` on the hub thread when ``fd`` is ready."""
        self._fd_callbacks[fd] = callback
        try:
            self._epoll.register(fd, mask)
        except FileExistsError:
            self._epoll.modify(fd, mask)

    def unsubscribe(self, fd: int) -> None:
        self._fd_callbacks.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)

    def close(self) -> None:
        """Stop the thread and close every socket. Members should be removed first."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if threading.get_ident() != self._ident:
            self._thread.join(timeout=10)
        for out in list(self._outgoing.values()):
            out.sock.close()
        for inc in list(self._incoming.values()):
            inc.sock.close()
        self._outgoing.clear()
        self._incoming.clear()
        self._listener.close()
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._epoll.close()

    # -- for members (hub thread) ------------------------------------------------------

    def add(self, member: HubMember) -> None:
        def add() -> None:
            self._members[member.address] = member
            self._wanted_dirty = True
            self._maintain_connections(time.monotonic())
            for address, out in self._outgoing.items():
                if out.state == "up":
                    member.peer_link(address, True)
            self._touched.add(member)
        self.call(add)

    def remove(self, member: HubMember, then: Callable[[], None] | None = None) -> None:
        def remove() -> None:
            if self._members.get(member.address) is member:
                del self._members[member.address]
            self._touched.discard(member)
            self._delaying.discard(member)
            self._wanted_dirty = True
            if then is not None:
                then()
        self.call(remove)

    def peers_changed(self) -> None:
        self._wanted_dirty = True

    def route(self, address: str) -> str | None:
        if address not in self._routes:
            self._routes[address] = self._route(address)
        return self._routes[address]

    def is_up(self, hub_address: str | None) -> bool:
        if hub_address == self.address:
            return True
        out = self._outgoing.get(hub_address) if hub_address is not None else None
        return out is not None and out.state == "up"

    def touch(self, member: HubMember | None) -> None:
        if member is not None:
            self._touched.add(member)

    def enqueue(self, hub_address: str, message: wire.Message, late: bool) -> None:
        (self._late if late else self._early)[hub_address].append(message)

    def at_round_end(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` once this round's ticks are done (before its syncs), or at
        the latest before the loop waits again."""
        self._round_end.append(fn)

    def wake_at(self, member: HubMember, due: float) -> None:
        self._delaying.add(member)
        self._next_due = min(self._next_due, due)

    # -- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        self._ident = threading.get_ident()
        try:
            self._loop()
        except BaseException:
            if self._stopping:
                return
            # Without its hub a process runs no Raft at all: say so, and let the
            # owner decide (a node exits, so it is restarted and replays its journal).
            log.critical("Raft hub %s: the loop failed; no Raft group of this process "
                         "runs any more", self.address, exc_info=True)
            if self.on_crash is not None:
                self.on_crash()

    def _loop(self) -> None:
        next_all = 0.0
        next_connect = 0.0
        while not self._stopping:
            now = time.monotonic()
            if self._calls or self._touched or self._local:
                timeout = 0.0
            else:
                timeout = max(0.0, min(next_all, self._next_due, next_connect) - now)
            try:
                events = self._epoll.poll(timeout)
            except InterruptedError:
                events = []
            except (OSError, ValueError):
                if self._stopping:
                    return
                raise
            self.rounds += 1
            for fd, mask in events:
                callback = self._fd_callbacks.get(fd)
                if callback is not None:
                    self._guard(callback, mask)
            self._wake_pending = False  # before taking the calls (see call_soon)
            while self._calls:
                self._guard(self._calls.popleft())
            if self._local:
                local, self._local = self._local, []
                for message in local:
                    self._deliver(message)
            now = time.monotonic()
            if now >= next_all:
                members: Iterable[HubMember] = list(self._members.values())
                next_all = now + self.tick_period_s
            else:
                members = list(self._touched)
            self._touched.clear()
            for member in members:
                self.ticks += 1
                self._guard(member.tick)
            self._end_round()
            if self._delaying and now >= self._next_due:
                self._release_delayed(now)
            self._flush(self._early)
            self._sync_journals()
            self._flush(self._late)
            if now >= next_connect or self._wanted_dirty:
                next_connect = self._maintain_connections(now)
            self._end_round()  # (what the flushes and syncs queued, before polling)

    def _end_round(self) -> None:
        while self._round_end:
            hooks, self._round_end = self._round_end, []
            for hook in hooks:
                self._guard(hook)

    def _sync_journals(self) -> None:
        """Sync the log of every member with unsynced entries. Members sharing
        a log (a node's groups) need one sync: after it, none is unsynced."""
        for member in self._members.values():
            if member.unsynced:
                self._guard(member.sync)
            member.end_round()

    @staticmethod
    def _guard(fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("Raft hub: %r failed", fn)

    def _drain_wake(self, _mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def _release_delayed(self, now: float) -> None:
        self._next_due = float("inf")
        for member in list(self._delaying):
            due = member.release_due(now)
            if due is None:
                self._delaying.discard(member)
            else:
                self._next_due = min(self._next_due, due)

    def _deliver(self, message: wire.Message) -> None:
        to, source, body = message
        self.messages_received += 1
        member = self._members.get(to)
        if member is None:
            self.messages_dropped += 1  # a member not (or no longer) hosted here
            return
        if member.deliver(source, body):
            self._touched.add(member)

    # -- sending ------------------------------------------------------------------------

    def _flush(self, queues: dict[str, list[wire.Message]]) -> None:
        if not queues:
            return
        for hub_address, messages in queues.items():
            if hub_address == self.address:
                self._local.extend(messages)
                continue
            out = self._outgoing.get(hub_address)
            if out is None or out.state != "up":
                self.messages_dropped += len(messages)  # Raft resends
                continue
            self._transmit(out, messages)
        queues.clear()

    def _transmit(self, out: _Outgoing, messages: list[wire.Message]) -> None:
        """Put ``messages`` on the wire to one peer process (the one place they leave)."""
        assert out.sealer is not None
        for payload in wire.payloads(wire.encode_message(m) for m in messages):
            out.out += out.sealer.seal(payload)
            self.frames_sent += 1
        self.messages_sent += len(messages)
        if len(out.out) > self.OUT_BUFFER_BYTES_MAX:
            log.warning("Raft hub: %s is not reading (%d bytes queued); reconnecting",
                        out.address, len(out.out))
            self._close_outgoing(out)
            return
        self._try_send(out)

    def _try_send(self, out: _Outgoing) -> None:
        try:
            while out.out:
                sent = out.sock.send(out.out)
                del out.out[:sent]
        except BlockingIOError:
            pass
        except OSError:
            self._close_outgoing(out)
            return
        mask = select.EPOLLIN | (select.EPOLLOUT if out.out else 0)
        with contextlib.suppress(OSError):
            self._epoll.modify(out.sock.fileno(), mask)

    # -- outgoing connections -------------------------------------------------------------

    def _maintain_connections(self, now: float) -> float:
        """Open the connections wanted and not open; returns when to look again.
        A peer that refused is tried again after CONNECT_RETRY_S_MIN, then
        twice as long each time up to ``connection_retry_s``: processes started
        together connect within a tick or two, and a dead peer costs an
        attempt per ``connection_retry_s``."""
        if self._wanted_dirty:
            wanted: set[str] = set()
            for member in self._members.values():
                for peer in member.peer_addresses():
                    hub_address = self.route(peer)
                    if hub_address is not None and hub_address != self.address:
                        wanted.add(hub_address)
            self._wanted = wanted
            self._wanted_dirty = False
            for address in [a for a in self._outgoing if a not in wanted]:
                self._close_outgoing(self._outgoing[address])
        soonest = math.inf
        for address in self._wanted:
            out = self._outgoing.get(address)
            if out is not None:
                if out.state != "up" and now - out.started > self.connection_timeout_s:
                    self._close_outgoing(out)
                continue
            retry_s = self._retry_s.get(address, 0.0)
            if now - self._last_attempt.get(address, -1e9) < retry_s:
                soonest = min(soonest, self._last_attempt[address] + retry_s)
                continue
            self._last_attempt[address] = now
            self._retry_s[address] = min(self.connection_retry_s,
                                         max(CONNECT_RETRY_S_MIN, 2 * retry_s))
            soonest = min(soonest, now + self._retry_s[address])
            self._connect(address)
        return min(soonest, now + min(self.connection_retry_s, self.connection_timeout_s) / 2)

    def _connect(self, address: str) -> None:
        host, port = split_address(address)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex((host, port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            return
        out = _Outgoing(address, sock)
        self._outgoing[address] = out
        self.subscribe(sock.fileno(), functools.partial(self._on_outgoing, out),
                       select.EPOLLIN | select.EPOLLOUT)

    def _on_outgoing(self, out: _Outgoing, mask: int) -> None:
        if out.state == "connecting":
            if mask & (select.EPOLLERR | select.EPOLLHUP) or out.sock.getsockopt(
                    socket.SOL_SOCKET, socket.SO_ERROR):
                self._close_outgoing(out)
                return
            if mask & select.EPOLLOUT:
                hello, out.nonce = wire.new_hello()
                out.state = "hello"
                out.out += hello
                self._try_send(out)
            return
        if mask & select.EPOLLIN:
            try:
                data = out.sock.recv(self.RECV_BYTES)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data is not None:
                if not data or out.state == "up":
                    self._close_outgoing(out)  # closed, or the peer talks out of turn
                    return
                out.inbox += data
                if len(out.inbox) >= wire.HELLO_BYTES:
                    self._outgoing_hello(out)
                    return
        if mask & (select.EPOLLERR | select.EPOLLHUP):
            self._close_outgoing(out)
            return
        if mask & select.EPOLLOUT:
            self._try_send(out)

    def _outgoing_hello(self, out: _Outgoing) -> None:
        try:
            server_nonce = wire.parse_hello(bytes(out.inbox))
        except wire.WireError as exc:
            log.warning("Raft hub: %s: %s", out.address, exc)
            self._close_outgoing(out)
            return
        out.sealer = wire.Sealer(wire.connection_key(self._master, out.nonce, server_nonce))
        out.state = "up"
        self._retry_s.pop(out.address, None)
        for member in list(self._members.values()):
            self._guard(member.peer_link, out.address, True)
            self._touched.add(member)

    def _close_outgoing(self, out: _Outgoing) -> None:
        if self._outgoing.get(out.address) is out:
            del self._outgoing[out.address]
        self.unsubscribe(out.sock.fileno())
        out.sock.close()
        if out.state == "up":
            out.state = "closed"
            for member in list(self._members.values()):
                self._guard(member.peer_link, out.address, False)
        out.state = "closed"

    # -- incoming connections ---------------------------------------------------------------

    def _on_accept(self, _mask: int) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                log.warning("Raft hub: accept failed", exc_info=True)
                break
            self._expire_incoming()
            if len(self._incoming) >= self.INCOMING_MAX:
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello, nonce = wire.new_hello()
            try:
                sock.send(hello)
            except OSError:
                sock.close()
                continue
            inc = _Incoming(sock, nonce)
            self._incoming[sock.fileno()] = inc
            self.subscribe(sock.fileno(), functools.partial(self._on_incoming, inc),
                           select.EPOLLIN)

    def _expire_incoming(self) -> None:
        """Close connections that never completed their hello (they hold a slot)."""
        now = time.monotonic()
        for inc in [i for i in self._incoming.values()
                    if i.opener is None and now - i.started > self.connection_timeout_s]:
            self._close_incoming(inc)

    def _on_incoming(self, inc: _Incoming, mask: int) -> None:
        try:
            size = inc.sock.recv_into(self._recv_buffer)
        except BlockingIOError:
            return
        except OSError:
            size = 0
        if not size:
            self._close_incoming(inc)
            return
        data: bytes | memoryview = self._recv_view[:size]
        try:
            if inc.opener is None:
                inc.inbox += data
                if len(inc.inbox) < wire.HELLO_BYTES:
                    return
                client_nonce = wire.parse_hello(bytes(inc.inbox[:wire.HELLO_BYTES]))
                inc.opener = wire.Opener(
                    wire.connection_key(self._master, client_nonce, inc.nonce))
                data = bytes(inc.inbox[wire.HELLO_BYTES:])
                inc.inbox.clear()
            messages = [m for payload in inc.opener.feed(data)
                        for m in wire.decode_payload(payload)]
        except wire.WireError as exc:
            log.warning("Raft hub %s: closing a connection: %s", self.address, exc)
            self._close_incoming(inc)
            return
        for message in messages:
            self._deliver(message)

    def _close_incoming(self, inc: _Incoming) -> None:
        fd = inc.sock.fileno()
        if fd >= 0:
            self._incoming.pop(fd, None)
            self.unsubscribe(fd)
        inc.sock.close()

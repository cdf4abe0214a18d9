"""The process-wide Raft transport (raftkv/replication/hub.py), over real
sockets on 127.0.0.1: routing between processes, the sync-before-ack order,
refusing peers without the secret, reconnecting after a restart, not
leaking file descriptors as replicas come and go, and the hand-offs between
the hub's thread and others (``call_soon``, ``Relay``)."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from raftkv.localcluster import free_port
from raftkv.replication.hub import RaftHub, Relay
from raftkv.replication.replica import Replica
from tests.replication.support import FAST, put_command, submit, wait_for

pytestmark = pytest.mark.timeout(60)


class Member:
    """A stand-in group member that records what the hub does to it."""

    def __init__(self, address: str, peers: list[str], log: list[Any] | None = None) -> None:
        self.address = address
        self.peers = peers
        self.got: list[tuple[str, Any]] = []
        self.links: list[tuple[str, bool]] = []
        self.dirty = False
        self.ticks = 0
        self.log = log if log is not None else []

    def peer_addresses(self) -> list[str]:
        return self.peers

    def deliver(self, source: str, message: Any) -> bool:
        self.got.append((source, message))
        self.log.append(("deliver", self.address, message))
        return bool(message.get("tick", True))

    def peer_link(self, hub_address: str, up: bool) -> None:
        self.links.append((hub_address, up))

    def tick(self) -> None:
        self.ticks += 1

    @property
    def unsynced(self) -> bool:
        return self.dirty

    def sync(self) -> None:
        if self.dirty:
            self.log.append(("sync", self.address))
        self.dirty = False

    def end_round(self) -> None:
        pass

    def release_due(self, now: float) -> float | None:
        return None


@pytest.fixture
def hubs() -> Iterator[Callable[..., RaftHub]]:
    made: list[RaftHub] = []

    def make(address: str | None = None, secret: str = "s3cret",
             route: dict[str, str] | None = None, connection_retry_s: float = 0.1,
             tick_period_s: float = 0.05) -> RaftHub:
        hub = RaftHub(address or f"127.0.0.1:{free_port()}", secret,
                      route=route.get if route is not None else None,
                      connection_retry_s=connection_retry_s, tick_period_s=tick_period_s)
        made.append(hub)
        return hub

    yield make
    for hub in made:
        hub.close()


def send(hub: RaftHub, to_hub: str, message: Any, late: bool = False) -> None:
    hub.call(lambda: hub.enqueue(to_hub, message, late))


def pair(make: Callable[..., RaftHub], **options: Any
         ) -> tuple[RaftHub, RaftHub, Member, Member, dict[str, str]]:
    route: dict[str, str] = {}
    one, two = make(route=route, **options), make(route=route, **options)
    route.update({"a:1": one.address, "b:1": two.address})
    a, b = Member("a:1", ["b:1"]), Member("b:1", ["a:1"])
    one.add(a)
    two.add(b)
    wait_for(lambda: (two.address, True) in a.links and (one.address, True) in b.links)
    return one, two, a, b, route


def test_messages_reach_the_member_on_the_other_process_in_order(
        hubs: Callable[..., RaftHub]) -> None:
    one, two, _a, b, _ = pair(hubs)
    for start in range(0, 500, 50):  # 50 messages in each round of the hub
        def queue(start: int = start) -> None:
            for i in range(start, start + 50):
                one.enqueue(two.address, ("b:1", "a:1", {"n": i, "data": b"x" * (i % 7)}), False)
        one.call(queue)
    send(one, two.address, ("nobody:1", "a:1", {"n": -1}))  # no such member there: dropped
    wait_for(lambda: len(b.got) == 500)
    assert [m["n"] for _, m in b.got] == list(range(500))
    assert {s for s, _ in b.got} == {"a:1"}
    stats = one.stats()
    assert stats["frames_sent"] < stats["messages_sent"]  # many messages per frame
    wait_for(lambda: two.stats()["messages_dropped"] == 1)


def test_a_member_ticks_for_a_message_only_when_it_asks_to(
        hubs: Callable[..., RaftHub]) -> None:
    """A read round's probes and acks make no group tick (pysyncobj's tick is
    the costliest step of a round); other messages do."""
    one, two, _a, b, _ = pair(hubs, tick_period_s=30.0)  # no periodic tick in the test
    wait_for(lambda: b.ticks >= 1)  # the first round ticks every member
    before = b.ticks
    for i in range(20):
        send(one, two.address, ("b:1", "a:1", {"n": i, "tick": False}))
    wait_for(lambda: len(b.got) == 20)
    time.sleep(0.1)
    assert b.ticks == before
    send(one, two.address, ("b:1", "a:1", {"n": 20}))
    wait_for(lambda: b.ticks == before + 1)


def test_a_late_message_leaves_only_after_its_members_journal_sync(
        hubs: Callable[..., RaftHub]) -> None:
    one, two, a, b, _ = pair(hubs)
    log: list[Any] = []
    a.log = b.log = log
    for i in range(20):
        def queue(i: int = i) -> None:
            a.dirty = True  # an entry appended this round
            one.enqueue(two.address, ("b:1", "a:1", {"ack": i}), True)
        one.call(queue)
        wait_for(lambda i=i: ("deliver", "b:1", {"ack": i}) in log)
    for i in range(20):
        delivered = log.index(("deliver", "b:1", {"ack": i}))
        assert ("sync", "a:1") in log[:delivered]
        assert log[:delivered].count(("sync", "a:1")) == i + 1


def test_a_peer_without_the_secret_is_refused_and_others_are_still_served(
        hubs: Callable[..., RaftHub]) -> None:
    one, two, _a, b, route = pair(hubs)
    intruder = hubs(secret="wrong", route=route)
    route["c:1"] = intruder.address
    c = Member("c:1", ["b:1"])
    intruder.add(c)
    wait_for(lambda: (two.address, True) in c.links)  # the hello carries no secret
    send(intruder, two.address, ("b:1", "a:1", {"forged": True}))
    wait_for(lambda: (two.address, False) in c.links)  # two closed the connection
    with socket.create_connection(("127.0.0.1", int(two.address.rsplit(":", 1)[1]))) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
        raw.settimeout(5)
        while raw.recv(4096):
            pass  # the hub's hello, then the close
    send(one, two.address, ("b:1", "a:1", {"real": True}))
    wait_for(lambda: ("a:1", {"real": True}) in b.got)
    assert all("forged" not in m for _, m in b.got)


def test_a_restarted_peer_is_reconnected(hubs: Callable[..., RaftHub]) -> None:
    one, two, a, _b, route = pair(hubs)
    address = two.address
    two.close()
    wait_for(lambda: (address, False) in a.links)
    send(one, address, ("b:1", "a:1", {"lost": True}))  # nobody listens: dropped
    again = hubs(address=address, route=route)
    b2 = Member("b:1", ["a:1"])
    again.add(b2)
    wait_for(lambda: a.links[-1] == (address, True))
    send(one, address, ("b:1", "a:1", {"after": True}))
    wait_for(lambda: b2.got == [("a:1", {"after": True})])


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_replicas_opened_and_closed_on_one_hub_leak_no_file_descriptors(
        tmp_path: Path, hubs: Callable[..., RaftHub]) -> None:
    hub = hubs()
    address = f"127.0.0.1:{free_port()}"

    def cycle(i: int) -> None:
        replica = Replica(0, tmp_path / f"r{i}", address, [], "s3cret", settings=FAST, hub=hub)
        wait_for(lambda: replica.is_leader)
        result, error = submit(replica, put_command(1, b"k"))
        assert error is None and result is not None
        replica.destroy()

    cycle(0)
    before = _open_fds()
    for i in range(1, 11):
        cycle(i)
    time.sleep(0.2)
    assert _open_fds() <= before + 2
    assert hub.stats()["groups"] == 0


def test_a_failed_loop_is_reported_to_the_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node passes os._exit: a process whose hub died runs no Raft and must
    restart (it replays its journal)."""
    crashed: list[bool] = []

    def broken(self: RaftHub, queues: Any) -> None:
        raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(RaftHub, "_flush", broken)
    hub = RaftHub(f"127.0.0.1:{free_port()}", "s3cret", on_crash=lambda: crashed.append(True))
    try:
        wait_for(lambda: crashed == [True])
        with pytest.raises(RuntimeError, match="stopped"):
            hub.call(lambda: None)
    finally:
        hub.close()


def test_a_peer_that_starts_late_is_connected_soon_not_after_the_retry_period(
        hubs: Callable[..., RaftHub]) -> None:
    """Processes started together: a peer whose port refused is tried again
    after 0.05 s, 0.1 s, 0.2 s ... up to connection_retry_s (5 s here)."""
    route: dict[str, str] = {}
    address = f"127.0.0.1:{free_port()}"
    one = hubs(route=route, connection_retry_s=5.0)
    route.update({"a:1": one.address, "b:1": address})
    a = Member("a:1", ["b:1"])
    one.add(a)
    time.sleep(0.3)  # refused a few times by now
    two = hubs(address=address, route=route)
    started = time.monotonic()
    two.add(Member("b:1", ["a:1"]))
    wait_for(lambda: (address, True) in a.links, timeout_s=4.0)
    assert time.monotonic() - started < 2.0


def test_a_dead_peer_is_tried_once_per_retry_period_once_backed_off(
        hubs: Callable[..., RaftHub]) -> None:
    """The backoff doubles from 0.05 s and stops at connection_retry_s (0.4 s
    here): neither a busy loop on a dead peer nor a peer given up on."""
    attempts: list[float] = []
    route = {"a:1": "", "b:1": f"127.0.0.1:{free_port()}"}  # nobody listens there
    one = hubs(route=route, connection_retry_s=0.4)
    route["a:1"] = one.address
    connect = one._connect

    def counted(address: str) -> None:
        attempts.append(time.monotonic())
        connect(address)

    one._connect = counted  # type: ignore[method-assign]
    started = time.monotonic()
    one.add(Member("a:1", ["b:1"]))
    time.sleep(3.0)
    late = [t for t in attempts if t - started >= 1.0]  # backed off to 0.4 s by then
    assert 3 <= len(late) <= 6, [round(t - started, 2) for t in attempts]
    gaps = [b - a for a, b in itertools.pairwise(late)]
    assert all(gap >= 0.35 for gap in gaps), gaps


# -- hand-offs between threads ---------------------------------------------------------


def test_calls_from_several_threads_all_run_once_in_order_while_sharing_wakes(
        hubs: Callable[..., RaftHub]) -> None:
    hub = hubs(tick_period_s=30.0, connection_retry_s=30.0)  # it waits 1 s unless woken
    started = time.monotonic()
    for _ in range(20):
        hub.call(lambda: None)
    assert time.monotonic() - started < 5.0  # each call woke the hub (about 10 s if not)
    ran: list[tuple[int, int]] = []

    def produce(tag: int) -> None:
        for i in range(3000):
            hub.call_soon(functools.partial(ran.append, (tag, i)))

    threads = [threading.Thread(target=produce, args=(tag,)) for tag in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_for(lambda: len(ran) == 9000, timeout_s=5)
    time.sleep(0.1)
    assert len(ran) == 9000
    for tag in range(3):
        assert [i for t, i in ran if t == tag] == list(range(3000))


class OtherLoop:
    """Another thread's event loop, as a Relay sees it (trio's run_sync_soon):
    ``wake(fn)`` from any thread makes this thread run ``fn``."""

    def __init__(self) -> None:
        self.wakes = 0
        self._queue: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def wake(self, fn: Callable[[], object]) -> None:
        self.wakes += 1
        self._queue.put(fn)

    def _run(self) -> None:
        while (fn := self._queue.get()) is not None:
            fn()

    def stop(self) -> None:
        self._queue.put(None)
        self.thread.join(timeout=5)


@pytest.fixture
def other_loop() -> Iterator[OtherLoop]:
    loop = OtherLoop()
    yield loop
    loop.stop()


def test_a_relay_wakes_the_other_loop_once_for_a_hub_rounds_calls_after_its_ticks(
        hubs: Callable[..., RaftHub], other_loop: OtherLoop) -> None:
    hub = hubs()
    relay = Relay(hub, other_loop.wake)
    out: list[tuple[int, bool]] = []
    on_other = lambda i: out.append((i, threading.current_thread() is other_loop.thread))  # noqa: E731

    def queue_calls() -> int:
        for i in range(100):
            relay.run_sync_soon(on_other, i)
        return other_loop.wakes  # not woken yet: that waits for the round's end

    assert hub.call(queue_calls) == 0
    wait_for(lambda: len(out) == 100)
    assert out == [(i, True) for i in range(100)]
    assert other_loop.wakes == relay.wakes == 1

    hub.call(lambda: relay.run_sync_soon(on_other, 100))  # a later round wakes it again
    wait_for(lambda: len(out) == 101)
    assert other_loop.wakes == 2


def test_a_relay_call_from_another_thread_wakes_the_loop_at_once(
        hubs: Callable[..., RaftHub], other_loop: OtherLoop) -> None:
    relay = Relay(hubs(), other_loop.wake)
    out: list[str] = []
    relay.run_sync_soon(out.append, "refused at once")  # (the caller's own thread)
    assert other_loop.wakes == 1  # woken by this call, not at a hub round's end
    wait_for(lambda: out == ["refused at once"])


def test_a_relay_call_queued_while_the_loop_runs_the_last_batch_runs_once(
        hubs: Callable[..., RaftHub], other_loop: OtherLoop) -> None:
    hub = hubs()
    relay = Relay(hub, other_loop.wake)
    running, release = threading.Event(), threading.Event()
    out: list[int] = []

    def first() -> None:
        running.set()
        release.wait(5)
        out.append(1)

    hub.call(lambda: relay.run_sync_soon(first))
    assert running.wait(5)
    hub.call(lambda: relay.run_sync_soon(out.append, 2))  # while the loop is in first()
    hub.call(lambda: None)  # a round has ended since
    release.set()
    wait_for(lambda: out == [1, 2])
    time.sleep(0.1)
    assert out == [1, 2]


def test_relay_calls_racing_the_loop_over_many_rounds_all_run_once(
        hubs: Callable[..., RaftHub], other_loop: OtherLoop) -> None:
    """Each call, run on the other loop, asks the hub for the next: the hub
    queues it while the loop is finishing the batch it is in."""
    hub = hubs()
    relay = Relay(hub, other_loop.wake)
    out: list[int] = []
    total = 5000

    def on_loop(i: int) -> None:
        out.append(i)
        if i + 1 < total:
            hub.call_soon(functools.partial(relay.run_sync_soon, on_loop, i + 1))

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads interleave as often as they can
    try:
        hub.call_soon(functools.partial(relay.run_sync_soon, on_loop, 0))
        wait_for(lambda: len(out) == total, timeout_s=30)
    finally:
        sys.setswitchinterval(switch)
    assert out == list(range(total))


def test_a_failing_relay_call_is_logged_and_the_next_still_run(
        hubs: Callable[..., RaftHub], other_loop: OtherLoop,
        caplog: pytest.LogCaptureFixture) -> None:
    hub = hubs()
    relay = Relay(hub, other_loop.wake)
    out: list[str] = []

    def broken() -> None:
        raise RuntimeError("a bug in a callback")

    def queue_both() -> None:
        relay.run_sync_soon(broken)
        relay.run_sync_soon(out.append, "after")

    with caplog.at_level(logging.ERROR):
        hub.call(queue_both)
        wait_for(lambda: out == ["after"])
    assert "a bug in a callback" in caplog.text


def test_a_group_polls_no_file_of_its_own_and_proposals_from_threads_all_commit(
        tmp_path: Path, hubs: Callable[..., RaftHub]) -> None:
    """pysyncobj wakes a group's tick through a pipe per group; on a hub a
    proposal from another thread touches the group through the hub instead."""
    hub = hubs()
    polled = hub.call(lambda: len(hub._fd_callbacks))
    replica = Replica(0, tmp_path / "r", f"127.0.0.1:{free_port()}", [], "s3cret",
                      settings=FAST, hub=hub)
    try:
        assert hub.call(lambda: len(hub._fd_callbacks)) == polled
        wait_for(lambda: replica.is_leader)
        results: list[tuple[Any, Any]] = []

        def propose(client: int) -> None:
            for seq in range(1, 26):
                results.append(submit(replica, put_command(
                    seq, b"k%d-%d" % (client, seq), client_id=bytes([client]) * 16)))

        threads = [threading.Thread(target=propose, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(results) == 100
        assert all(error is None and result is not None for result, error in results)
    finally:
        replica.destroy()

"""The etcd target against a real 3-member etcd on 127.0.0.1 (no mocks).

Each test gets its own cluster under ``tmp_path`` (tests/conftest.py),
stopped at teardown whatever happened. When etcd is not installed and cannot
be, the tests that need it skip with `EtcdUnavailable`'s message; the
start-failure tests run anyway (they need no etcd).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import pytest
import trio

from jepsen_lite.checker import Verdict, check, make_model
from jepsen_lite.etcd import (
    EtcdCluster,
    EtcdStartError,
    EtcdTarget,
)
from jepsen_lite.history import Event, EventType
from jepsen_lite.target import Completion, FaultError, Op

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(etcd_cluster: EtcdCluster) -> EtcdCluster:
    """A started 3-member etcd (``etcd_cluster``, tests/conftest.py)."""
    return etcd_cluster


async def run_ops(target: EtcdTarget, process: int, *ops: Op) -> list[Completion]:
    """Run ``ops`` in order on one fresh client of ``process``."""
    async with target.client(process) as client:
        return [await client.invoke(op) for op in ops]


async def until_ok(target: EtcdTarget, process: int, op: Op,
                   timeout_s: float = 20.0) -> Completion:
    """Run ``op`` on fresh clients of ``process`` until it is ok (or the
    timeout passes): for ops that may meet a leader election. Only for ops
    whose repetition changes nothing (reads, the same write again)."""
    deadline = time.monotonic() + timeout_s
    while True:
        (done,) = await run_ops(target, process, op)
        if done.type == "ok" or time.monotonic() > deadline:
            return done
        await trio.sleep(0.2)


def processes_using(directory: Path) -> list[int]:
    """Live processes whose command line mentions ``directory`` (from /proc)."""
    needle = str(directory).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # exited meanwhile
            continue
    return pids


async def test_read_of_absent_key_is_ok_none(cluster: EtcdCluster) -> None:
    target = EtcdTarget(cluster)
    assert await run_ops(target, 0, Op("read", "absent")) == [Completion("ok", None)]


async def test_write_then_read_on_every_member(cluster: EtcdCluster) -> None:
    target = EtcdTarget(cluster)
    assert await run_ops(target, 0, Op("write", "k", 7)) == [Completion("ok", 7)]
    for process in range(3):  # processes 0, 1, 2 talk to e1, e2, e3
        assert await run_ops(target, process, Op("read", "k")) == [Completion("ok", 7)]
    assert await run_ops(target, 1, Op("write", "k", -3), Op("read", "k")) == [
        Completion("ok", -3), Completion("ok", -3)]


async def test_cas_succeeds_or_fails_without_error(cluster: EtcdCluster) -> None:
    target = EtcdTarget(cluster)
    results = await run_ops(
        target, 0,
        Op("cas", "k", (None, 1)),  # absent: succeeds
        Op("cas", "k", (None, 2)),  # present now: compare false
        Op("cas", "k", (1, 3)),
        Op("cas", "k", (1, 4)),     # value is 3: compare false
        Op("read", "k"),
        Op("cas", "other", (5, 6)),  # a value compare on an absent key is false
        Op("read", "other"),
    )
    assert results == [
        Completion("ok", [None, 1]),
        Completion("fail"),
        Completion("ok", [1, 3]),
        Completion("fail"),
        Completion("ok", 3),
        Completion("fail"),
        Completion("ok", None),
    ]


async def test_request_etcd_rejects_is_fail_and_bad_op_is_never_sent(
        cluster: EtcdCluster) -> None:
    target = EtcdTarget(cluster)
    empty_key, bad_value, unknown = await run_ops(
        target, 0, Op("write", "", 1), Op("write", "k", "seven"), Op("add", "k", 1))
    assert empty_key.type == "fail"
    assert empty_key.error is not None
    assert "key is not provided" in empty_key.error
    assert bad_value.type == "fail"
    assert bad_value.error is not None
    assert unknown.type == "fail"
    assert unknown.error is not None
    assert await run_ops(target, 0, Op("read", "k")) == [Completion("ok", None)]


async def test_kill_member_others_serve_then_restart(cluster: EtcdCluster) -> None:
    target = EtcdTarget(cluster)
    assert target.nemesis_targets() == {"kill": ["e1", "e2", "e3"],
                                        "pause": ["e1", "e2", "e3"]}
    assert await run_ops(target, 1, Op("write", "k", 1)) == [Completion("ok", 1)]

    assert target.inject("kill", "e1").startswith("killed e1")
    assert cluster.pid("e1") is None
    # e1 may have been the leader: the first ops may wait for an election.
    assert await until_ok(target, 1, Op("write", "k", 2)) == Completion("ok", 2)
    assert await until_ok(target, 2, Op("read", "k")) == Completion("ok", 2)
    assert await run_ops(target, 2, Op("cas", "k", (2, 3)), Op("read", "k")) == [
        Completion("ok", [2, 3]), Completion("ok", 3)]

    # Process 0's member is down: refused before sending is a definite fail,
    # and the same client goes on with the next member.
    refused, after = await run_ops(target, 0, Op("write", "k", 99), Op("read", "k"))
    assert refused.type == "fail"
    assert refused.error is not None
    assert "refused" in refused.error.lower()
    assert after == Completion("ok", 3)  # the refused write did not happen

    with pytest.raises(FaultError, match="not running"):
        target.inject("kill", "e1")
    with pytest.raises(FaultError, match="no member"):
        target.inject("kill", "e9")
    with pytest.raises(FaultError, match="unknown fault kind"):
        target.inject("partition", "e2")

    assert target.heal("kill", "e1").startswith("restarted e1")
    assert cluster.pid("e1") is not None
    assert await until_ok(target, 0, Op("read", "k")) == Completion("ok", 3)
    assert await run_ops(target, 0, Op("write", "k", 4)) == [Completion("ok", 4)]
    assert await run_ops(target, 2, Op("read", "k")) == [Completion("ok", 4)]


async def test_pause_makes_requests_info_then_resume(cluster: EtcdCluster) -> None:
    target = EtcdTarget(cluster, request_timeout_s=0.5)
    assert await run_ops(target, 0, Op("write", "k", 1)) == [Completion("ok", 1)]

    assert target.inject("pause", "e2").startswith("paused e2")
    started = time.monotonic()
    (paused_write,) = await run_ops(target, 1, Op("write", "k", 2))
    # Sent, never answered: it may still happen when e2 resumes.
    assert paused_write.type == "info"
    assert paused_write.error is not None
    assert "timed out" in paused_write.error
    assert time.monotonic() - started < 5
    # e2 may have been the leader: the first ops may wait for an election.
    assert await until_ok(target, 0, Op("write", "k", 3)) == Completion("ok", 3)
    assert await until_ok(target, 2, Op("read", "k")) == Completion("ok", 3)

    assert target.heal("pause", "e2").startswith("resumed e2")
    resumed = await until_ok(target, 1, Op("read", "k"))
    assert resumed.type == "ok"
    assert resumed.value in (2, 3)
    assert await run_ops(target, 1, Op("write", "k", 5)) == [Completion("ok", 5)]
    assert await run_ops(target, 0, Op("read", "k")) == [Completion("ok", 5)]


async def test_write_without_quorum_is_info(cluster: EtcdCluster) -> None:
    target = EtcdTarget(cluster, request_timeout_s=10.0)
    assert await run_ops(target, 2, Op("write", "k", 1)) == [Completion("ok", 1)]
    target.inject("kill", "e1")
    target.inject("kill", "e2")
    (lost,) = await run_ops(target, 2, Op("write", "k", 2))
    assert lost.type == "info"  # etcd's own timeout (HTTP 5xx) or ours
    assert lost.error is not None
    target.heal("kill", "e1")
    target.heal("kill", "e2")
    healed = await until_ok(target, 2, Op("read", "k"))
    assert healed.type == "ok"
    assert healed.value in (1, 2)


async def test_stop_leaves_no_etcd_process_and_start_resumes(cluster: EtcdCluster) -> None:
    target = EtcdTarget(cluster)
    assert await run_ops(target, 0, Op("write", "k", 1)) == [Completion("ok", 1)]
    pids = [cluster.pid(member) for member in cluster.members]
    assert all(pid is not None for pid in pids)
    assert sorted(processes_using(cluster.directory)) == sorted(pids)
    cluster.pause("e2")  # a stopped process must die too
    cluster.kill("e3")   # and a dead one must not trouble stop()
    cluster.stop()
    assert processes_using(cluster.directory) == []
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert all(cluster.pid(member) is None for member in cluster.members)
    cluster.stop()  # idempotent

    cluster.start(timeout_s=30)  # same ports, same data: the write survived SIGKILL
    for process in range(3):
        assert await run_ops(target, process, Op("read", "k")) == [Completion("ok", 1)]


async def test_linearizable_history_under_kill_and_pause(cluster: EtcdCluster) -> None:
    """A short register workload with faults; the checker must accept it and
    must reject it once a read nobody could see is added."""
    target = EtcdTarget(cluster, request_timeout_s=1.0)
    concurrency, duration_s = 5, 6.0
    events: list[Event] = []
    start = time.monotonic_ns()
    deadline = time.monotonic() + duration_s

    def record(type_: EventType, process: int | str, f: str, key: str | None,
               value: object, error: str | None = None) -> None:
        events.append(Event(type_, process, f, key, value, time.monotonic_ns() - start, error))

    async def worker(slot: int) -> None:
        rng = random.Random(slot)
        process = slot
        while time.monotonic() < deadline:
            async with target.client(process) as client:
                while time.monotonic() < deadline:
                    key = f"k{rng.randint(0, 1)}"
                    f = rng.choice(["read", "write", "cas"])
                    value: object = (None if f == "read" else rng.randint(0, 4) if f == "write"
                                     else (rng.choice([None, 0, 1, 2, 3, 4]), rng.randint(0, 4)))
                    record("invoke", process, f, key, value)
                    done = await client.invoke(Op(f, key, value))
                    result = done.value if f == "read" else value
                    record(done.type, process, f, key, result, done.error)
                    if done.type == "info":
                        break
            process += concurrency  # after info, a new process and client

    async def nemesis() -> None:
        victim, sleeper = random.Random(7).sample(cluster.members, 2)
        begin = trio.current_time()
        for at_s, kind, member, heal in [(1.0, "kill", victim, False),
                                         (2.5, "kill", victim, True),
                                         (3.5, "pause", sleeper, False),
                                         (4.5, "pause", sleeper, True)]:
            await trio.sleep_until(begin + at_s)
            act = target.heal if heal else target.inject
            what = await trio.to_thread.run_sync(act, kind, member)
            record("info", "nemesis", f"{kind}-{'end' if heal else 'start'}", None, what)

    async with trio.open_nursery() as nursery:
        for slot in range(concurrency):
            nursery.start_soon(worker, slot)
        nursery.start_soon(nemesis)

    completions = [ev for ev in events if ev.type != "invoke" and ev.process != "nemesis"]
    assert sum(ev.type == "ok" for ev in completions) > 50
    assert [ev.f for ev in events if ev.process == "nemesis"] == [
        "kill-start", "kill-end", "pause-start", "pause-end"]
    result = check(events, make_model("cas-register"), timeout_s=60)
    assert result.verdict is Verdict.LINEARIZABLE, result

    impossible = [Event("invoke", 10_000, "read", "k0"), Event("ok", 10_000, "read", "k0", 99)]
    assert check(events + impossible, make_model("cas-register"),
                 timeout_s=60).verdict is Verdict.NOT_LINEARIZABLE


def test_start_failure_kills_and_reports(tmp_path: Path) -> None:
    exits = EtcdCluster(tmp_path / "false", binary=Path("/bin/false"))
    with pytest.raises(EtcdStartError, match="exited with 1"):
        exits.start(timeout_s=10)
    exits.stop()  # safe after a failed start

    silent = tmp_path / "silent-etcd"
    silent.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")  # never answers
    silent.chmod(0o755)
    hangs = EtcdCluster(tmp_path / "hangs", binary=silent)
    started = time.monotonic()
    with pytest.raises(EtcdStartError, match="no linearizable read"):
        hangs.start(timeout_s=1)
    assert time.monotonic() - started < 15
    assert processes_using(tmp_path) == []
    hangs.stop()

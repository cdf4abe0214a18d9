"""The nemesis loop (``run_nemesis``) against a fake target: when each fault's
events are recorded, and how a background fault (``reshard``) overlaps the
faults after it, waits for the previous one, is skipped, and is waited for
at the end. Real threads and the real trio clock, with faults a few tenths
of a second long. Also: a run whose harness fails keeps its history and
does not exit as "not linearizable"."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner

from jepsen_lite import cli as cli_module
from jepsen_lite.nemesis import Fault, run_nemesis
from jepsen_lite.runner import RunConfig, run
from jepsen_lite.target import Client, Completion, FaultError, Op

pytestmark = pytest.mark.timeout(30)


class FakeTarget:
    """Kills and reshards that only take time: a reshard's work lasts
    ``reshard_s`` from its inject (``heal`` waits for it)."""

    name = "fake"

    def __init__(self, reshard_s: float, *, refuse: set[str] | None = None) -> None:
        self.reshard_s = reshard_s
        self.refuse = refuse or set()
        self.calls: list[tuple[str, str, str]] = []
        self._ends: dict[str, float] = {}
        self._lock = threading.Lock()

    def client(self, process: int) -> AbstractAsyncContextManager[Client]:
        raise NotImplementedError

    def nemesis_targets(self) -> dict[str, list[str]]:
        return {}

    def inject(self, kind: str, target: str) -> str:
        with self._lock:
            self.calls.append(("inject", kind, target))
        if target in self.refuse:
            raise FaultError(f"cannot {kind} {target}")
        if kind == "reshard":
            self._ends[target] = time.monotonic() + self.reshard_s
        return f"{kind} {target}"

    def heal(self, kind: str, target: str) -> str:
        with self._lock:
            self.calls.append(("heal", kind, target))
        if kind == "reshard":
            time.sleep(max(0.0, self._ends[target] - time.monotonic()))
            return "done"
        return f"healed {target}"

    def summary(self) -> dict[str, Any]:
        return {}


async def nemesis(target: FakeTarget, faults: list[Fault], *, cancel_after_s: float | None = None
                  ) -> tuple[list[tuple[float, str, Any, str | None]], list[dict[str, Any]], float]:
    """Run the nemesis; (events as (seconds, f, target, error), done, seconds it took)."""
    start = trio.current_time()
    events: list[tuple[float, str, Any, str | None]] = []
    done: list[dict[str, Any]] = []

    def record(f: str, value: Any, error: str | None) -> None:
        events.append((round(trio.current_time() - start, 2), f, value, error))

    with trio.CancelScope() as scope:
        if cancel_after_s is not None:
            scope.deadline = start + cancel_after_s
        await run_nemesis(target, faults, start, record, done)
    return events, done, trio.current_time() - start


def names(events: list[tuple[float, str, Any, str | None]]) -> list[str]:
    return [f"{f} {value}" for _, f, value, _ in events]


async def test_faults_after_a_reshard_start_while_it_is_in_flight() -> None:
    target = FakeTarget(reshard_s=0.4)
    faults = [Fault("reshard", "shards:2", 0.0, 0.0), Fault("kill", "n1", 0.1, 0.2),
              Fault("reshard", "shards:1", 0.6, 0.6)]
    events, done, took_s = await nemesis(target, faults)
    assert names(events) == ["reshard-start shards:2", "kill-start n1", "kill-stop n1",
                             "reshard-stop shards:2", "reshard-start shards:1",
                             "reshard-stop shards:1"]
    times = {name: t for name, (t, *_) in zip(names(events), events, strict=True)}
    assert times["kill-start n1"] < 0.2 < 0.35 < times["reshard-stop shards:2"] < 0.5
    assert took_s >= 0.95  # the last reshard's work was waited for
    assert [d["kind"] for d in done] == ["reshard", "kill", "reshard"]  # in start order
    assert done[0]["healed"] == "done" and 0.35 < done[0]["end_s"] < 0.5
    assert all("error" not in d for d in done)


async def test_a_reshard_waits_for_the_previous_one_to_end() -> None:
    target = FakeTarget(reshard_s=0.3)
    faults = [Fault("reshard", "shards:2", 0.0, 0.0), Fault("reshard", "shards:1", 0.1, 0.1),
              Fault("kill", "n1", 0.8, 0.9)]
    events, done, _ = await nemesis(target, faults)
    assert names(events)[:4] == ["reshard-start shards:2", "reshard-stop shards:2",
                                 "reshard-start shards:1", "reshard-stop shards:1"]
    assert events[2][0] >= events[1][0] >= 0.25  # started once the first had ended
    assert all("error" not in d for d in done)


async def test_a_reshard_still_waiting_when_the_next_fault_is_due_is_skipped() -> None:
    target = FakeTarget(reshard_s=1.0)
    faults = [Fault("reshard", "shards:2", 0.0, 0.0), Fault("reshard", "shards:1", 0.1, 0.1),
              Fault("kill", "n1", 0.3, 0.4)]
    events, done, took_s = await nemesis(target, faults)
    assert names(events) == ["reshard-start shards:2", "reshard-start shards:1",
                             "reshard-stop shards:1", "kill-start n1", "kill-stop n1",
                             "reshard-stop shards:2"]
    skip = events[2]
    assert skip[3] is not None and skip[3].startswith("skipped: the previous reshard")
    assert 0.28 <= skip[0] < 0.4  # it waited until the kill was due
    assert ("inject", "reshard", "shards:1") not in target.calls  # never requested
    assert done[1]["error"].startswith("skipped") and "healed" not in done[1]
    assert took_s >= 0.95


async def test_a_refused_reshard_is_recorded_and_not_waited_for() -> None:
    target = FakeTarget(reshard_s=0.2, refuse={"shards:2"})
    events, done, _ = await nemesis(target, [Fault("reshard", "shards:2", 0.0, 0.0)])
    assert [(f, e) for _, f, _, e in events] == [("reshard-start", None),
                                                  ("reshard-stop", "cannot reshard shards:2")]
    assert ("heal", "reshard", "shards:2") not in target.calls
    assert done == [{"kind": "reshard", "target": "shards:2", "start_s": done[0]["start_s"],
                     "error": "cannot reshard shards:2"}]


async def test_cancelled_it_heals_what_is_active_and_waits_for_the_reshard_in_flight() -> None:
    """The runner cancels the nemesis when the load ends: its heal phase."""
    target = FakeTarget(reshard_s=0.6)
    faults = [Fault("reshard", "shards:2", 0.0, 0.0), Fault("kill", "n1", 0.1, 5.0),
              Fault("reshard", "shards:1", 5.5, 5.5)]
    events, done, took_s = await nemesis(target, faults, cancel_after_s=0.3)
    assert names(events) == ["reshard-start shards:2", "kill-start n1", "kill-stop n1",
                             "reshard-stop shards:2"]
    assert events[2][0] < 0.45 and events[3][0] >= 0.55
    assert 0.55 <= took_s < 2.0
    kill = next(d for d in done if d["kind"] == "kill")
    assert kill["healed_at_end"] is True


class _Register:
    """A client of one in-memory register per key (always ok)."""

    def __init__(self, store: dict[str | None, Any]) -> None:
        self.store = store

    async def invoke(self, op: Op) -> Completion:
        await trio.sleep(0.001)
        if op.f == "read":
            return Completion("ok", self.store.get(op.key))
        if op.f == "write":
            self.store[op.key] = op.value
            return Completion("ok", op.value)
        expected, new = op.value
        if self.store.get(op.key) != expected:
            return Completion("fail")
        self.store[op.key] = new
        return Completion("ok", [expected, new])


class CrashingTarget(FakeTarget):
    """Serves a register; its kill fault crashes (a harness bug, not a FaultError)."""

    def __init__(self) -> None:
        super().__init__(reshard_s=0.1)
        self.store: dict[str | None, Any] = {}

    @asynccontextmanager
    async def _client(self) -> AsyncIterator[Client]:
        yield _Register(self.store)

    def client(self, process: int) -> AbstractAsyncContextManager[Client]:
        return self._client()

    def nemesis_targets(self) -> dict[str, list[str]]:
        return {"kill": ["n1"]}

    def inject(self, kind: str, target: str) -> str:
        raise RuntimeError("the nemesis broke")


def _messages(exc: BaseException) -> list[str]:
    if isinstance(exc, BaseExceptionGroup):
        return [m for inner in exc.exceptions for m in _messages(inner)]
    return [str(exc)]


def test_a_run_that_crashes_keeps_the_history_so_far(tmp_path: Path) -> None:
    config = RunConfig(nemeses=("kill",), time_limit_s=4.0, concurrency=2, rate_per_s=100,
                       quiet_s=0.0, fault_gap_s=(0.5, 0.5))
    with pytest.raises(BaseException) as raised:  # (trio may wrap it in a group)
        run(CrashingTarget(), config, tmp_path / "out")
    assert "the nemesis broke" in _messages(raised.value)
    lines = (tmp_path / "out" / "history.jsonl").read_text().splitlines()
    assert any('"kill-start"' in line for line in lines)
    assert sum('"invoke"' in line for line in lines) > 5
    assert not (tmp_path / "out" / "result.json").exists()


def test_the_run_command_exits_2_not_1_when_the_run_fails(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """Exit 1 means "not linearizable": a harness failure must not say that."""
    def broken(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise RuntimeError("the harness broke")

    monkeypatch.setattr(cli_module, "_run_raftkv", broken)
    result = CliRunner().invoke(cli_module.cli, ["run", "--out", str(tmp_path / "o"),
                                                 "--nemesis", "none"])
    assert result.exit_code == 2, result.output
    assert "the run failed before a verdict (unknown, never a pass)" in result.output

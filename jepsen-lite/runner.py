"""A run: clients and nemesis against a target, one history, a verdict.

Phases, all recorded in one history (``history.jsonl``):

1. **load**: ``concurrency`` client loops, each one logical process with one
   operation at a time, at about ``rate_per_s`` operations per second in all,
   while the nemesis injects and heals faults on its schedule. A process whose
   operation ends ``info`` (outcome unknown) never runs another one: the loop
   continues as a new process (number + concurrency), as Jepsen does;
2. **heal**: every fault still active is healed, and the background faults
   in flight (a reshard) are waited for (the target bounds the wait);
3. **quiet**: ``quiet_s`` with no load, so the system recovers;
4. **final reads**: a read of every register key (register workload) or of
   the whole set (set workload), retried until one succeeds;
5. **check**: the WGL checker (model cas-register) or the set checker.

Only ``execute`` does I/O through the target; ``check_events`` is pure.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from jepsen_lite.checker import Verdict, check, model_for
from jepsen_lite.cli import render  # the text ``jepsen-lite check`` prints
from jepsen_lite.history import Event, format_jsonl, freeze, pair_operations
from jepsen_lite.nemesis import run_nemesis, schedule
from jepsen_lite.report import summarize, write_plots
from jepsen_lite.target import Client, Completion, Op, Target
from jepsen_lite.workload import RegisterWorkload, SetWorkload, check_set

log = logging.getLogger(__name__)

EXIT_CODES = {"linearizable": 0, "not-linearizable": 1, "unknown": 2}


@dataclass(frozen=True)
class RunConfig:
    workload: str = "register"
    nemeses: tuple[str, ...] = ()
    time_limit_s: float = 30.0
    concurrency: int = 8
    seed: int = 0
    rate_per_s: float = 200.0
    op_timeout_s: float = 5.0
    quiet_s: float = 3.0
    final_read_budget_s: float = 30.0
    check_timeout_s: float = 60.0
    fault_gap_s: tuple[float, float] = (1.0, 3.0)
    fault_hold_s: tuple[float, float] = (2.0, 4.0)


@dataclass
class Recorder:
    """The history being written, in real-time order (one trio thread appends)."""

    events: list[Event] = field(default_factory=list)
    t0_ns: int = field(default_factory=time.monotonic_ns)

    def client(self, type_: str, process: int, op: Op, value: Any,
               error: str | None = None) -> None:
        self.events.append(Event(type_, process, op.f, op.key,  # type: ignore[arg-type]
                                 freeze(value), time.monotonic_ns() - self.t0_ns, error))

    def nemesis(self, f: str, value: Any, error: str | None) -> None:
        self.events.append(Event("info", "nemesis", f, None, value,
                                 time.monotonic_ns() - self.t0_ns, error))


def _invoke_value(op: Op) -> Any:
    if op.f == "cas":
        return list(op.value)
    if op.f in ("read", "read-set"):
        return None
    return op.value


async def _run_op(client: Client, op: Op, process: int, recorder: Recorder, *,
                  timeout_s: float) -> Completion:
    recorder.client("invoke", process, op, _invoke_value(op))
    completion = Completion("info", error="the client failed while the operation was open")
    try:
        completion = Completion("info", error="timeout")
        with trio.move_on_after(timeout_s):
            try:
                completion = await client.invoke(op)
            except Exception as exc:  # a client bug must not end the run: outcome unknown
                log.warning("client error on %s: %r", op, exc)
                completion = Completion("info", error=f"client error: {exc!r}")
    finally:  # also when the client's own tasks fail or the run is cancelled
        value = completion.value if op.f in ("read", "read-set") and completion.type == "ok" \
            else _invoke_value(op)
        recorder.client(completion.type, process, op, value, completion.error)
    return completion


async def _worker(worker: int, target: Target, workload: Any, *, rng: random.Random,
                  recorder: Recorder, end: float, config: RunConfig) -> None:
    process = worker
    mean_gap_s = config.concurrency / config.rate_per_s
    while trio.current_time() < end:
        try:
            async with target.client(process) as client:
                while trio.current_time() < end:
                    completion = await _run_op(client, workload.next_op(rng), process,
                                               recorder, timeout_s=config.op_timeout_s)
                    if completion.type == "info":
                        process += config.concurrency
                        break  # a new process gets a new client
                    await trio.sleep(rng.uniform(0, 2 * mean_gap_s))
        except Exception as exc:  # opening (or running) a client can fail during faults
            log.info("worker %d: client failed: %r", worker, exc)
            process += config.concurrency  # its last operation may have ended info
            await trio.sleep(0.2)


async def _final_read(target: Target, op: Op, process: int, recorder: Recorder,
                      config: RunConfig) -> bool:
    deadline = trio.current_time() + config.final_read_budget_s
    while trio.current_time() < deadline:
        try:
            async with target.client(process) as client:
                completion = await _run_op(client, op, process, recorder,
                                           timeout_s=config.op_timeout_s)
                if completion.type == "ok":
                    return True
        except Exception as exc:
            log.info("final read: client failed: %r", exc)
        process += 1
        await trio.sleep(0.2)
    return False


async def execute(target: Target, config: RunConfig, recorder: Recorder,
                  faults_done: list[dict[str, Any]]) -> None:
    """The load, heal, quiet and final-read phases."""
    workload: Any = RegisterWorkload() if config.workload == "register" else SetWorkload()
    faults = schedule(list(config.nemeses), target.nemesis_targets(), config.time_limit_s,
                      random.Random(config.seed + 1), gap_s=config.fault_gap_s,
                      hold_s=config.fault_hold_s)
    start = trio.current_time()
    end = start + config.time_limit_s
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_nemesis, target, faults, start, recorder.nemesis, faults_done)
        async with trio.open_nursery() as clients:
            for worker in range(config.concurrency):
                clients.start_soon(functools.partial(
                    _worker, worker, target, workload,
                    rng=random.Random(config.seed * 1000 + worker), recorder=recorder, end=end,
                    config=config))
        nursery.cancel_scope.cancel()  # the nemesis heals what is still active
    await trio.sleep(config.quiet_s)
    final_process = 1_000_000
    if isinstance(workload, RegisterWorkload):
        for key in workload.keys():  # noqa: SIM118 - a method, not a dict
            await _final_read(target, Op("read", key), final_process, recorder, config)
            final_process += 1000
    else:
        await _final_read(target, Op("read-set", None), final_process, recorder, config)


@dataclass(frozen=True)
class CheckOutcome:
    verdict: str
    details: dict[str, Any]


def check_events(events: list[Event], workload: str, timeout_s: float) -> CheckOutcome:
    """The verdict for a recorded history (pure)."""
    started = time.monotonic()
    if workload == "set":
        result = check_set(events)
        verdict = {True: "linearizable", False: "not-linearizable", None: "unknown"}[
            result.valid]
        return CheckOutcome(verdict, {"checker": "set", **result.to_json(),
                                      "elapsed_s": round(time.monotonic() - started, 3)})
    ops = pair_operations(events)
    model = model_for(ops, name="cas-register")
    wgl = check(ops, model, timeout_s=timeout_s)
    details: dict[str, Any] = {
        "checker": "wgl", "model": "cas-register", "partitions": wgl.partitions,
        "ops_checked": wgl.ops_checked, "elapsed_s": round(time.monotonic() - started, 3)}
    if wgl.verdict is Verdict.UNKNOWN:
        details["reason"] = wgl.reason
        details["unresolved_keys"] = [str(k) for k in wgl.unresolved]
    if wgl.counterexample is not None:
        details["report"] = render(wgl, model, "jsonl", time.monotonic() - started, 8)
    return CheckOutcome(wgl.verdict.value, details)


def _write_history(out_dir: Path, recorder: Recorder) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "history.jsonl").write_text(
        "".join(line + "\n" for line in format_jsonl(recorder.events)))


def write_outputs(out_dir: Path, recorder: Recorder, outcome: CheckOutcome,
                  header: dict[str, Any], faults_done: list[dict[str, Any]]) -> dict[str, Any]:
    """history.jsonl, result.json and the plots; returns the result."""
    _write_history(out_dir, recorder)
    result: dict[str, Any] = {"verdict": outcome.verdict, **header,
                              **summarize(recorder.events),
                              "faults": faults_done, "check": outcome.details}
    files = ["history.jsonl", "result.json"]
    try:
        files += [p.name for p in write_plots(recorder.events, out_dir,
                                              f"{header.get('target')} {header.get('workload')}")]
    except Exception as exc:  # a plot must not hide the verdict
        log.warning("plots failed: %r", exc)
        result["plot_error"] = repr(exc)
    result["files"] = files
    (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def run(target: Target, config: RunConfig, out_dir: Path,
        extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Execute, check and write; returns the result (``result["verdict"]``)."""
    recorder = Recorder()
    faults_done: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        trio.run(execute, target, config, recorder, faults_done)
    except BaseException:
        _write_history(out_dir, recorder)  # what was recorded, for the post-mortem
        raise
    ran_s = time.monotonic() - started
    outcome = check_events(recorder.events, config.workload, config.check_timeout_s)
    header = {"target": target.name, **asdict(config), "run_s": round(ran_s, 2),
              **(extra or {}), **target.summary()}
    return write_outputs(out_dir, recorder, outcome, header, faults_done)

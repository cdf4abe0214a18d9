"""The nemesis: when to inject which fault, and the loop that does it.

``schedule`` is pure: from the enabled kinds, what each kind can hit, the
run's length and a seeded ``random.Random``, it lays out faults one after the
other with quiet gaps between them, taking the kinds in turn (a run with
``kill,partition`` kills and partitions alternately) and the targets at
random. One fault at a time keeps
a majority of every group alive, so the run also measures availability; the
linearizability claim holds with any faults.

*Background* kinds (``reshard``) are different: the fault is a request that
goes on by itself (the moves of a reshard) and has nothing to undo. The
schedule gives it no hold time and moves on after a short gap, so the next
kill or partition lands while it is in flight; its targets are taken in turn
(a reshard alternates between two shard counts), not at random.

``run_nemesis`` carries a schedule out against a target, records a
``<kind>-start`` and a ``<kind>-stop`` event for each fault in the history
(process ``"nemesis"``, type ``info``, value the target), and heals whatever
is still active when it is cancelled or the schedule ends. For a background
fault, ``<kind>-stop`` is recorded when the work it started has ended (its
``heal`` returns, in a task of its own), so its window overlaps the faults
after it; a new one of the same kind is started only once the previous one
has ended (it waits until the next fault is due, and is otherwise skipped,
with the reason in its ``-stop`` event), and the nemesis returns only when
every background fault has ended (the target bounds the wait).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from jepsen_lite.target import FaultError, Target

log = logging.getLogger(__name__)

NEMESES = ("kill", "pause", "partition", "manager", "reshard")
# Kinds whose fault goes on by itself once started (see the module docstring).
BACKGROUND = frozenset({"reshard"})
# A background fault that waits for the previous one of its kind, and is the
# last of the schedule, waits at most this long before it is skipped.
BACKGROUND_WAIT_S_MAX = 5.0


@dataclass(frozen=True)
class Fault:
    kind: str
    target: str
    start_s: float
    end_s: float


def parse_nemeses(text: str) -> list[str]:
    """``kill,partition`` -> ["kill", "partition"]; ``none`` or "" -> []."""
    kinds = [k.strip() for k in text.split(",") if k.strip() and k.strip() != "none"]
    unknown = sorted(set(kinds) - set(NEMESES))
    if unknown:
        raise ValueError(f"unknown nemesis {', '.join(unknown)} (known: {', '.join(NEMESES)}, "
                         "none)")
    return list(dict.fromkeys(kinds))


def schedule(kinds: list[str], targets: dict[str, list[str]], time_limit_s: float,
             rng: random.Random, *, gap_s: tuple[float, float] = (1.0, 3.0),
             hold_s: tuple[float, float] = (2.0, 4.0),
             background_gap_s: tuple[float, float] = (0.2, 1.0)) -> list[Fault]:
    """Faults in time order, none overlapping, all ended by ``time_limit_s``.

    A background kind's fault is an instant (``end_s == start_s``), followed
    by a gap drawn from ``background_gap_s``; its targets are used in turn."""
    usable = [k for k in kinds if targets.get(k)]
    faults: list[Fault] = []
    if not usable:
        return faults
    order = list(usable)
    rng.shuffle(order)
    taken: dict[str, int] = {}  # background kind -> faults of it so far
    t = rng.uniform(*gap_s)
    while t + hold_s[0] <= time_limit_s:
        kind = order[len(faults) % len(order)]  # every kind in turn, in a random order
        if kind in BACKGROUND:
            turn = taken.get(kind, 0)
            taken[kind] = turn + 1
            faults.append(Fault(kind, targets[kind][turn % len(targets[kind])], t, t))
            t += rng.uniform(*background_gap_s)
            continue
        target = rng.choice(targets[kind])
        end = min(t + rng.uniform(*hold_s), time_limit_s)
        faults.append(Fault(kind, target, t, end))
        t = end + rng.uniform(*gap_s)
    return faults


async def run_nemesis(target: Target, faults: list[Fault], started_at: float,
                      record: Callable[[str, Any, str | None], None],
                      done: list[dict[str, Any]]) -> None:
    """Inject and heal ``faults`` (times relative to ``started_at``, trio clock).
    ``record(f, value, error)`` writes a nemesis event; ``done`` collects what
    was done, for the report. Cancelled, it heals what is active and waits for
    the background faults in flight to end."""
    active: list[Fault] = []
    async with trio.open_nursery() as nursery:
        background = _Background(target, started_at, record, done, nursery)
        try:
            for i, fault in enumerate(faults):
                await trio.sleep_until(started_at + fault.start_s)
                if fault.kind in BACKGROUND:
                    due = faults[i + 1].start_s if i + 1 < len(faults) else \
                        fault.start_s + BACKGROUND_WAIT_S_MAX
                    await background.start(fault, started_at + due)
                    continue
                entry: dict[str, Any] = {"kind": fault.kind, "target": fault.target,
                                         "start_s": _since(started_at)}
                record(f"{fault.kind}-start", fault.target, None)
                try:
                    entry["did"] = await trio.to_thread.run_sync(target.inject, fault.kind,
                                                                 fault.target)
                except FaultError as exc:
                    entry["error"] = str(exc)
                    record(f"{fault.kind}-stop", fault.target, str(exc))
                    done.append(entry)
                    continue
                active.append(fault)
                await trio.sleep_until(started_at + fault.end_s)
                await _heal(target, fault, record, entry)
                active.remove(fault)
                entry["end_s"] = _since(started_at)
                done.append(entry)
        finally:
            with trio.CancelScope(shield=True):
                for fault in list(active):
                    entry = {"kind": fault.kind, "target": fault.target, "healed_at_end": True}
                    await _heal(target, fault, record, entry)
                    entry["end_s"] = _since(started_at)
                    done.append(entry)
        # (the nursery now waits for the background faults in flight)


def _since(started_at: float) -> float:
    return round(trio.current_time() - started_at, 3)


@dataclass
class _Background:
    """The background faults of one run: the kinds in flight, and the tasks (in
    ``nursery``) that record their ends."""

    target: Target
    started_at: float
    record: Callable[[str, Any, str | None], None]
    done: list[dict[str, Any]]
    nursery: trio.Nursery
    in_flight: dict[str, trio.Event] = field(default_factory=dict)  # set when it ended

    async def start(self, fault: Fault, due: float) -> None:
        """Start ``fault`` once the previous one of its kind has ended (waiting
        until ``due`` at most, else it is skipped), and a task that records
        its end."""
        previous = self.in_flight.get(fault.kind)
        if previous is not None:
            with trio.move_on_at(due):
                await previous.wait()
        entry: dict[str, Any] = {"kind": fault.kind, "target": fault.target,
                                 "start_s": _since(self.started_at)}
        self.done.append(entry)  # (in start order; filled in as it goes)
        self.record(f"{fault.kind}-start", fault.target, None)
        if previous is not None and not previous.is_set():
            entry["error"] = (f"skipped: the previous {fault.kind} had not ended when the "
                              "next fault was due")
            self.record(f"{fault.kind}-stop", fault.target, entry["error"])
            return
        try:
            entry["did"] = await trio.to_thread.run_sync(self.target.inject, fault.kind,
                                                         fault.target)
        except FaultError as exc:
            entry["error"] = str(exc)
            self.record(f"{fault.kind}-stop", fault.target, str(exc))
            return
        ended = self.in_flight[fault.kind] = trio.Event()
        self.nursery.start_soon(self._await_end, fault, entry, ended)

    async def _await_end(self, fault: Fault, entry: dict[str, Any], ended: trio.Event) -> None:
        """Wait (in a thread, not cancellable: the target bounds it) for the
        work the fault started to end, and record its ``-stop``."""
        with trio.CancelScope(shield=True):
            try:
                entry["healed"] = await trio.to_thread.run_sync(self.target.heal, fault.kind,
                                                                fault.target)
                self.record(f"{fault.kind}-stop", fault.target, None)
            except FaultError as exc:
                entry["heal_error"] = str(exc)
                self.record(f"{fault.kind}-stop", fault.target, str(exc))
            entry["end_s"] = _since(self.started_at)
            ended.set()


async def _heal(target: Target, fault: Fault, record: Callable[[str, Any, str | None], None],
                entry: dict[str, Any]) -> None:
    for attempt in range(5):
        try:
            entry["healed"] = await trio.to_thread.run_sync(target.heal, fault.kind,
                                                            fault.target)
            record(f"{fault.kind}-stop", fault.target, None)
            return
        except FaultError as exc:
            log.warning("healing %s %s failed (attempt %d): %s", fault.kind, fault.target,
                        attempt + 1, exc)
            entry["heal_error"] = str(exc)
            await trio.sleep(0.5)
    record(f"{fault.kind}-stop", fault.target, entry.get("heal_error"))

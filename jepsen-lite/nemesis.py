"""The nemesis: when to inject which fault, and the loop that does it.

``schedule`` is pure: from the enabled kinds, what each kind can hit, the
run's length and a seeded ``random.Random``, it lays out faults one after the
other with quiet gaps between them, taking the kinds in turn (a run with
``kill,partition`` kills and partitions alternately) and the targets at
random. One fault at a time keeps
a majority of every group alive, so the run also measures availability; the
linearizability claim holds with any faults.

``run_nemesis`` carries a schedule out against a target, records a
``<kind>-start`` and a ``<kind>-stop`` event for each fault in the history
(process ``"nemesis"``, type ``info``, value the target), and heals whatever
is still active when it is cancelled or the schedule ends.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from jepsen_lite.target import FaultError, Target

log = logging.getLogger(__name__)

NEMESES = ("kill", "pause", "partition", "manager")


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
             hold_s: tuple[float, float] = (2.0, 4.0)) -> list[Fault]:
    """Faults in time order, none overlapping, all ended by ``time_limit_s``."""
    usable = [k for k in kinds if targets.get(k)]
    faults: list[Fault] = []
    if not usable:
        return faults
    order = list(usable)
    rng.shuffle(order)
    t = rng.uniform(*gap_s)
    while t + hold_s[0] <= time_limit_s:
        kind = order[len(faults) % len(order)]  # every kind in turn, in a random order
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
    was done, for the report."""
    active: list[Fault] = []
    try:
        for fault in faults:
            await trio.sleep_until(started_at + fault.start_s)
            entry: dict[str, Any] = {"kind": fault.kind, "target": fault.target,
                                     "start_s": round(trio.current_time() - started_at, 3)}
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
            entry["end_s"] = round(trio.current_time() - started_at, 3)
            done.append(entry)
    finally:
        with trio.CancelScope(shield=True):
            for fault in list(active):
                entry = {"kind": fault.kind, "target": fault.target, "healed_at_end": True}
                await _heal(target, fault, record, entry)
                entry["end_s"] = round(trio.current_time() - started_at, 3)
                done.append(entry)


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

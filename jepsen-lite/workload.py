"""Workloads: which operations the clients run, and the set checker. Pure:
randomness comes from the ``random.Random`` passed in.

**register**: reads, writes and compare-and-sets on a few keys at a time.
Each key takes at most ``ops_per_key`` operations and is then retired for a
fresh one, as Jepsen's independent keys do: the checker's search grows with
the concurrent and indeterminate operations of one key, so short key lives
keep a long run checkable. Written values are unique per run (a counter), so a
read names the write it saw.

**set**: every operation adds a new element (an int); a final read must hold
every element whose add was acknowledged (``ok``), may hold those whose
outcome is unknown (``info``), and must hold nothing else. It finds lost
acknowledged writes, which a register workload (that overwrites) can miss.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from jepsen_lite.history import Event, pair_operations
from jepsen_lite.target import Op

WORKLOADS = ("register", "set")


@dataclass
class RegisterWorkload:
    keys_active: int = 4
    ops_per_key: int = 120
    read_fraction: float = 0.5
    write_fraction: float = 0.25  # the rest are compare-and-sets
    _keys: list[str] = field(default_factory=list)
    _uses: dict[str, int] = field(default_factory=dict)
    _written: dict[str, list[int]] = field(default_factory=dict)
    _next_key: int = 0
    _next_value: int = 1

    def next_op(self, rng: random.Random) -> Op:
        while len(self._keys) < self.keys_active:
            key = f"r{self._next_key}"
            self._next_key += 1
            self._keys.append(key)
            self._uses[key] = 0
            self._written[key] = []
        key = rng.choice(self._keys)
        self._uses[key] += 1
        if self._uses[key] >= self.ops_per_key:
            self._keys.remove(key)  # retired after this operation
        roll = rng.random()
        if roll < self.read_fraction:
            return Op("read", key)
        value = self._next_value
        self._next_value += 1
        written = self._written[key]
        if roll < self.read_fraction + self.write_fraction or not written:
            written.append(value)
            return Op("write", key, value)
        # Compare with a recent value (often the current one), or with absent.
        expected = rng.choice([*written[-3:], None]) if rng.random() < 0.9 else None
        written.append(value)
        return Op("cas", key, (expected, value))

    def keys(self) -> list[str]:
        """Every key used so far (for the final reads)."""
        return list(self._uses)


@dataclass
class SetWorkload:
    _next: int = 0

    def next_op(self, rng: random.Random) -> Op:
        self._next += 1
        return Op("add", None, self._next)


@dataclass(frozen=True)
class SetResult:
    """The set check: ``lost`` acknowledged elements missing from the final
    read, ``unexpected`` elements read that were never added, ``recovered``
    indeterminate adds that did take effect. ``valid`` is None when no final
    read succeeded (the check cannot say)."""

    valid: bool | None
    acknowledged: int
    indeterminate: int
    lost: tuple[int, ...] = ()
    unexpected: tuple[int, ...] = ()
    recovered: int = 0
    final_reads: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"valid": self.valid, "acknowledged": self.acknowledged,
                "indeterminate": self.indeterminate, "lost": list(self.lost),
                "unexpected": list(self.unexpected), "recovered": self.recovered,
                "final_reads": self.final_reads}


def check_set(events: list[Event]) -> SetResult:
    """Every ``ok`` add must be in the last ``ok`` read-set, which may also hold
    ``info`` (or still open) adds and nothing else: not an element whose add
    definitely failed, nor one never added."""
    acked: set[int] = set()
    unknown: set[int] = set()
    final: set[int] | None = None
    reads = 0
    for op in pair_operations(events):
        if op.f == "add":
            if op.status == "ok":
                acked.add(op.value)
            elif op.status == "info":
                unknown.add(op.value)
        elif op.f == "read-set" and op.status == "ok":
            reads += 1
            final = set(op.output or ())
    indeterminate = len(unknown)
    if final is None:
        return SetResult(None, len(acked), indeterminate, final_reads=0)
    lost = tuple(sorted(acked - final))
    # Never added, or added with a definite failure: either way it must not be there.
    unexpected = tuple(sorted(final - acked - unknown))
    attempted = acked | unknown
    return SetResult(not lost and not unexpected, len(acked), indeterminate, lost,
                     unexpected, len((final & attempted) - acked), reads)

"""Simulated data centers and network faults (DESIGN section 8). Pure: no I/O.

A ``FaultSpec`` says what the network between processes looks like right now:
a one-way latency added to every message between two different data centers,
and a set of cut links. A process is named by its id: a node id such as
``"n1"`` or a shard-manager replica id such as ``"m1"``. A cut is an unordered
pair of process ids; a message in either direction between them is lost.

Specs are immutable values. Every change returns a new spec, so a process can
publish the current one by assigning an attribute (an atomic swap) while
other threads keep reading the old one::

    spec = FaultSpec(inter_dc_latency_ms=30.0)
    spec = spec.isolate(["n1"], everyone)               # cut one node off
    spec = spec.isolate(nodes_in_dc1, everyone)          # cut a whole data center
    spec = spec.isolate(["n1", "n2"], ["n1", "n2", "n3", "n4", "n5"])  # minority | majority
    spec = spec.heal()                                   # every link back, latency kept

``link_delay_s`` answers, for one message, whether it is lost and otherwise
how long it is held; the transport calls it per message, so it is cheap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_FIELDS = frozenset({"inter_dc_latency_ms", "cuts"})


FAULTS_NAME = "faults.json"  # in the cluster directory; every process reads it at start

def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def _check_process_id(value: object, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field}: a process id must be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True)
class FaultSpec:
    """The simulated network: inter-DC latency and cut links.

    ``inter_dc_latency_ms`` is the one-way delay, in milliseconds, added to a
    message between processes in different data centers (a round trip costs
    twice that). Processes in the same data center get no added delay.

    ``cuts`` holds unordered pairs of process ids, each stored as a sorted
    tuple; the constructor sorts the pairs it is given. A process cannot be cut
    from itself.

    Raises ``ValueError`` (naming the field) for a negative or non-finite
    latency, or a malformed cut.
    """

    inter_dc_latency_ms: float = 0.0
    cuts: frozenset[tuple[str, str]] = frozenset()

    def __post_init__(self) -> None:
        latency = self.inter_dc_latency_ms
        if (isinstance(latency, bool) or not isinstance(latency, int | float)
                or not math.isfinite(latency) or latency < 0):
            raise ValueError("inter_dc_latency_ms: must be a finite number >= 0, "
                             f"got {latency!r}")
        if not isinstance(self.cuts, frozenset):
            raise ValueError(  # noqa: TRY004 (the contract: ValueError naming the field)
                f"cuts: must be a frozenset of pairs, got {type(self.cuts).__name__}")
        normalized: set[tuple[str, str]] = set()
        for cut in self.cuts:
            if not isinstance(cut, tuple) or len(cut) != 2:
                raise ValueError(f"cuts: each cut must be a pair of process ids, got {cut!r}")
            a = _check_process_id(cut[0], "cuts")
            b = _check_process_id(cut[1], "cuts")
            if a == b:
                raise ValueError(f"cuts: a process cannot be cut from itself ({a!r})")
            normalized.add(_pair(a, b))
        object.__setattr__(self, "inter_dc_latency_ms", float(latency))
        if normalized != self.cuts:
            object.__setattr__(self, "cuts", frozenset(normalized))

    # -- building new specs ---------------------------------------------------------

    def cut_pair(self, a: str, b: str) -> FaultSpec:
        """This spec with the link between ``a`` and ``b`` cut (both directions)."""
        return FaultSpec(self.inter_dc_latency_ms, self.cuts | {_pair(a, b)})

    def isolate(self, members: Iterable[str], everyone: Iterable[str]) -> FaultSpec:
        """This spec with every link between ``members`` and the rest of
        ``everyone`` cut. Links inside ``members``, and inside the rest, are left
        as they are, and so are cuts already in place.

        One call expresses each partition of DESIGN section 8: a single node
        (``members=[node]``), a whole data center (its processes), or a
        minority against a majority (either side)."""
        inside = frozenset(members)
        outside = frozenset(everyone) - inside
        new = {_pair(a, b) for a in inside for b in outside}
        return FaultSpec(self.inter_dc_latency_ms, self.cuts | new)

    def heal(self) -> FaultSpec:
        """This spec with no cut links; the latency stays."""
        return FaultSpec(self.inter_dc_latency_ms, frozenset())

    def with_latency(self, ms: float) -> FaultSpec:
        """This spec with a one-way inter-DC latency of ``ms`` milliseconds."""
        return FaultSpec(ms, self.cuts)

    # -- reading -------------------------------------------------------------------------

    def is_cut(self, a: str, b: str) -> bool:
        """Whether the link between ``a`` and ``b`` is cut."""
        return bool(self.cuts) and _pair(a, b) in self.cuts

    def link_delay_s(self, src: str, src_dc: str, dst: str, dst_dc: str) -> float | None:
        """How a message from process ``src`` (in data center ``src_dc``) to
        ``dst`` (in ``dst_dc``) fares: ``None`` if the link is cut (the message
        is lost), otherwise the one-way delay in seconds: the inter-DC latency
        between different data centers, 0.0 within one."""
        if self.cuts and _pair(src, dst) in self.cuts:
            return None
        if src_dc != dst_dc:
            return self.inter_dc_latency_ms / 1000.0
        return 0.0

    # -- JSON ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; cuts are sorted lists, so equal specs give equal JSON."""
        return {
            "inter_dc_latency_ms": self.inter_dc_latency_ms,
            "cuts": [list(cut) for cut in sorted(self.cuts)],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FaultSpec:
        """The spec ``to_json`` produced. Missing fields take their defaults.
        Raises ``ValueError`` naming the field for an unknown field or a bad
        value."""
        if not isinstance(data, Mapping):
            raise ValueError(  # noqa: TRY004 (the contract: ValueError naming the field)
                f"fault spec: must be an object, got {type(data).__name__}")
        for key in data:
            if key not in _FIELDS:
                raise ValueError(f"{key}: unknown field in a fault spec")
        latency = data.get("inter_dc_latency_ms", 0.0)
        if isinstance(latency, bool) or not isinstance(latency, int | float):
            raise ValueError(  # noqa: TRY004 (the contract: ValueError naming the field)
                f"inter_dc_latency_ms: must be a number, got {latency!r}")
        raw_cuts = data.get("cuts", [])
        if not isinstance(raw_cuts, list):
            raise ValueError(  # noqa: TRY004 (the contract: ValueError naming the field)
                f"cuts: must be a list of pairs, got {type(raw_cuts).__name__}")
        cuts: set[tuple[str, str]] = set()
        for cut in raw_cuts:
            if not isinstance(cut, list | tuple) or len(cut) != 2:
                raise ValueError(f"cuts: each cut must be a pair of process ids, got {cut!r}")
            cuts.add((_check_process_id(cut[0], "cuts"), _check_process_id(cut[1], "cuts")))
        return cls(float(latency), frozenset(cuts))

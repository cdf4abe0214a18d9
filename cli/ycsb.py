"""YCSB-style workloads for ``raftkv bench``: pure logic, no I/O.

* the workloads (`WORKLOADS`): the share of reads, the rest being updates of
  existing keys;
* key choosers: `UniformKeys`, and `ZipfianKeys`, YCSB's scrambled zipfian
  (Gray et al.'s generator, theta 0.99, its rank hashed with FNV-1a so the hot
  keys land anywhere in the key range, hence on any shard);
* `OpStream`: one client loop's sequence of (operation, key index), fixed by
  its seed, so both targets of a run see the same operations;
* key names, the compact latency histogram the plots use, one measured
  point's summary, and the raftkv/etcd ratios.

Randomness comes only from the ``random.Random`` passed in.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from raftkv_cli.workload import percentile

READ: Final = "read"
UPDATE: Final = "update"


@dataclass(frozen=True)
class Workload:
    """``read_proportion`` of the operations are reads, the rest updates."""

    name: str
    read_proportion: float
    description: str


WORKLOADS: Final = {
    w.name: w for w in (
        Workload("A", 0.5, "50% reads, 50% updates"),
        Workload("B", 0.95, "95% reads, 5% updates"),
        Workload("C", 1.0, "reads only"),
        Workload("write", 0.0, "updates only"),
    )
}
DISTRIBUTIONS: Final = ("uniform", "zipfian")
TARGETS: Final = ("raftkv", "etcd")

KEY_DIGITS: Final = 10


def key_name(index: int) -> str:
    """``user`` and the zero-padded index: ``user0000000042``."""
    return f"user{index:0{KEY_DIGITS}d}"


# --------------------------------------------------------------------------
# Parsing the comma lists of the command line


def parse_names(text: str, known: Sequence[str], what: str, *, one: bool = False
                ) -> list[str]:
    """``"A,write"`` -> ``["A", "write"]``; ValueError (one line) for an
    unknown or missing name, or more than one when ``one``. Order is kept;
    repeats are dropped."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise ValueError(f"no {what} given (known: {', '.join(known)})")
    if one and len(names) > 1:
        raise ValueError(f"give one {what}, not {len(names)}")
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {what} {name!r} (known: {', '.join(known)})")
    return names


def parse_counts(text: str, what: str) -> list[int]:
    """``"1,64"`` -> ``[1, 64]``; ValueError (one line) unless all are integers >= 1."""
    counts: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            count = int(part)
        except ValueError:
            raise ValueError(f"{what}: {part!r} is not an integer") from None
        if count < 1:
            raise ValueError(f"{what}: {count} is not a positive integer")
        counts.append(count)
    if not counts:
        raise ValueError(f"{what}: no value given")
    return list(dict.fromkeys(counts))


# --------------------------------------------------------------------------
# Key choosers


class KeyChooser(Protocol):
    records: int

    def next(self) -> int:
        """A key index in ``range(records)``."""
        ...


class UniformKeys:
    """Every key equally likely."""

    def __init__(self, records: int, rng: random.Random) -> None:
        if records < 1:
            raise ValueError(f"records must be >= 1, got {records}")
        self.records = records
        self._rng = rng

    def next(self) -> int:
        return self._rng.randrange(self.records)


ZIPFIAN_THETA: Final = 0.99
# YCSB's ScrambledZipfianGenerator draws ranks over 10^10 items, whose zeta
# it has precomputed, and maps a rank to a key by hashing it modulo the key
# count: the same skew for any key count, and no O(n) set-up.
ZIPFIAN_ITEMS: Final = 10_000_000_000
ZIPFIAN_ZETA_ITEMS: Final = 26.46902820178302
_FNV_OFFSET_64: Final = 0xCBF29CE484222325
_FNV_PRIME_64: Final = 1099511628211
_MASK_64: Final = (1 << 64) - 1


def zeta(n: int, theta: float) -> float:
    """sum over i in 1..n of 1 / i**theta."""
    return math.fsum(1.0 / float(i) ** theta for i in range(1, n + 1))


def fnv1a_64(value: int) -> int:
    """YCSB's ``Utils.fnvhash64``: FNV-1a over the 8 bytes of ``value``
    (low byte first), as a non-negative Java long."""
    h = _FNV_OFFSET_64
    for _ in range(8):
        h ^= value & 0xFF
        h = (h * _FNV_PRIME_64) & _MASK_64
        value >>= 8
    signed = h - (1 << 64) if h >= 1 << 63 else h
    return abs(signed)


class ZipfianRanks:
    """Gray et al., "Quickly generating billion-record synthetic databases"
    (SIGMOD 1994), as in YCSB's ZipfianGenerator: rank 0 is the most popular,
    rank r is drawn with probability proportional to 1 / (r+1)**theta."""

    def __init__(self, items: int, rng: random.Random, theta: float = ZIPFIAN_THETA,
                 zeta_items: float | None = None) -> None:
        self.items = items
        self.theta = theta
        self._rng = rng
        self._zetan = zeta(items, theta) if zeta_items is None else zeta_items
        self._alpha = 1.0 / (1.0 - theta)
        self._eta = ((1.0 - (2.0 / items) ** (1.0 - theta))
                     / (1.0 - zeta(2, theta) / self._zetan))
        self._half_pow_theta = 1.0 + 0.5 ** theta

    def next(self) -> int:
        u = self._rng.random()
        uz = u * self._zetan
        if uz < 1.0:
            return 0
        if uz < self._half_pow_theta:
            return 1
        return min(self.items - 1,
                   int(self.items * (self._eta * u - self._eta + 1.0) ** self._alpha))


class ZipfianKeys:
    """YCSB's scrambled zipfian: a zipfian rank over 10^10 items, hashed
    (FNV-1a) modulo ``records``. A few keys are hot, and they are spread over
    the key range, so over shards."""

    def __init__(self, records: int, rng: random.Random) -> None:
        if records < 1:
            raise ValueError(f"records must be >= 1, got {records}")
        self.records = records
        self._ranks = ZipfianRanks(ZIPFIAN_ITEMS, rng, zeta_items=ZIPFIAN_ZETA_ITEMS)

    def next(self) -> int:
        return fnv1a_64(self._ranks.next()) % self.records


def make_chooser(distribution: str, records: int, rng: random.Random) -> KeyChooser:
    if distribution == "uniform":
        return UniformKeys(records, rng)
    if distribution == "zipfian":
        return ZipfianKeys(records, rng)
    raise ValueError(f"unknown distribution {distribution!r} (known: {', '.join(DISTRIBUTIONS)})")


class OpStream:
    """One client loop's operations: (READ or UPDATE, key index), a pure
    function of (workload, distribution, records, seed)."""

    def __init__(self, workload: Workload, distribution: str, records: int, seed: int) -> None:
        self._rng = random.Random(seed)  # noqa: S311 (a benchmark, nothing secret)
        self._keys = make_chooser(distribution, records, self._rng)
        self._read_proportion = workload.read_proportion

    def next(self) -> tuple[str, int]:
        op = READ if self._rng.random() < self._read_proportion else UPDATE
        return op, self._keys.next()


def client_seed(seed: int, client: int) -> int:
    """The seed of client loop ``client`` in a run seeded with ``seed``."""
    return seed * 1_000_003 + client


# --------------------------------------------------------------------------
# Latency: a compact histogram, and one point's summary


# Bucket i holds latencies in (BASE * RATIO**(i-1), BASE * RATIO**i]:
# 1 us resolution floor, 8 buckets per doubling (about 9 % wide).
HISTOGRAM_BASE_MS: Final = 0.001
HISTOGRAM_BUCKETS_PER_DOUBLING: Final = 8


def histogram(latencies_ms: Iterable[float]) -> dict[str, Any]:
    """A compact log-bucketed histogram: ``{"buckets_per_doubling": 8,
    "buckets": [[upper_ms, count], ...]}``, empty buckets left out,
    ascending. Every latency is at most its bucket's upper bound (rounded up
    to the nanosecond), and more than 1/2**(1/8) of it."""
    counts: dict[int, int] = {}
    scale = HISTOGRAM_BUCKETS_PER_DOUBLING
    for ms in latencies_ms:
        i = 0 if ms <= HISTOGRAM_BASE_MS else math.ceil(math.log2(ms / HISTOGRAM_BASE_MS) * scale)
        while bucket_upper_ms(i) < ms:  # float rounding at a bucket edge
            i += 1
        counts[i] = counts.get(i, 0) + 1
    return {
        "buckets_per_doubling": scale,
        "buckets": [[math.ceil(bucket_upper_ms(i) * 1e6) / 1e6, counts[i]]
                    for i in sorted(counts)],
    }


def bucket_upper_ms(index: int) -> float:
    return float(HISTOGRAM_BASE_MS * 2.0 ** (index / HISTOGRAM_BUCKETS_PER_DOUBLING))


def cdf(hist: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(upper bound in ms, fraction of operations at or below it) per bucket."""
    buckets = hist.get("buckets") or []
    total = sum(count for _, count in buckets)
    xs: list[float] = []
    ys: list[float] = []
    seen = 0
    for upper, count in buckets:
        seen += count
        xs.append(float(upper))
        ys.append(seen / total)
    return xs, ys


def summarize(latencies_s: Sequence[float], errors: dict[str, int], elapsed_s: float,
              cpu_s: float) -> dict[str, Any]:
    """One measured point: throughput, p50/p99/p99.9, errors by kind, the load
    generator's CPU (percent of one core, and per operation), and the histogram."""
    ordered = sorted(latencies_s)
    ms = [s * 1000.0 for s in ordered]

    def pct(q: float) -> float | None:
        value = percentile(ms, q)
        return None if math.isnan(value) else round(value, 3)

    return {
        "ops": len(ordered),
        "ops_per_s": round(len(ordered) / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "p999_ms": pct(0.999),
        "errors": sum(errors.values()),
        "error_kinds": dict(sorted(errors.items())),
        "elapsed_s": round(elapsed_s, 3),
        "loadgen_cpu_pct": round(100.0 * cpu_s / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "loadgen_cpu_ms_per_op": round(1000.0 * cpu_s / len(ordered), 4) if ordered else None,
        "histogram": histogram(ms),
    }


# --------------------------------------------------------------------------
# raftkv / etcd


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def ratios(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """raftkv / etcd for each raftkv point that has an etcd point with the
    same workload and client count (one per raftkv physical-shard count):
    above 1 means raftkv is faster (ops/s) or slower (latencies)."""
    results = list(results)
    etcd = {(r["workload"], r["clients"]): r for r in results if r["target"] == "etcd"}
    out = []
    for r in results:
        e = etcd.get((r["workload"], r["clients"]))
        if r["target"] != "raftkv" or e is None:
            continue
        out.append({
            "workload": r["workload"], "clients": r["clients"],
            "physical_shards": r.get("physical_shards"),
            "ops_per_s": _ratio(r["ops_per_s"], e["ops_per_s"]),
            "p50_ms": _ratio(r["p50_ms"], e["p50_ms"]),
            "p99_ms": _ratio(r["p99_ms"], e["p99_ms"]),
        })
    return out

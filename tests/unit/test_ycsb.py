"""The benchmark's workloads, key choosers, histograms and ratios (pure; no I/O)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv_cli.ycsb import (
    DISTRIBUTIONS,
    READ,
    UPDATE,
    WORKLOADS,
    OpStream,
    UniformKeys,
    ZipfianKeys,
    ZipfianRanks,
    cdf,
    fnv1a_64,
    histogram,
    key_name,
    make_chooser,
    parse_counts,
    parse_names,
    ratios,
    summarize,
    zeta,
)

pytestmark = pytest.mark.timeout(60)

seeds = st.integers(min_value=0, max_value=2**32)
FAST = settings(max_examples=25, deadline=None)


@FAST
@given(name=st.sampled_from(sorted(WORKLOADS)), seed=seeds,
       distribution=st.sampled_from(DISTRIBUTIONS))
def test_read_share_is_the_workloads(name: str, seed: int, distribution: str) -> None:
    workload = WORKLOADS[name]
    stream = OpStream(workload, distribution, 1000, seed)
    n = 4000
    ops = Counter(stream.next()[0] for _ in range(n))
    assert set(ops) <= {READ, UPDATE}
    share = ops[READ] / n
    if workload.read_proportion in (0.0, 1.0):
        assert share == workload.read_proportion  # C: reads only; write: updates only
    else:  # 6 standard deviations of a binomial at p = 0.5 is 0.047
        assert abs(share - workload.read_proportion) < 0.05, (name, share)


def test_the_four_workloads() -> None:
    assert {name: w.read_proportion for name, w in WORKLOADS.items()} == {
        "A": 0.5, "B": 0.95, "C": 1.0, "write": 0.0}


@FAST
@given(records=st.integers(min_value=1, max_value=10**9), seed=seeds,
       distribution=st.sampled_from(DISTRIBUTIONS))
def test_keys_are_always_in_range(records: int, seed: int, distribution: str) -> None:
    chooser = make_chooser(distribution, records, random.Random(seed))
    assert all(0 <= chooser.next() < records for _ in range(300))


@FAST
@given(records=st.integers(min_value=1000, max_value=10**6), seed=seeds)
def test_zipfian_has_hot_keys_uniform_has_none(records: int, seed: int) -> None:
    n = 20_000
    zipf_keys, uniform_keys = (ZipfianKeys(records, random.Random(seed)),
                               UniformKeys(records, random.Random(seed)))
    zipf = Counter(zipf_keys.next() for _ in range(n))
    uniform = Counter(uniform_keys.next() for _ in range(n))
    # YCSB's scrambled zipfian gives its hottest key about 1/zeta(10^10) = 3.8 %
    # of the operations; uniform gives each key 1/records <= 0.1 %.
    assert zipf.most_common(1)[0][1] / n > 0.025
    assert uniform.most_common(1)[0][1] / n < 0.005
    assert zipf.most_common(1)[0][1] > 10 * uniform.most_common(1)[0][1]


def test_hot_keys_are_scrambled_over_the_range() -> None:
    """The hottest keys are not the first ones (they land on different shards)."""
    chooser = ZipfianKeys(10_000, random.Random(7))
    hot = [k for k, _ in Counter(chooser.next() for _ in range(50_000)).most_common(10)]
    assert max(hot) - min(hot) > 1000
    assert sorted(hot) != list(range(10))


def test_gray_generator_draws_the_top_two_ranks_exactly() -> None:
    """Gray et al.'s method is exact for ranks 0 and 1: p(r) = 1/((r+1)^theta zeta(n))."""
    items, n = 50, 200_000
    ranks = ZipfianRanks(items, random.Random(3))
    counts = Counter(ranks.next() for _ in range(n))
    assert set(counts) <= set(range(items))
    for rank in (0, 1):
        expected = 1.0 / ((rank + 1) ** 0.99 * zeta(items, 0.99))
        assert abs(counts[rank] / n - expected) < 0.005, (rank, counts[rank] / n, expected)


@FAST
@given(seed=seeds, name=st.sampled_from(sorted(WORKLOADS)),
       distribution=st.sampled_from(DISTRIBUTIONS))
def test_a_seed_fixes_the_operations(seed: int, name: str, distribution: str) -> None:
    a = OpStream(WORKLOADS[name], distribution, 5000, seed)
    b = OpStream(WORKLOADS[name], distribution, 5000, seed)
    assert [a.next() for _ in range(200)] == [b.next() for _ in range(200)]


@given(value=st.integers(min_value=0, max_value=2**64 - 1))
def test_fnv_hash_is_a_non_negative_java_long(value: int) -> None:
    assert 0 <= fnv1a_64(value) <= 2**63


def test_key_names_are_fixed_width_and_sort_by_index() -> None:
    assert key_name(42) == "user0000000042"
    names = [key_name(i) for i in (0, 9, 10, 99_999, 10**9)]
    assert names == sorted(names)
    assert len({len(n) for n in names}) == 1


latencies = st.lists(st.floats(min_value=1e-6, max_value=60_000.0), min_size=1, max_size=300)


@given(values=latencies)
def test_histogram_buckets_hold_their_latencies(values: list[float]) -> None:
    hist = histogram(values)
    buckets = hist["buckets"]
    assert sum(count for _, count in buckets) == len(values)
    uppers = [upper for upper, _ in buckets]
    assert uppers == sorted(set(uppers))
    width = 2 ** (1 / hist["buckets_per_doubling"])
    for v in values:
        upper = next(u for u in uppers if v <= u)  # the bucket holding v
        assert v > upper / width - 1e-6 or (upper == uppers[0] and v <= 0.001)
    xs, ys = cdf(hist)
    assert xs == uppers and ys == sorted(ys) and ys[-1] == 1.0


@given(values=st.lists(st.floats(min_value=1e-5, max_value=10.0), min_size=1, max_size=300),
       elapsed_s=st.floats(min_value=0.1, max_value=100.0))
def test_a_summary_orders_its_percentiles(values: list[float], elapsed_s: float) -> None:
    s = summarize(values, {"TIMEOUT": 2}, elapsed_s, cpu_s=elapsed_s / 2)
    assert s["ops"] == len(values) and s["errors"] == 2
    assert min(values) * 1000 - 1e-3 <= s["p50_ms"] <= s["p99_ms"] <= s["p999_ms"] \
        <= max(values) * 1000 + 1e-3
    assert math.isclose(s["ops_per_s"], len(values) / elapsed_s, rel_tol=0.01, abs_tol=0.1)
    assert s["loadgen_cpu_pct"] == 50.0


def test_percentiles_of_a_known_point() -> None:
    s = summarize([ms / 1000 for ms in range(1000, 0, -1)], {}, 2.0, 0.5)  # 1..1000 ms
    assert (s["p50_ms"], s["p99_ms"], s["p999_ms"]) == (501.0, 991.0, 1000.0)
    assert (s["ops_per_s"], s["loadgen_cpu_pct"], s["loadgen_cpu_ms_per_op"]) == (500.0, 25.0, 0.5)


def test_an_empty_point_has_no_percentiles() -> None:
    s = summarize([], {"UNAVAILABLE": 3}, 1.0, 0.1)
    assert s["ops"] == 0 and s["p50_ms"] is None and s["p99_ms"] is None
    assert s["loadgen_cpu_ms_per_op"] is None and s["histogram"]["buckets"] == []


def point(target: str, workload: str, clients: int, ops: float, p99: float,
          shards: int | None = None) -> dict[str, object]:
    return {"target": target, "workload": workload, "clients": clients, "ops_per_s": ops,
            "p50_ms": p99 / 2, "p99_ms": p99, "physical_shards": shards}


def test_ratios_pair_points_of_the_same_workload_and_clients() -> None:
    results = [
        point("raftkv", "A", 64, 6000.0, 30.0, 1), point("raftkv", "A", 64, 3000.0, 60.0, 8),
        point("raftkv", "C", 64, 8000.0, 20.0, 1), point("etcd", "A", 64, 5000.0, 20.0),
        point("etcd", "A", 1, 1000.0, 2.0), point("etcd", "C", 64, 0.0, 20.0),
    ]
    assert ratios(results) == [
        {"workload": "A", "clients": 64, "physical_shards": 1,
         "ops_per_s": 1.2, "p50_ms": 1.5, "p99_ms": 1.5},
        {"workload": "A", "clients": 64, "physical_shards": 8,
         "ops_per_s": 0.6, "p50_ms": 3.0, "p99_ms": 3.0},
        {"workload": "C", "clients": 64, "physical_shards": 1,
         "ops_per_s": None, "p50_ms": 1.0, "p99_ms": 1.0},
    ]
    assert ratios([r for r in results if r["target"] == "raftkv"]) == []


def test_command_line_lists() -> None:
    assert parse_names("write, A,A", list(WORKLOADS), "workload") == ["write", "A"]
    assert parse_counts("1,64,1", "--clients") == [1, 64]
    for text, known, message in (("A,X", list(WORKLOADS), "unknown workload 'X'"),
                                 ("", list(WORKLOADS), "no workload given")):
        with pytest.raises(ValueError, match=message):
            parse_names(text, known, "workload")
    with pytest.raises(ValueError, match="give one distribution"):
        parse_names("uniform,zipfian", DISTRIBUTIONS, "distribution", one=True)
    for text, message in (("0", "0 is not a positive"), ("2,x", "'x' is not an integer"),
                          (",", "no value given")):
        with pytest.raises(ValueError, match=message):
            parse_counts(text, "--clients")

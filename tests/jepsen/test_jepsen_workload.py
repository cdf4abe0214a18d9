"""The pure parts of a run: workloads, the set checker, the nemesis schedule,
and checking a recorded history."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jepsen_lite.history import Event, freeze
from jepsen_lite.nemesis import NEMESES, parse_nemeses, schedule
from jepsen_lite.runner import check_events
from jepsen_lite.workload import RegisterWorkload, SetWorkload, check_set

pytestmark = pytest.mark.timeout(60)


def history(*ops: tuple[int, str, str | None, Any, str, Any]) -> list[Event]:
    """(process, f, key, invoke value, outcome, completion value) each, run one after another."""
    events = []
    for process, f, key, value, outcome, result in ops:
        events.append(Event("invoke", process, f, key, freeze(value)))
        events.append(Event(outcome, process, f, key, freeze(result)))  # type: ignore[arg-type]
    return events


@given(seed=st.integers(0, 10_000), n=st.integers(1, 2000))
def test_register_values_are_unique_and_keys_retire(seed: int, n: int) -> None:
    workload = RegisterWorkload(keys_active=3, ops_per_key=50)
    rng = random.Random(seed)
    ops = [workload.next_op(rng) for _ in range(n)]
    written = [op.value if op.f == "write" else op.value[1] for op in ops if op.f != "read"]
    assert len(written) == len(set(written))
    per_key: dict[str, int] = {}
    for op in ops:
        assert op.f in ("read", "write", "cas")
        per_key[op.key] = per_key.get(op.key, 0) + 1  # type: ignore[index]
    assert max(per_key.values()) <= 50
    assert set(per_key) <= set(workload.keys())  # (keys made ready may be unused yet)
    for op in ops:
        if op.f == "cas":
            assert op.value[0] is None or op.value[0] < op.value[1]


def test_set_elements_are_new_each_time() -> None:
    workload = SetWorkload()
    rng = random.Random(1)
    assert [workload.next_op(rng).value for _ in range(5)] == [1, 2, 3, 4, 5]


def test_the_set_check_finds_lost_and_phantom_elements() -> None:
    base = [(0, "add", None, 1, "ok", 1), (1, "add", None, 2, "info", None),
            (2, "add", None, 3, "fail", 3), (0, "add", None, 4, "ok", 4)]
    good = check_set(history(*base, (5, "read-set", None, None, "ok", [1, 2, 4])))
    assert good.valid is True and good.recovered == 1 and good.indeterminate == 1
    lost = check_set(history(*base, (5, "read-set", None, None, "ok", [1, 2])))
    assert lost.valid is False and lost.lost == (4,)
    phantom = check_set(history(*base, (5, "read-set", None, None, "ok", [1, 3, 4, 9])))
    assert phantom.valid is False and phantom.unexpected == (3, 9)
    assert check_set(history(*base)).valid is None  # no final read: cannot say
    assert check_set(history(*base, (5, "read-set", None, None, "info", None))).valid is None


def test_check_events_gives_the_three_verdicts() -> None:
    ok = history((0, "write", "a", 1, "ok", 1), (1, "read", "a", None, "ok", 1),
                 (0, "cas", "a", [1, 2], "ok", [1, 2]), (1, "read", "a", None, "ok", 2))
    assert check_events(ok, "register", 10).verdict == "linearizable"
    stale = history((0, "write", "a", 1, "ok", 1), (0, "write", "a", 2, "ok", 2),
                    (1, "read", "a", None, "ok", 1))
    bad = check_events(stale, "register", 10)
    assert bad.verdict == "not-linearizable"
    assert any('"a"' in line for line in bad.details["report"])
    assert check_events(history((0, "add", None, 1, "ok", 1)), "set", 10).verdict == "unknown"


def test_nemesis_names_are_checked() -> None:
    assert parse_nemeses("kill, partition,kill") == ["kill", "partition"]
    assert parse_nemeses("none") == []
    with pytest.raises(ValueError, match="unknown nemesis chaos"):
        parse_nemeses("kill,chaos")


@given(seed=st.integers(0, 10_000), limit=st.floats(1, 120),
       kinds=st.lists(st.sampled_from(NEMESES), unique=True, max_size=4))
def test_the_schedule_never_overlaps_and_ends_in_time(seed: int, limit: float,
                                                      kinds: list[str]) -> None:
    targets = {"kill": ["n1", "n2"], "pause": ["n3"], "partition": ["node:n1"]}  # no manager
    faults = schedule(kinds, targets, limit, random.Random(seed))
    usable = {k for k in kinds if k in targets}
    assert all(f.kind in usable and f.target in targets[f.kind] for f in faults)
    for fault in faults:
        assert 0 < fault.start_s < fault.end_s <= limit
    for before, after in itertools.pairwise(faults):
        assert before.end_s < after.start_s
    if usable and limit >= 8:
        assert faults  # a run of 8 s or more gets at least one fault
    if len(faults) >= len(usable):
        assert {f.kind for f in faults} == usable  # every kind in turn


# What RaftkvTarget.nemesis_targets gives for a cluster of 3 nodes in 3 DCs
# whose keyspace starts on 1 physical shard.
RESHARD_TARGETS = {"kill": ["n1", "n2", "n3"],
                   "partition": ["node:n1", "node:n2", "node:n3", "dc:dc1", "dc:dc2", "dc:dc3"],
                   "reshard": ["shards:2", "shards:1"]}


@given(seed=st.integers(0, 10_000), limit=st.floats(1, 120),
       kinds=st.lists(st.sampled_from(["reshard", "kill", "partition"]), unique=True,
                      min_size=1))
def test_a_reshard_is_an_instant_that_alternates_and_the_next_fault_follows_it_closely(
        seed: int, limit: float, kinds: list[str]) -> None:
    faults = schedule(kinds, RESHARD_TARGETS, limit, random.Random(seed))
    reshards = [f for f in faults if f.kind == "reshard"]
    for fault in reshards:
        assert 0 < fault.start_s == fault.end_s <= limit
    # away from the count at the start, back, away again...
    assert [f.target for f in reshards] == [("shards:2", "shards:1")[i % 2]
                                            for i in range(len(reshards))]
    for before, after in itertools.pairwise(faults):
        if before.kind == "reshard":  # the next fault lands while the moves are in flight
            assert 0.2 <= after.start_s - before.end_s <= 1.0
        else:
            assert before.end_s < after.start_s
    for fault in faults:
        if fault.kind != "reshard":
            assert 0 < fault.start_s < fault.end_s <= limit
            assert fault.target in RESHARD_TARGETS[fault.kind]
    if len(faults) >= len(kinds):
        assert {f.kind for f in faults} == set(kinds)


def test_the_ci_runs_schedule_has_three_reshards_each_followed_by_a_kill() -> None:
    """The schedule test_jepsen_reshard.py's CI run gets (seed 4: the runner
    draws with seed + 1): kills land while moves are in flight."""
    faults = schedule(["reshard", "kill", "partition"], RESHARD_TARGETS, 25, random.Random(5))
    kinds = [f.kind for f in faults]
    assert kinds.count("reshard") == 3 and kinds.count("kill") >= 2
    for i, fault in enumerate(faults[:-1]):
        if fault.kind == "reshard":
            assert faults[i + 1].kind == "kill"
            assert faults[i + 1].start_s - fault.start_s < 1.0


def test_reshard_is_a_nemesis_name() -> None:
    assert "reshard" in NEMESES
    assert parse_nemeses("reshard,kill,partition") == ["reshard", "kill", "partition"]

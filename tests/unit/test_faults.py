"""FaultSpec: the simulated network of DESIGN section 8 (pure)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raftkv.faults import FaultSpec

PROCESSES = ["n1", "n2", "n3", "n4", "n5", "m1", "m2", "m3"]

process_ids = st.sampled_from(PROCESSES)
subsets = st.sets(process_ids)
pairs = st.tuples(process_ids, process_ids).filter(lambda p: p[0] != p[1])
specs = st.builds(
    FaultSpec,
    inter_dc_latency_ms=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    cuts=st.frozensets(pairs, max_size=12),
)


def test_fault_spec_defaults_are_a_healthy_network() -> None:
    spec = FaultSpec()
    assert spec.link_delay_s("n1", "dc1", "n2", "dc2") == 0.0
    assert spec.link_delay_s("n1", "dc1", "n2", "dc1") == 0.0
    assert spec.cuts == frozenset()


def test_fault_spec_latency_applies_between_data_centers_only() -> None:
    spec = FaultSpec(inter_dc_latency_ms=30)
    assert spec.link_delay_s("n1", "dc1", "n2", "dc2") == pytest.approx(0.030)
    assert spec.link_delay_s("n1", "dc1", "n3", "dc1") == 0.0
    assert spec.link_delay_s("n1", "dc1", "n1", "dc1") == 0.0


def test_fault_spec_cut_pair_is_unordered_and_keeps_latency() -> None:
    spec = FaultSpec(inter_dc_latency_ms=5).cut_pair("n2", "n1")
    assert spec.cuts == frozenset({("n1", "n2")})
    assert spec.link_delay_s("n1", "dc1", "n2", "dc2") is None
    assert spec.link_delay_s("n2", "dc2", "n1", "dc1") is None
    assert spec.link_delay_s("n1", "dc1", "n3", "dc2") == pytest.approx(0.005)
    assert spec.is_cut("n2", "n1")
    assert not spec.is_cut("n1", "n3")


def test_fault_spec_constructor_sorts_pairs() -> None:
    spec = FaultSpec(cuts=frozenset({("n2", "n1"), ("n1", "n2"), ("m1", "n1")}))
    assert spec.cuts == frozenset({("n1", "n2"), ("m1", "n1")})
    assert spec == FaultSpec(cuts=frozenset({("n1", "n2"), ("m1", "n1")}))


def test_fault_spec_isolate_a_data_center_keeps_links_inside_each_side() -> None:
    dc1, dc2 = ["n1", "n2", "m1"], ["n3", "n4", "m2"]
    spec = FaultSpec().isolate(dc1, dc1 + dc2)
    assert len(spec.cuts) == 9
    for a in dc1:
        for b in dc2:
            assert spec.is_cut(a, b)
    assert not spec.is_cut("n1", "n2")
    assert not spec.is_cut("n3", "m2")


def test_fault_spec_isolate_adds_to_existing_cuts_and_heal_removes_all() -> None:
    spec = FaultSpec(inter_dc_latency_ms=12.5).cut_pair("n4", "n5")
    spec = spec.isolate(["n1"], ["n1", "n2", "n3"])
    assert spec.cuts == frozenset({("n4", "n5"), ("n1", "n2"), ("n1", "n3")})
    healed = spec.heal()
    assert healed.cuts == frozenset()
    assert healed.inter_dc_latency_ms == 12.5


def test_fault_spec_with_latency_keeps_cuts_and_is_a_new_value() -> None:
    spec = FaultSpec().cut_pair("n1", "n2")
    slower = spec.with_latency(40)
    assert slower.inter_dc_latency_ms == 40.0
    assert slower.cuts == spec.cuts
    assert spec.inter_dc_latency_ms == 0.0  # unchanged
    with pytest.raises(AttributeError):
        spec.inter_dc_latency_ms = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"inter_dc_latency_ms": -1.0}, "inter_dc_latency_ms"),
    ({"inter_dc_latency_ms": math.nan}, "inter_dc_latency_ms"),
    ({"inter_dc_latency_ms": math.inf}, "inter_dc_latency_ms"),
    ({"inter_dc_latency_ms": True}, "inter_dc_latency_ms"),
    ({"cuts": frozenset({("n1", "n1")})}, "cuts"),
    ({"cuts": frozenset({("n1", "")})}, "cuts"),
    ({"cuts": frozenset({("n1", "n2", "n3")})}, "cuts"),
    ({"cuts": {("n1", "n2")}}, "cuts"),
])
def test_fault_spec_constructor_rejects_bad_values(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        FaultSpec(**kwargs)


def test_fault_spec_json_shape() -> None:
    spec = FaultSpec(inter_dc_latency_ms=30).cut_pair("n3", "n1").cut_pair("m1", "n2")
    assert spec.to_json() == {"inter_dc_latency_ms": 30.0,
                              "cuts": [["m1", "n2"], ["n1", "n3"]]}
    assert FaultSpec.from_json({}) == FaultSpec()
    assert FaultSpec.from_json({"inter_dc_latency_ms": 7}) == FaultSpec(7.0)


@pytest.mark.parametrize(("data", "field"), [
    ({"inter_dc_latency_ms": "30"}, "inter_dc_latency_ms"),
    ({"inter_dc_latency_ms": None}, "inter_dc_latency_ms"),
    ({"inter_dc_latency_ms": False}, "inter_dc_latency_ms"),
    ({"inter_dc_latency_ms": -0.5}, "inter_dc_latency_ms"),
    ({"cuts": "n1,n2"}, "cuts"),
    ({"cuts": [["n1"]]}, "cuts"),
    ({"cuts": [["n1", 2]]}, "cuts"),
    ({"cuts": [["n1", "n1"]]}, "cuts"),
    ({"cuts": ["n1n2"]}, "cuts"),
    ({"latency": 3}, "latency"),
])
def test_fault_spec_from_json_names_the_bad_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        FaultSpec.from_json(data)


def test_fault_spec_from_json_rejects_a_non_object() -> None:
    with pytest.raises(ValueError, match="fault spec"):
        FaultSpec.from_json([["n1", "n2"]])  # type: ignore[arg-type]


@given(spec=specs, members=subsets, everyone=subsets)
def test_fault_spec_isolate_cuts_exactly_the_crossing_pairs(
        spec: FaultSpec, members: set[str], everyone: set[str]) -> None:
    isolated = spec.isolate(members, everyone)
    assert isolated.inter_dc_latency_ms == spec.inter_dc_latency_ms
    assert spec.cuts <= isolated.cuts
    for a in PROCESSES:
        for b in PROCESSES:
            if a == b:
                continue
            crossing = ((a in members and b in everyone - members)
                        or (b in members and a in everyone - members))
            assert isolated.is_cut(a, b) == (crossing or spec.is_cut(a, b))
    assert isolated.heal().cuts == frozenset()
    assert isolated.heal().inter_dc_latency_ms == spec.inter_dc_latency_ms


@given(spec=specs, a=process_ids, b=process_ids, dc_a=st.sampled_from(["dc1", "dc2"]),
       dc_b=st.sampled_from(["dc1", "dc2"]))
def test_fault_spec_links_are_symmetric(spec: FaultSpec, a: str, b: str, dc_a: str,
                                        dc_b: str) -> None:
    there = spec.link_delay_s(a, dc_a, b, dc_b)
    assert there == spec.link_delay_s(b, dc_b, a, dc_a)
    if a != b and spec.is_cut(a, b):
        assert there is None
    else:
        assert there == (spec.inter_dc_latency_ms / 1000 if dc_a != dc_b else 0.0)
    if a != b:
        assert spec.cut_pair(a, b).link_delay_s(b, dc_b, a, dc_a) is None
        assert spec.cut_pair(a, b).heal().link_delay_s(a, dc_a, b, dc_b) is not None


@given(spec=specs)
def test_fault_spec_json_round_trip(spec: FaultSpec) -> None:
    wire = json.loads(json.dumps(spec.to_json()))
    assert FaultSpec.from_json(wire) == spec
    assert FaultSpec.from_json(wire).to_json() == spec.to_json()

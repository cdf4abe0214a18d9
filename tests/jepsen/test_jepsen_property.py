"""Property: on small random histories WGL agrees with a brute-force checker.

The brute force is written here from the definition, independently of the
checker's models: a history is linearizable iff some subset of its
indeterminate operations, together with all its required operations, has an
order that respects real time (if A returned before B was called, A comes
first) and in which every operation is legal for a register.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jepsen_lite.checker import CasRegisterModel, RegisterModel, Verdict, check
from jepsen_lite.history import UNKNOWN, Event, Operation, pair_operations

VALUES = (0, 1, 2)
OPS_MAX = 7


# --- brute force --------------------------------------------------------------


def _apply(state: dict[Any, Any], op: Operation) -> bool:
    """Apply op to the per-key state dict in place; False if it is illegal."""
    cur = state.get(op.key)
    if op.f == "read":
        return op.output is UNKNOWN or cur == op.output
    if op.f == "write":
        state[op.key] = op.value
        return True
    old, new = op.value
    if op.status == "ok":
        if cur != old:
            return False
        state[op.key] = new
        return True
    if op.status == "fail":  # it ran and found the compare false
        return cur != old
    if cur == old:  # indeterminate: conditional
        state[op.key] = new
    return True


def brute_force_linearizable(ops: list[Operation]) -> bool:
    required = [op for op in ops if op.status == "ok" or (op.status == "fail" and op.f == "cas")]
    optional = [op for op in ops if op.status == "info"]
    for r in range(len(optional) + 1):
        for chosen in itertools.combinations(optional, r):
            members = required + list(chosen)
            for order in itertools.permutations(members):
                if not _respects_real_time(order):
                    continue
                state: dict[Any, Any] = {}
                if all(_apply(state, op) for op in order):
                    return True
    return False


def _respects_real_time(order: tuple[Operation, ...]) -> bool:
    for i, a in enumerate(order):
        for b in order[i + 1 :]:
            if b.ret < a.call:  # b finished before a started, yet comes after it
                return False
    return True


# --- random histories -----------------------------------------------------------


@st.composite
def histories(draw: st.DrawFn, with_cas: bool) -> list[Event]:
    """Events of up to OPS_MAX ops by up to 3 concurrent clients, on 1-2 keys."""
    n_ops = draw(st.integers(1, OPS_MAX))
    n_procs = draw(st.integers(1, 3))
    keys = draw(st.sampled_from([(None,), ("a", "b")]))
    functions = ["read", "write", "cas"] if with_cas else ["read", "write"]
    outcomes = ["ok", "ok", "ok", "fail", "info", "open"]
    events: list[Event] = []
    idle = list(range(n_procs))
    next_proc = n_procs
    busy: dict[int, tuple[str, Any, Any, str]] = {}  # process -> (f, key, value, outcome)
    invoked = 0
    while invoked < n_ops or busy:
        can_invoke = invoked < n_ops and bool(idle)
        completable = [p for p, (_, _, _, outcome) in busy.items() if outcome != "open"]
        if not completable and not can_invoke:
            break  # only never-completing ops are left
        if can_invoke and (not completable or draw(st.booleans())):
            proc = idle.pop(draw(st.integers(0, len(idle) - 1)))
            f = draw(st.sampled_from(functions))
            key = draw(st.sampled_from(keys))
            if f == "read":
                value: Any = None
            elif f == "write":
                value = draw(st.sampled_from(VALUES))
            else:
                value = (draw(st.sampled_from(VALUES)), draw(st.sampled_from(VALUES)))
            outcome = draw(st.sampled_from(outcomes))
            busy[proc] = (f, key, value, outcome)
            events.append(Event("invoke", proc, f, key, value))
            invoked += 1
            continue
        proc = draw(st.sampled_from(sorted(completable)))
        f, key, value, outcome = busy.pop(proc)
        if f == "read" and outcome == "ok":
            value = draw(st.sampled_from((None, *VALUES)))
        events.append(Event(outcome, proc, f, key, value))  # type: ignore[arg-type]
        if outcome == "info":  # Jepsen gives the client a new process id
            idle.append(next_proc)
            next_proc += 1
        else:
            idle.append(proc)
    return events


def _agree(events: list[Event], model: RegisterModel | CasRegisterModel) -> None:
    ops = pair_operations(events)
    expected = brute_force_linearizable(ops)
    result = check(ops, model)
    assert result.verdict is not Verdict.UNKNOWN
    assert result.linearizable == expected, (expected, result, events)
    if not expected:
        cx = result.counterexample
        assert cx is not None
        assert cx.blocking.status in ("ok", "fail") and cx.blocking.ret != math.inf
        assert cx.blocking not in cx.prefix


_SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.timeout(120)
@_SETTINGS
@given(histories(with_cas=False))
def test_register_agrees_with_brute_force(events: list[Event]) -> None:
    _agree(events, RegisterModel())


@pytest.mark.timeout(120)
@settings(_SETTINGS, max_examples=1000)
@given(histories(with_cas=True))
def test_cas_register_agrees_with_brute_force(events: list[Event]) -> None:
    _agree(events, CasRegisterModel())


@pytest.mark.timeout(60)
@settings(max_examples=200, deadline=None)
@given(histories(with_cas=True), st.integers(1, 7))
def test_the_slice_size_never_changes_the_verdict(events: list[Event], slice_steps: int) -> None:
    ops = pair_operations(events)
    model = CasRegisterModel()
    assert check(ops, model, slice_steps=slice_steps).verdict is check(ops, model).verdict


def test_brute_force_sees_a_stale_read() -> None:
    events = [
        Event("invoke", 0, "write", None, 1),
        Event("ok", 0, "write", None, 1),
        Event("invoke", 1, "read"),
        Event("ok", 1, "read", None, None),
    ]
    assert not brute_force_linearizable(pair_operations(events))
    assert check(events, RegisterModel()).verdict is Verdict.NOT_LINEARIZABLE

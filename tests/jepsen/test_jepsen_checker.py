"""Checker semantics: info ops, failed ops, nil reads, models, timeouts."""

from __future__ import annotations

from typing import Any

import pytest
from jepsen_support import hard_events

from jepsen_lite.checker import (
    CasRegisterModel,
    KvModel,
    MultiRegisterModel,
    RegisterModel,
    Role,
    UnsupportedOperation,
    Verdict,
    check,
    infer_model_name,
    make_model,
    model_for,
)
from jepsen_lite.history import Event, pair_operations

pytestmark = pytest.mark.timeout(30)


def inv(p: int, f: str, value: Any = None, key: str | None = None) -> Event:
    return Event("invoke", p, f, key, value)


def ok(p: int, f: str, value: Any = None, key: str | None = None) -> Event:
    return Event("ok", p, f, key, value)


def fail(
    p: int, f: str, value: Any = None, key: str | None = None, error: str | None = None
) -> Event:
    return Event("fail", p, f, key, value, error=error)


def info(p: int, f: str, value: Any = None, key: str | None = None) -> Event:
    return Event("info", p, f, key, value)


def verdict(events: list[Event], model: Any = None) -> Verdict:
    return check(events, model or CasRegisterModel()).verdict


LIN = Verdict.LINEARIZABLE
NOT = Verdict.NOT_LINEARIZABLE


# --- info (indeterminate) operations ----------------------------------------------


def test_info_write_may_take_effect() -> None:
    events = [inv(0, "write", 1), info(0, "write", 1), inv(1, "read"), ok(1, "read", 1)]
    assert verdict(events) is LIN


def test_info_write_may_never_take_effect() -> None:
    events = [inv(0, "write", 1), info(0, "write", 1), inv(1, "read"), ok(1, "read", None)]
    assert verdict(events) is LIN


def test_info_write_may_take_effect_late() -> None:
    # Absent, then absent again, then 1: the info write lands between the reads.
    events = [
        inv(0, "write", 1),
        info(0, "write", 1),
        inv(1, "read"),
        ok(1, "read", None),
        inv(1, "read"),
        ok(1, "read", 1),
    ]
    assert verdict(events) is LIN


def test_info_write_cannot_take_effect_before_its_call() -> None:
    events = [inv(1, "read"), ok(1, "read", 1), inv(0, "write", 1), info(0, "write", 1)]
    assert verdict(events) is NOT


def test_info_write_takes_effect_at_most_once() -> None:
    events = [
        inv(0, "write", 1),
        info(0, "write", 1),
        inv(1, "write", 2),
        ok(1, "write", 2),
        inv(1, "read"),
        ok(1, "read", 1),
        inv(1, "read"),
        ok(1, "read", 2),
    ]
    assert verdict(events) is NOT


def test_open_invocation_is_like_info() -> None:
    assert verdict([inv(0, "write", 1), inv(1, "read"), ok(1, "read", 1)]) is LIN
    assert verdict([inv(0, "write", 1), inv(1, "read"), ok(1, "read", None)]) is LIN


def test_info_cas_applies_only_if_the_compare_holds() -> None:
    base = [inv(0, "write", 1), ok(0, "write", 1), inv(1, "cas", (1, 2)), info(1, "cas", (1, 2))]
    assert verdict([*base, inv(2, "read"), ok(2, "read", 2)]) is LIN
    assert verdict([*base, inv(2, "read"), ok(2, "read", 1)]) is LIN
    wrong = [inv(0, "write", 3), ok(0, "write", 3), inv(1, "cas", (1, 2)), info(1, "cas", (1, 2))]
    assert verdict([*wrong, inv(2, "read"), ok(2, "read", 2)]) is NOT


def test_info_reads_are_dropped() -> None:
    events = [inv(0, "read"), info(0, "read", 7)]
    model = CasRegisterModel()
    assert model.role(pair_operations(events)[0]) is Role.DROP
    assert verdict(events) is LIN


# --- failed operations ----------------------------------------------------------------


def test_failed_write_did_not_happen() -> None:
    events = [inv(0, "write", 1), fail(0, "write", 1), inv(1, "read"), ok(1, "read", 1)]
    assert verdict(events) is NOT


def test_failed_cas_is_an_observation() -> None:
    events = [inv(0, "write", 1), ok(0, "write", 1), inv(1, "cas", (1, 2)), fail(1, "cas", (1, 2))]
    assert verdict(events) is NOT  # the state was 1, so the compare could not fail
    assert verdict(events, CasRegisterModel(failed_cas="drop")) is LIN
    concurrent = [
        inv(0, "write", 1),
        inv(1, "cas", (1, 2)),
        ok(0, "write", 1),
        fail(1, "cas", (1, 2)),
    ]
    assert verdict(concurrent) is LIN  # it ran before the write


def test_failed_cas_with_an_error_did_not_run() -> None:
    events = [
        inv(0, "write", 1),
        ok(0, "write", 1),
        inv(1, "cas", (1, 2)),
        fail(1, "cas", (1, 2), error="not-leader"),
    ]
    assert verdict(events) is LIN


# --- nil reads and initial values ------------------------------------------------------


def test_initial_value_is_absent_and_nil_reads_mean_absent() -> None:
    assert verdict([inv(0, "read"), ok(0, "read", None)]) is LIN
    assert verdict([inv(0, "read"), ok(0, "read", 0)]) is NOT
    written = [inv(0, "write", 0), ok(0, "write", 0), inv(1, "read"), ok(1, "read", None)]
    assert verdict(written) is NOT
    assert verdict(written, CasRegisterModel(init=0, read_nil="unconstrained")) is LIN
    assert verdict([inv(0, "read"), ok(0, "read", 0)], CasRegisterModel(init=0)) is LIN


def test_cas_from_absent() -> None:
    events = [inv(0, "cas", (None, 1)), ok(0, "cas", (None, 1)), inv(0, "read"), ok(0, "read", 1)]
    assert verdict(events) is LIN


# --- models ---------------------------------------------------------------------


def test_register_model_rejects_cas_naming_the_line() -> None:
    history = [
        Event("invoke", 0, "cas", None, (1, 2), line=7),
        Event("ok", 0, "cas", None, (1, 2), line=8),
    ]
    with pytest.raises(UnsupportedOperation) as err:
        check(history, RegisterModel())
    assert err.value.line == 7


def test_kv_model_put_get_append_per_key() -> None:
    events = [
        inv(0, "put", "a", "k"),
        ok(0, "put", "a", "k"),
        inv(1, "append", "b", "k"),
        inv(2, "append", "x", "j"),
        ok(1, "append", "b", "k"),
        ok(2, "append", "x", "j"),
        inv(0, "get", None, "k"),
        ok(0, "get", "ab", "k"),
        inv(0, "get", None, "j"),
        ok(0, "get", "x", "j"),
    ]
    result = check(events, KvModel())
    assert result.verdict is LIN and result.partitions == 2
    stale = [*events, inv(3, "get", None, "k"), ok(3, "get", "a", "k")]
    result = check(stale, KvModel())
    assert result.verdict is NOT
    assert result.counterexample is not None and result.counterexample.key == "k"


def test_kv_model_with_porcupine_init() -> None:
    events = [inv(0, "get", None, "k"), ok(0, "get", "", "k")]
    assert verdict(events, KvModel(init="")) is LIN
    assert verdict(events, KvModel()) is NOT


def test_multi_register_txns() -> None:
    model = MultiRegisterModel({"x": 0, "y": 0})
    events = [
        inv(0, "txn", (("write", "x", 1), ("write", "y", 1))),
        inv(1, "txn", (("read", "x", None), ("read", "y", None))),
        ok(0, "txn", (("write", "x", 1), ("write", "y", 1))),
        ok(1, "txn", (("read", "x", 1), ("read", "y", 1))),
    ]
    assert verdict(events, model) is LIN
    torn = [*events[:3], ok(1, "txn", (("read", "x", 1), ("read", "y", 0)))]
    assert verdict(torn, model) is NOT


def test_model_selection() -> None:
    ops = pair_operations([inv(0, "get", None, "k"), ok(0, "get", None, "k")])
    assert infer_model_name(ops) == "kv"
    assert model_for(ops).name == "kv"
    model = model_for(ops, {"model": "kv", "init": ""})
    assert model.init() == ""
    # Hints for another model do not leak into an explicit choice.
    assert model_for(ops, {"model": "kv", "init": ""}, name="register").init() is None
    with pytest.raises(ValueError, match="unknown model"):
        make_model("queue")


# --- results -----------------------------------------------------------------------


def test_empty_history_is_linearizable() -> None:
    result = check([], CasRegisterModel())
    assert result.verdict is LIN and result.partitions == 0


def test_counterexample_names_the_key_and_window() -> None:
    events = [
        inv(0, "write", 1, "a"),
        ok(0, "write", 1, "a"),
        inv(0, "write", 2, "b"),
        ok(0, "write", 2, "b"),
        inv(1, "write", 3, "b"),
        ok(1, "write", 3, "b"),
        inv(1, "read", None, "b"),
        ok(1, "read", 2, "b"),
    ]
    result = check(events, CasRegisterModel())
    assert result.verdict is NOT
    cx = result.counterexample
    assert cx is not None and cx.key == "b"
    assert [op.value for op in cx.prefix] == [2, 3]
    assert cx.state == 3
    assert cx.blocking.f == "read" and cx.blocking.output == 2
    assert [(op.f, illegal) for op, illegal in cx.stuck] == [("read", True)]


# --- timeouts --------------------------------------------------------------------


def test_tiny_timeout_on_a_hard_history_is_unknown() -> None:
    result = check(hard_events(22), CasRegisterModel(), timeout_s=0.05)
    assert result.verdict is Verdict.UNKNOWN and result.reason == "timeout"
    assert result.unresolved == (None,)
    assert not result.linearizable


def test_memo_limit_gives_unknown() -> None:
    result = check(hard_events(22), CasRegisterModel(), cache_entries_max=5000)
    assert result.verdict is Verdict.UNKNOWN and result.reason == "cache-limit"
    assert result.cache_sizes[None] > 5000


def test_timeout_is_checked_with_the_injected_clock() -> None:
    ticks = iter(range(1000))
    result = check(hard_events(22), CasRegisterModel(), timeout_s=3, clock=lambda: next(ticks))
    assert result.verdict is Verdict.UNKNOWN
    assert result.steps <= 4 * 2000


def test_hard_history_is_refuted_without_a_timeout_when_small() -> None:
    assert check(hard_events(8), CasRegisterModel()).verdict is NOT


def test_zero_timeout_never_passes() -> None:
    events = [inv(0, "write", 1), ok(0, "write", 1)]
    assert check(events, CasRegisterModel(), timeout_s=0).verdict is Verdict.UNKNOWN

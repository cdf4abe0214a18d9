"""Linearizability checking: the Wing-Gong-Lowe search, per partition.

`check` takes operations (or events) and a `Model`, splits the operations
into partitions (per key, P-compositionality) and searches each one with WGL:

* The partition's operations become *entries*, a call for each operation and
  a return for each `REQUIRED` one, in history order, in a doubly linked list.
  `OPTIONAL` operations (outcome unknown) have no return entry: nothing
  forces them in, so they may be linearized at any point after their call, or
  never.
* Walking the list, at a call the search tries to linearize that operation
  now; if the model accepts it and the configuration (bitset of linearized
  operations, model state) is new, it lifts the operation out of the list,
  pushes it, and restarts from the head. At a return entry it is stuck (that
  operation had to come before anything later), so it pops the last
  operation, puts it back and tries the next call. The partition is
  linearizable once every required operation is linearized, and not
  linearizable when it is stuck with nothing to pop.

The search is iterative (no recursion) and written as a generator that yields
every ``slice_steps`` steps, so `check` can interleave the partitions,
smallest first, under one deadline: it stops at the first illegal partition
without first finishing a hard one (conformance README, trap 4). A timeout,
or a memo cache grown past ``cache_entries_max``, gives `Verdict.UNKNOWN`,
never a pass.

This module is pure: the clock is a parameter (``clock``), and there is no I/O.
"""

from __future__ import annotations

import enum
import math
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from jepsen_lite.checker.models import ILLEGAL, Model, Role
from jepsen_lite.history import Event, Operation, pair_operations

SLICE_STEPS: Final = 2000
"""Search steps a partition runs before the next one gets its turn."""
CACHE_ENTRIES_MAX: Final = 4_000_000
"""Default bound on memo entries (about 0.5-1 GB), so a hard search cannot exhaust memory."""


class Verdict(enum.Enum):
    LINEARIZABLE = "linearizable"
    NOT_LINEARIZABLE = "not-linearizable"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Counterexample:
    """Where the search for one partition got furthest before failing.

    ``prefix`` is the longest linearizable prefix found (operations in
    linearization order) and ``states`` the model state after each of them;
    ``state`` is the state after the whole prefix. ``blocking`` is the
    required operation that had to be linearized next (its return is the
    earliest one left) and ``stuck`` lists the operations that could have
    come next (called before ``blocking`` returned), each with ``True`` if
    the model rejects it in ``state`` and ``False`` if it is legal there but
    every continuation from it failed.
    """

    key: Any
    prefix: tuple[Operation, ...]
    states: tuple[Any, ...]
    state: Any
    blocking: Operation
    stuck: tuple[tuple[Operation, bool], ...]
    ops_total: int


@dataclass(frozen=True)
class CheckResult:
    """The verdict, with the evidence when it is not linearizable.

    For `Verdict.UNKNOWN`, ``reason`` is ``"timeout"`` or ``"cache-limit"``
    and ``unresolved`` lists the partition keys still being searched.
    ``steps`` counts search steps.
    """

    verdict: Verdict
    partitions: int
    ops_checked: int
    counterexample: Counterexample | None = None
    unresolved: tuple[Any, ...] = ()
    reason: str | None = None
    steps: int = 0
    cache_sizes: dict[Any, int] = field(default_factory=dict, compare=False)

    @property
    def linearizable(self) -> bool:
        return self.verdict is Verdict.LINEARIZABLE


@dataclass
class _Partition:
    key: Any
    ops: list[Operation]
    required: list[bool]
    search: Generator[None, None, Counterexample | None] | None = None
    steps: int = 0
    cache_size: int = 0


def check(
    history: Iterable[Operation] | Iterable[Event],
    model: Model,
    *,
    timeout_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    slice_steps: int = SLICE_STEPS,
    cache_entries_max: int | None = CACHE_ENTRIES_MAX,
) -> CheckResult:
    """Check that ``history`` (operations, or events to pair) is linearizable.

    ``timeout_s`` bounds the whole check (None: no bound), and
    ``cache_entries_max`` the memo entries held at once by the partitions
    being searched (None: no bound; an entry takes roughly 100-300 bytes);
    past either the result is `Verdict.UNKNOWN`. Raises `UnsupportedOperation` (a
    `HistoryError`) if the model does not know an operation.
    """
    items = list(history)
    ops: list[Operation] = (
        pair_operations(items)  # type: ignore[arg-type]
        if items and isinstance(items[0], Event)
        else items  # type: ignore[assignment]
    )
    deadline = math.inf if timeout_s is None else clock() + timeout_s
    parts: list[_Partition] = []
    kept_total = 0
    for key, part_ops in model.partition(ops):
        kept: list[Operation] = []
        required: list[bool] = []
        for op in part_ops:
            model.validate(op)
            role = model.role(op)
            if role is Role.DROP:
                continue
            kept.append(op)
            required.append(role is Role.REQUIRED)
        kept_total += len(kept)
        if any(required):
            parts.append(_Partition(key, kept, required))
    # Smallest first, then round-robin: an easy illegal key is found early
    # even when a large key would take long to refute.
    parts.sort(key=lambda p: len(p.ops))
    for p in parts:
        p.search = _search(p, model, slice_steps)
    active = deque(parts)
    entries_max = math.inf if cache_entries_max is None else cache_entries_max
    while active:
        reason = None
        if clock() >= deadline:
            reason = "timeout"
        elif sum(p.cache_size for p in active) > entries_max:
            reason = "cache-limit"
        if reason is not None:
            return CheckResult(
                Verdict.UNKNOWN,
                len(parts),
                kept_total,
                unresolved=tuple(p.key for p in active),
                reason=reason,
                steps=sum(p.steps for p in parts),
                cache_sizes={p.key: p.cache_size for p in parts},
            )
        part = active.popleft()
        assert part.search is not None
        try:
            next(part.search)
        except StopIteration as stop:
            if stop.value is not None:
                return CheckResult(
                    Verdict.NOT_LINEARIZABLE,
                    len(parts),
                    kept_total,
                    counterexample=stop.value,
                    steps=sum(p.steps for p in parts),
                    cache_sizes={p.key: p.cache_size for p in parts},
                )
            continue
        active.append(part)
    return CheckResult(
        Verdict.LINEARIZABLE,
        len(parts),
        kept_total,
        steps=sum(p.steps for p in parts),
        cache_sizes={p.key: p.cache_size for p in parts},
    )


def _search(  # noqa: PLR0915 - one flat loop, for speed
    part: _Partition, model: Model, slice_steps: int
) -> Generator[None, None, Counterexample | None]:
    """WGL over one partition; returns None if linearizable, else a counterexample."""
    ops = part.ops
    n = len(ops)
    steppers = [model.stepper(op) for op in ops]
    bits = [1 << i for i in range(n)]

    # Entries in history order: (time, 0 call | 1 return, op). Positions are
    # distinct, so a return never ties with a call.
    order: list[tuple[float, int, int]] = []
    for i, op in enumerate(ops):
        order.append((op.call, 0, i))
        if part.required[i]:
            order.append((op.ret, 1, i))
    order.sort()
    count = len(order)
    tail = count + 1
    # Node 0 is the head sentinel, nodes 1..count the entries, tail the end.
    nxt = [*range(1, count + 2), tail]
    prv = [0, *range(count + 1)]
    entry_op = [0] * (count + 2)
    is_call = [False] * (count + 2)
    ret_entry = [0] * n  # 0: no return entry (optional op)
    call_entry = [0] * n
    for e, (_, kind, i) in enumerate(order, start=1):
        entry_op[e] = i
        if kind == 0:
            is_call[e] = True
            call_entry[i] = e
        else:
            ret_entry[i] = e

    init = model.init()
    state: Any = init
    linearized = 0
    remaining = sum(part.required)
    cache: set[tuple[int, Any]] = set()
    add = cache.add
    stack_entry: list[int] = []
    stack_state: list[Any] = []
    best_depth = -1
    best_entries: list[int] = []
    best_block = 0
    illegal = ILLEGAL

    entry = nxt[0]
    budget = slice_steps
    steps = 0
    while True:
        budget -= 1
        if budget == 0:
            steps += slice_steps
            part.steps = steps
            part.cache_size = len(cache)
            yield
            budget = slice_steps
        if is_call[entry]:
            i = entry_op[entry]
            new = steppers[i](state)
            if new is not illegal:
                lin = linearized | bits[i]
                k = (lin, new)
                if k not in cache:
                    add(k)
                    stack_entry.append(entry)
                    stack_state.append(state)
                    state = new
                    linearized = lin
                    p = prv[entry]
                    q = nxt[entry]
                    nxt[p] = q
                    prv[q] = p
                    r = ret_entry[i]
                    if r:
                        p = prv[r]
                        q = nxt[r]
                        nxt[p] = q
                        prv[q] = p
                        remaining -= 1
                        if remaining == 0:
                            part.steps = steps + slice_steps - budget
                            part.cache_size = len(cache)
                            return None
                    entry = nxt[0]
                    continue
            entry = nxt[entry]
            continue
        # A return entry (or the tail): the operation returning here must
        # have been linearized already. Backtrack.
        assert entry != tail, "the tail is unreachable while a required op is left"
        depth = len(stack_entry)
        if depth > best_depth:
            best_depth = depth
            best_entries = stack_entry.copy()
            best_block = entry
        if not depth:
            break
        entry = stack_entry.pop()
        state = stack_state.pop()
        i = entry_op[entry]
        linearized ^= bits[i]
        r = ret_entry[i]
        if r:
            nxt[prv[r]] = r
            prv[nxt[r]] = r
            remaining += 1
        nxt[prv[entry]] = entry
        prv[nxt[entry]] = entry
        entry = nxt[entry]

    part.steps = steps + slice_steps - budget
    part.cache_size = len(cache)
    return _counterexample(
        part,
        init,
        steppers,
        prefix_idx=[entry_op[e] for e in best_entries],
        block_idx=entry_op[best_block],
    )


def _counterexample(
    part: _Partition,
    init: Any,
    steppers: Sequence[Callable[[Any], Any]],
    *,
    prefix_idx: list[int],
    block_idx: int,
) -> Counterexample:
    ops = part.ops
    states = []
    state = init
    for i in prefix_idx:
        state = steppers[i](state)
        assert state is not ILLEGAL, "a recorded prefix replays"
        states.append(state)
    done = set(prefix_idx)
    blocking = ops[block_idx]
    stuck = tuple(
        (op, steppers[i](state) is ILLEGAL)
        for i, op in enumerate(ops)
        if i not in done and op.call < blocking.ret
    )
    return Counterexample(
        key=part.key,
        prefix=tuple(ops[i] for i in prefix_idx),
        states=tuple(states),
        state=state,
        blocking=blocking,
        stuck=stuck,
        ops_total=len(ops),
    )

"""Sequential models for the linearizability checker (porcupine-style).

A model says what a correct single-copy object does:

* `Model.init` is the initial state;
* `Model.step` applies one operation to a state and returns the new state,
  or `ILLEGAL` if the operation's observed result is impossible there;
* `Model.partition` splits a history into independent parts (per key), which
  are checked separately (P-compositionality);
* `Model.role` says how the checker treats an operation given its outcome:
  it `REQUIRED`\\ s it in the linearization, allows it (`OPTIONAL`), or
  `DROP`\\ s it because it can neither change the state nor be refuted.

States are hashable plain values, since the checker memoises on them.

Semantics shared by the register models (DESIGN section 9, conformance
README traps 1-3):

* the initial value is absent (None) unless ``init`` says otherwise;
* an ok read of None means "the key is absent" (``read_nil="absent"``); with
  ``read_nil="unconstrained"`` it means "value unknown" (knossos's reading)
  and is always legal;
* an ok write/CAS/append took effect between its call and its return;
* a failed CAS is an observation (``failed_cas="observe"``, porcupine's etcd
  logs and jepsen-lite's JSONL): it ran and found a value other than ``from``,
  so it is linearized and requires ``state != from``. A failed CAS that
  carries an ``error`` did not run. Other failed ops did not happen and are
  dropped; with ``failed_cas="drop"`` (knossos, where ``:fail`` always means
  "did not happen") failed CASes are dropped too;
* an info (or never completed) write/CAS/append may take effect at any point
  after its call, or never; an indeterminate CAS sets ``to`` only if the state
  is ``from``. Indeterminate reads tell nothing and are dropped.
"""

from __future__ import annotations

import enum
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from typing import Any, ClassVar, Final, Literal

from jepsen_lite.history import UNKNOWN, HistoryError, Operation, thaw

State = Hashable
Stepper = Callable[[Any], Any]
ReadNil = Literal["absent", "unconstrained"]
FailedCas = Literal["observe", "drop"]


class _Illegal:
    __slots__ = ()

    def __repr__(self) -> str:
        return "ILLEGAL"


ILLEGAL: Final = _Illegal()
"""Returned by `Model.step` when an operation cannot happen in a state."""


class Role(enum.Enum):
    REQUIRED = "required"
    """Must be linearized between its call and its return (ok ops, failed CAS)."""
    OPTIONAL = "optional"
    """May be linearized at any point after its call, or never (info ops)."""
    DROP = "drop"
    """Neither changes the state nor can be refuted: left out of the search."""


class UnsupportedOperation(HistoryError):
    """An operation the chosen model does not know (e.g. ``cas`` on ``register``)."""


class Model(ABC):
    """A sequential specification. Subclasses set ``name`` and ``functions``."""

    name: ClassVar[str]
    functions: ClassVar[frozenset[str]]

    @abstractmethod
    def init(self) -> State:
        """The state before any operation."""

    @abstractmethod
    def role(self, op: Operation) -> Role:
        """How the checker treats ``op`` (see `Role`)."""

    @abstractmethod
    def stepper(self, op: Operation) -> Stepper:
        """A function ``state -> new state | ILLEGAL`` for a non-dropped op."""

    def step(self, state: State, op: Operation) -> Any:
        """Apply ``op`` to ``state``: the new state, or `ILLEGAL`."""
        return self.stepper(op)(state)

    def partition(self, ops: Sequence[Operation]) -> list[tuple[Any, list[Operation]]]:
        """Split ``ops`` into independently checkable parts: ``(key, ops)``."""
        return [(None, list(ops))]

    def validate(self, op: Operation) -> None:
        """Raise `UnsupportedOperation` if the model cannot check ``op``."""
        if op.f not in self.functions:
            raise UnsupportedOperation(
                f"model {self.name} does not support f={op.f!r} "
                f"(it supports {', '.join(sorted(self.functions))})",
                op.line,
            )

    def describe_state(self, state: State) -> str:
        if state is None:
            return "absent"
        return json.dumps(thaw(state))


class _RegisterFamily(Model):
    """One value per key; keys are independent registers."""

    def __init__(
        self,
        init: Any = None,
        read_nil: ReadNil = "absent",
        failed_cas: FailedCas = "observe",
    ) -> None:
        if read_nil not in ("absent", "unconstrained"):
            raise ValueError(f"read_nil must be 'absent' or 'unconstrained', not {read_nil!r}")
        if failed_cas not in ("observe", "drop"):
            raise ValueError(f"failed_cas must be 'observe' or 'drop', not {failed_cas!r}")
        self._init: State = init
        self.read_nil = read_nil
        self.failed_cas = failed_cas

    def init(self) -> State:
        return self._init

    def partition(self, ops: Sequence[Operation]) -> list[tuple[Any, list[Operation]]]:
        parts: dict[Any, list[Operation]] = {}
        for op in ops:
            parts.setdefault(op.key, []).append(op)
        return list(parts.items())

    def validate(self, op: Operation) -> None:
        super().validate(op)
        if _kind(op.f) == "cas":
            v = op.value
            if not (isinstance(v, tuple) and len(v) == 2):
                raise UnsupportedOperation(
                    f"cas value must be [from, to], got {thaw(v)!r}", op.line
                )
        elif _kind(op.f) == "append" and not isinstance(op.value, str):
            raise UnsupportedOperation(f"append value must be a string, got {op.value!r}", op.line)

    def role(self, op: Operation) -> Role:
        kind = _kind(op.f)
        if op.status == "ok":
            if kind == "read" and op.output is None and self.read_nil == "unconstrained":
                return Role.DROP
            return Role.REQUIRED
        if op.status == "fail":
            if kind == "cas" and self.failed_cas == "observe" and op.error is None:
                return Role.REQUIRED
            return Role.DROP
        return Role.DROP if kind == "read" else Role.OPTIONAL

    def stepper(self, op: Operation) -> Stepper:
        kind = _kind(op.f)
        if kind == "read":
            want = op.output
            assert want is not UNKNOWN, "unknown-output reads are dropped, never stepped"
            return lambda s: s if s == want else ILLEGAL
        if kind == "write":
            new = op.value
            return lambda s: new
        if kind == "append":
            suffix = op.value
            return lambda s: (
                suffix if s is None else (s + suffix if isinstance(s, str) else ILLEGAL)
            )
        old, new = op.value
        if op.status == "ok":
            return lambda s: new if s == old else ILLEGAL
        if op.status == "fail":
            return lambda s: s if s != old else ILLEGAL
        return lambda s: new if s == old else s


def _kind(f: str) -> str:
    return _KINDS[f]


_KINDS: Final = {
    "read": "read",
    "get": "read",
    "write": "write",
    "put": "write",
    "cas": "cas",
    "append": "append",
    "txn": "txn",
}


class RegisterModel(_RegisterFamily):
    """Per-key register: ``read``, ``write``."""

    name = "register"
    functions = frozenset({"read", "write"})


class CasRegisterModel(_RegisterFamily):
    """Per-key compare-and-set register: ``read``, ``write``, ``cas [from, to]``."""

    name = "cas-register"
    functions = frozenset({"read", "write", "cas"})


class KvModel(_RegisterFamily):
    """Per-key string store: ``get``, ``put``, ``append`` (porcupine's kv model).

    ``append`` to an absent key stores the suffix. ``read``/``write``/``cas``
    are accepted as synonyms of the register operations. Porcupine's kv data
    uses ``init=""`` (a get of an absent key returns ``""``).
    """

    name = "kv"
    functions = frozenset({"get", "put", "append", "read", "write", "cas"})


class MultiRegisterModel(Model):
    """Several named registers changed by atomic transactions (knossos).

    ``txn`` values are lists of micro-ops ``[f, key, value]`` with f ``read``
    or ``write``, applied in order as one step. The state is a sorted tuple of
    ``(key, value)`` pairs; absent keys are missing. Not partitionable.
    """

    name = "multi-register"
    functions = frozenset({"txn"})

    def __init__(self, init: dict[str, Any] | None = None, read_nil: ReadNil = "absent") -> None:
        if read_nil not in ("absent", "unconstrained"):
            raise ValueError(f"read_nil must be 'absent' or 'unconstrained', not {read_nil!r}")
        self._init = tuple(sorted((init or {}).items()))
        self.read_nil = read_nil

    def init(self) -> State:
        return self._init

    def validate(self, op: Operation) -> None:
        super().validate(op)
        for txn in (op.value, op.output):
            if txn is UNKNOWN or (txn is None and op.status != "ok"):
                continue
            if not isinstance(txn, tuple) or not all(
                isinstance(m, tuple) and len(m) == 3 and m[0] in ("read", "write") for m in txn
            ):
                raise UnsupportedOperation(
                    f"txn value must be a list of [read|write, key, value], got {thaw(txn)!r}",
                    op.line,
                )

    def role(self, op: Operation) -> Role:
        if op.status == "ok":
            return Role.REQUIRED
        if op.status == "fail":
            return Role.DROP
        if all(m[0] == "read" for m in op.value):
            return Role.DROP
        return Role.OPTIONAL

    def stepper(self, op: Operation) -> Stepper:
        known = op.status == "ok"
        micro = op.output if known else op.value
        unconstrained = self.read_nil == "unconstrained"
        checks = tuple((f, k, v, known and not (v is None and unconstrained)) for f, k, v in micro)

        def step(state: Any) -> Any:
            d = dict(state)
            for f, k, v, check in checks:
                if f == "write":
                    if v is None:
                        d.pop(k, None)
                    else:
                        d[k] = v
                elif check and d.get(k) != v:
                    return ILLEGAL
            return tuple(sorted(d.items()))

        return step

    def describe_state(self, state: State) -> str:
        assert isinstance(state, tuple)
        return json.dumps(dict(state)) if state else "{}"


MODELS: Final[dict[str, type[Model]]] = {
    "register": RegisterModel,
    "cas-register": CasRegisterModel,
    "kv": KvModel,
    "multi-register": MultiRegisterModel,
}


def make_model(
    name: str,
    init: Any = None,
    read_nil: ReadNil = "absent",
    failed_cas: FailedCas = "observe",
) -> Model:
    """Build a model by name (``register``, ``cas-register``, ``kv``, ``multi-register``)."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}") from None
    if cls is MultiRegisterModel:
        if init is not None and not isinstance(init, dict):
            raise ValueError("multi-register init must be a mapping key -> value")
        return MultiRegisterModel(init, read_nil)
    if isinstance(init, list | dict):
        raise ValueError(f"{name} init must be a single value, got {init!r}")  # noqa: TRY004
    return cls(init=init, read_nil=read_nil, failed_cas=failed_cas)  # type: ignore[call-arg]


_UNSET: Final = object()


def model_for(
    ops: Sequence[Operation],
    hints: dict[str, Any] | None = None,
    *,
    name: str | None = None,
    init: Any = _UNSET,
    read_nil: ReadNil | None = None,
    failed_cas: FailedCas | None = None,
) -> Model:
    """The model to check ``ops`` with: explicit arguments, else the format's hints.

    Hints come from `jepsen_lite.history.History.hints`. ``read_nil`` and
    ``failed_cas`` describe the source, so they always apply; ``init`` applies
    only to the model it was given for. The fallbacks are `infer_model_name`,
    init absent, ``read_nil="absent"`` and ``failed_cas="observe"``.
    """
    hints = hints or {}
    chosen = name or hints.get("model") or infer_model_name(ops)
    same = chosen == hints.get("model")
    if init is _UNSET:
        init = hints.get("init") if same else None
    return make_model(
        chosen,
        init,
        read_nil or hints.get("read_nil") or "absent",
        failed_cas or hints.get("failed_cas") or "observe",
    )


def infer_model_name(ops: Sequence[Operation]) -> str:
    """The natural model for a history's operations."""
    fs = {op.f for op in ops}
    if "txn" in fs:
        return "multi-register"
    if fs & {"get", "put", "append"}:
        return "kv"
    return "cas-register"

"""The history model: events, operations, and the JSONL history format.

A *history* is the sequence of events a test recorded, in real-time order.
Each client event belongs to a *process* (an int naming one single-threaded
client), which alternates an ``invoke`` with one completion:

* ``ok``:   the operation took effect and its result is known;
* ``fail``: the operation definitely did not take effect (but see the models:
  a failed CAS is an observation, it ran and found a different value);
* ``info``: indeterminate (timeout, crash): it may take effect at any time
  after its invocation, or never. An invocation still open at the end of the
  history means the same.

Events whose ``process`` is not an int (e.g. ``"nemesis"``) record fault
injection. They stay in the history, for the report, and the checker ignores
them.

Real-time order is the order of the events in the history: operation A
precedes operation B iff A's completion comes before B's invocation. The
optional ``time`` field (nanoseconds) must not decrease along the history and
is kept for reporting only.

JSONL format: one JSON object per line::

    {"type": "invoke", "process": 0, "f": "write", "key": "a", "value": 3, "time": 1200}
    {"type": "ok", "process": 0, "f": "write", "key": "a", "value": 3, "time": 3400}
    {"type": "info", "process": "nemesis", "f": "partition-start", "key": null, "value": null,
     "time": 3500}

``key`` is a string or null (a single register), ``value`` is JSON (no bytes):
a string, an int or null; a CAS value is ``[from, to]``. Lists are read back
as tuples, so that values are hashable. An optional ``error`` string on a
completion says why it failed; on a ``fail`` CAS it means the CAS did not run
(a ``fail`` CAS without ``error`` ran and found the compare false).

This module is pure: it parses and formats text and never opens files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

EventType = Literal["invoke", "ok", "fail", "info"]
Status = Literal["ok", "fail", "info"]

EVENT_TYPES: Final = frozenset({"invoke", "ok", "fail", "info"})
COMPLETION_TYPES: Final = frozenset({"ok", "fail", "info"})
CLIENT_FUNCTIONS: Final = frozenset({"read", "write", "cas", "get", "put", "append", "txn",
                                     "add", "read-set"})


class HistoryError(ValueError):
    """The input is not a well-formed history.

    Raised by the parsers (malformed line, unknown event type) and by the
    pairing of events into operations (a completion without an invocation, a
    second invocation on a busy process). ``line`` is the 1-based line of the
    input at fault, when known; ``str(err)`` starts with ``line N:``.
    """

    def __init__(self, message: str, line: int | None = None) -> None:
        self.message = message
        self.line = line
        super().__init__(f"line {line}: {message}" if line is not None else message)


class _Unknown:
    """The output of an operation whose completion is unknown (info, open)."""

    _instance: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"

    def __reduce__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = _Unknown()


def freeze(value: Any) -> Any:
    """Return ``value`` with every list turned into a tuple (hashable)."""
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Inverse of `freeze` for JSON output: tuples become lists."""
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class Event:
    """One line of a history.

    ``line`` is where the event was read from (1-based), or None for events
    built in memory; it is not part of the JSONL record.
    """

    type: EventType
    process: int | str
    f: str
    key: str | None = None
    value: Any = None
    time: int | None = None
    error: str | None = None
    line: int | None = field(default=None, compare=False)

    @property
    def is_client(self) -> bool:
        """True for client events; False for faults (``process`` not an int)."""
        return type(self.process) is int

    def to_json(self) -> dict[str, Any]:
        obj = {
            "type": self.type,
            "process": self.process,
            "f": self.f,
            "key": self.key,
            "value": thaw(self.value),
            "time": self.time,
        }
        if self.error is not None:
            obj["error"] = self.error
        return obj


@dataclass
class History:
    """Events read from one input, with the format's model hints.

    ``hints`` may hold ``"model"`` (the model the source checks this data
    with) and ``"init"`` (the initial value that model uses).
    """

    events: list[Event]
    format: str = "jsonl"
    hints: dict[str, Any] = field(default_factory=dict)

    def operations(self) -> list[Operation]:
        return pair_operations(self.events)


@dataclass(frozen=True, slots=True)
class Operation:
    """An invocation paired with its completion.

    ``call`` and ``ret`` are positions in the history (indices of the invoke
    and completion events); ``ret`` is ``math.inf`` when the outcome is
    unknown (``status == "info"``: completed with info, or still open at the
    end). ``value`` is the invocation's argument; ``output`` is the
    completion's value (for a read, the value read), or `UNKNOWN`.
    """

    index: int
    process: int
    f: str
    key: str | None
    value: Any
    output: Any
    status: Status
    call: int
    ret: float
    call_time: int | None = None
    ret_time: int | None = None
    error: str | None = None
    line: int | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return describe_operation(self)


def describe_operation(op: Operation) -> str:
    """A short human-readable form, e.g. ``#12 p3 cas [1, 2] fail``."""
    key = "" if op.key is None else f" {json.dumps(op.key)}"
    arg = _show(op.value)
    if op.f in ("read", "get"):
        body = f"{op.f}{key} -> " + ("?" if op.output is UNKNOWN else _show(op.output))
    elif op.f == "txn":
        out = op.output if op.status == "ok" else op.value
        body = f"txn {_show(out)}"
    else:
        body = f"{op.f}{key} {arg}"
    where = f" (line {op.line})" if op.line is not None else ""
    return f"#{op.index} p{op.process} {body} {op.status}{where}"


def _show(value: Any) -> str:
    if value is UNKNOWN:
        return "?"
    return json.dumps(thaw(value))


def pair_operations(events: Iterable[Event]) -> list[Operation]:
    """Pair each client completion with its process's open invocation.

    Fault events (non-int process) are skipped. Invocations still open at the
    end become ``info`` operations. Operations are numbered in invocation
    order. Raises `HistoryError` (with the line) for a completion with no
    open invocation, a completion whose ``f`` or ``key`` differs from its
    invocation, or an invocation on a process that already has one open.
    """
    open_ops: dict[int, tuple[int, Event]] = {}
    slots: list[Operation | None] = []
    invokes: list[tuple[int, int, Event]] = []  # (slot, position, event)
    for pos, ev in enumerate(events):
        if not ev.is_client:
            continue
        proc = ev.process
        assert isinstance(proc, int)
        if ev.type == "invoke":
            if proc in open_ops:
                prior = open_ops[proc][1]
                where = f" (line {prior.line})" if prior.line is not None else ""
                raise HistoryError(
                    f"process {proc} invokes {ev.f} while its {prior.f}{where} is still open",
                    ev.line,
                )
            slot = len(slots)
            slots.append(None)
            invokes.append((slot, pos, ev))
            open_ops[proc] = (slot, ev)
            continue
        if proc not in open_ops:
            raise HistoryError(f"{ev.type} {ev.f} for process {proc} with no open invoke", ev.line)
        slot, inv = open_ops.pop(proc)
        if ev.f != inv.f or ev.key != inv.key:
            raise HistoryError(
                f"{ev.type} {ev.f} key={ev.key!r} does not match the open invoke "
                f"{inv.f} key={inv.key!r} of process {proc}",
                ev.line,
            )
        call_pos = invokes[slot][1]
        if ev.type == "info":
            slots[slot] = _op(slot, inv, call_pos, ev, status="info", ret=math.inf)
        else:
            slots[slot] = _op(slot, inv, call_pos, ev, status=ev.type, ret=pos)
    for slot, pos, inv in invokes:
        if slots[slot] is None:
            slots[slot] = _op(slot, inv, pos, None, status="info", ret=math.inf)
    return [op for op in slots if op is not None]


def _op(
    index: int,
    inv: Event,
    call: int,
    completion: Event | None,
    *,
    status: Status,
    ret: float,
) -> Operation:
    assert isinstance(inv.process, int)
    # Reads: the completion value is what was read (the invoke's is ignored).
    # Writes and CASes: the completion repeats the argument; keep the invoke's.
    # Transactions: the invoke holds the micro-ops, the ok fills in the reads.
    completion_value = None if completion is None else completion.value
    output = UNKNOWN if status == "info" else completion_value
    value = inv.value
    if value is None and inv.f not in ("read", "get") and status != "info":
        value = completion_value
    return Operation(
        index=index,
        process=inv.process,
        f=inv.f,
        key=inv.key,
        value=value,
        output=output,
        status=status,
        call=call,
        ret=ret,
        call_time=inv.time,
        ret_time=None if completion is None else completion.time,
        error=None if completion is None else completion.error,
        line=inv.line,
    )


# ---------------------------------------------------------------------------
# JSONL


def parse_jsonl(text: str) -> History:
    """Parse a JSONL history. Blank lines are skipped."""
    events: list[Event] = []
    last_time: int | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise HistoryError(f"invalid JSON: {exc.msg}", lineno) from exc
        ev = event_from_json(obj, lineno)
        if ev.time is not None:
            if last_time is not None and ev.time < last_time:
                raise HistoryError(
                    f"time {ev.time} is before the previous event's {last_time}", lineno
                )
            last_time = ev.time
        events.append(ev)
    return History(events, "jsonl")


def event_from_json(obj: Any, line: int | None = None) -> Event:
    """Build an `Event` from one decoded JSONL object, validating fields."""
    if not isinstance(obj, dict):
        raise HistoryError("expected a JSON object", line)
    typ = obj.get("type")
    if typ not in EVENT_TYPES:
        raise HistoryError(f"'type' must be one of invoke/ok/fail/info, got {typ!r}", line)
    proc = obj.get("process")
    if isinstance(proc, bool) or not isinstance(proc, int | str):
        raise HistoryError(
            f"'process' must be an int (or a name such as \"nemesis\"), got {proc!r}", line
        )
    f = obj.get("f")
    if not isinstance(f, str):
        raise HistoryError(f"'f' must be a string, got {f!r}", line)
    if type(proc) is int and f not in CLIENT_FUNCTIONS:
        raise HistoryError(f"unknown f {f!r} for a client event", line)
    key = obj.get("key")
    if key is not None and not isinstance(key, str):
        raise HistoryError(f"'key' must be a string or null, got {key!r}", line)
    t = obj.get("time")
    if t is not None and (isinstance(t, bool) or not isinstance(t, int)):
        raise HistoryError(f"'time' must be an int (ns), got {t!r}", line)
    err = obj.get("error")
    if err is not None and not isinstance(err, str):
        raise HistoryError(f"'error' must be a string or null, got {err!r}", line)
    value = obj.get("value")
    if _has_object(value):
        raise HistoryError("'value' must be a string, number, null or list (no objects)", line)
    return Event(typ, proc, f, key, freeze(value), t, err, line)


def _has_object(value: Any) -> bool:
    if isinstance(value, dict):
        return True
    return isinstance(value, list) and any(_has_object(v) for v in value)


def format_jsonl(events: Iterable[Event]) -> Iterator[str]:
    """Yield one JSONL line (without newline) per event."""
    for ev in events:
        yield json.dumps(ev.to_json(), separators=(",", ":"))


def events_from_operations(ops: Sequence[Operation]) -> list[Event]:
    """Rebuild an event list from operations (for tests and fixtures)."""
    stamped: list[tuple[float, int, Event]] = []
    for op in ops:
        stamped.append((op.call, 0, Event("invoke", op.process, op.f, op.key, op.value)))
        if op.ret != math.inf:
            value = op.output if op.f in ("read", "get", "txn") else op.value
            stamped.append(
                (op.ret, 1, Event(op.status, op.process, op.f, op.key, value, error=op.error))
            )
    stamped.sort(key=lambda t: (t[0], t[1]))
    return [ev for _, _, ev in stamped]

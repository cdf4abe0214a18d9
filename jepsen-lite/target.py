"""What the runner needs of a system under test: clients that execute one
operation and say how it ended, and processes the nemesis can hurt.

A *client* belongs to one logical process of the history (one operation at a
time). ``invoke(op)`` never raises for the system's errors: it returns a
``Completion`` whose ``type`` follows the history's rules (history.py):

* ``ok``: the operation took effect; ``value`` is its result (the value read
  for a read, ``None`` if the key is absent; the written value for a write;
  ``[from, to]`` for a CAS; the list of elements for a set read);
* ``fail``: it definitely did not take effect. A CAS whose compare was false
  is ``fail`` with ``error=None`` (it ran and observed another value); a CAS
  that did not run carries an ``error``;
* ``info``: the outcome is unknown (a timeout, a connection lost after the
  request was sent). The runner gives the process a new client after it.

Values are ints (register workload) or int elements (set workload); how they
are stored is the target's business.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

CompletionType = Literal["ok", "fail", "info"]


@dataclass(frozen=True)
class Op:
    """One operation to run.

    ``f``: ``read`` | ``write`` | ``cas`` (register workload, on ``key``),
    ``add`` (set workload: add element ``value``), ``read-set`` (set
    workload: read every element, ``key`` is None).
    ``value``: None for reads, an int for write and add, ``(from, to)`` for cas
    (``from`` None: expect absent).
    """

    f: str
    key: str | None
    value: Any = None


@dataclass(frozen=True)
class Completion:
    type: CompletionType
    value: Any = None
    error: str | None = None


class Client(Protocol):
    async def invoke(self, op: Op) -> Completion: ...


class Target(Protocol):
    """A running system under test (started and stopped by the runner)."""

    name: str

    def client(self, process: int) -> AbstractAsyncContextManager[Client]:
        """A fresh client for ``process``; opened in the runner's trio loop."""
        ...

    def nemesis_targets(self) -> dict[str, list[str]]:
        """What each fault kind can hit: e.g. ``{"kill": ["n1", "n2"], ...}``;
        a kind the target cannot do is absent."""
        ...

    def inject(self, kind: str, target: str) -> str:
        """Start a fault (blocking, seconds at most); returns what was done, for
        the history. Raises ``FaultError`` when it cannot."""
        ...

    def heal(self, kind: str, target: str) -> str:
        """End a fault started by ``inject`` (restart, resume, heal). For a
        background kind (``nemesis.BACKGROUND``: nothing to undo), wait, for a
        bounded time, until the work ``inject`` started has ended."""
        ...

    def summary(self) -> dict[str, Any]:
        """What only the target knows about the run, added to ``result.json``
        (e.g. raftkv's ``reshards``); called after the run."""
        ...


class FaultError(Exception):
    """A fault could not be injected or healed (the process is gone, the
    command failed); the message says which and why."""

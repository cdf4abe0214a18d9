"""Shared helpers for the jepsen-lite tests: the conformance data and builders."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from jepsen_lite.history import Event

_REPO = Path(__file__).resolve().parents[2]
_CANDIDATES = [
    os.environ.get("JEPSEN_CONFORMANCE_DIR", ""),
    str(_REPO / "conformance" / "linearizability"),
    str(_REPO.parent / "shared" / "conformance" / "linearizability"),  # CI: shared/ beside
]


def conformance_dir() -> Path | None:
    """Where the conformance histories are (env JEPSEN_CONFORMANCE_DIR wins)."""
    for cand in _CANDIDATES:
        if cand and (Path(cand) / "manifest.json").is_file():
            return Path(cand)
    return None


CONFORMANCE = conformance_dir()
# Outside CI a checkout without ../shared skips these; in CI missing data fails.
needs_conformance = pytest.mark.skipif(
    CONFORMANCE is None and not os.environ.get("CI"),
    reason="conformance data not found (set JEPSEN_CONFORMANCE_DIR)")


def manifest() -> list[dict[str, Any]]:
    if CONFORMANCE is None:
        return []
    entries: list[dict[str, Any]] = json.loads((CONFORMANCE / "manifest.json").read_text())
    return entries


def write_jsonl(path: Path, events: list[Event]) -> Path:
    path.write_text("".join(json.dumps(ev.to_json()) + "\n" for ev in events))
    return path


def hard_events(writers: int = 22) -> list[Event]:
    """A history that plain WGL needs about writers * 2**writers steps to refute.

    ``writers`` concurrent writes of distinct values, then a read of a value
    nobody wrote: every order of every subset of the writes is a distinct
    configuration before the read fails.
    """
    events = [Event("invoke", p, "write", None, p) for p in range(writers)]
    events += [Event("ok", p, "write", None, p) for p in range(writers)]
    events += [Event("invoke", writers, "read"), Event("ok", writers, "read", None, 99)]
    return events


def kill_processes_mentioning(text: str) -> list[int]:
    """SIGKILL (after SIGCONT) every process whose command line mentions ``text``."""
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGCONT)
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed

"""The jepsen-lite command: output and exit codes (0 / 1 / 2 / 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from jepsen_support import CONFORMANCE, hard_events, needs_conformance, write_jsonl

from jepsen_lite.cli import cli
from jepsen_lite.history import Event

pytestmark = pytest.mark.timeout(60)

GOOD = [
    Event("invoke", 0, "write", "k", 1, 10),
    Event("ok", 0, "write", "k", 1, 20),
    Event("info", "nemesis", "partition-start", None, None, 25),
    Event("invoke", 1, "read", "k", None, 30),
    Event("ok", 1, "read", "k", 1, 40),
]
BAD = [*GOOD, Event("invoke", 2, "read", "k", None, 50), Event("ok", 2, "read", "k", None, 60)]


def run(*args: str):
    return CliRunner().invoke(cli, ["check", *args])


def test_linearizable_exits_0(tmp_path: Path) -> None:
    result = run(str(write_jsonl(tmp_path / "h.jsonl", GOOD)))
    assert result.exit_code == 0, result.output
    assert result.output.startswith("linearizable\n")
    assert "format jsonl, model cas-register" in result.output


def test_not_linearizable_exits_1_with_key_and_window(tmp_path: Path) -> None:
    result = run(str(write_jsonl(tmp_path / "h.jsonl", BAD)))
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0] == "NOT LINEARIZABLE"
    assert 'key "k"' in result.output
    assert "longest linearizable prefix: 2 op(s)" in result.output
    assert (
        'must come next (earliest return left): #2 p2 read "k" -> null ok (line 6)' in result.output
    )
    assert "illegal in this state" in result.output


def test_unknown_exits_2(tmp_path: Path) -> None:
    result = run("--timeout-s", "0.05", str(write_jsonl(tmp_path / "h.jsonl", hard_events(22))))
    assert result.exit_code == 2, result.output
    assert result.output.startswith("UNKNOWN (this is not a pass): the timeout passed first")
    limited = ["--cache-entries-max", "100", str(tmp_path / "h.jsonl")]
    result = run(*limited)
    assert result.exit_code == 2 and "--cache-entries-max" in result.output


def test_malformed_input_exits_3_naming_the_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "h.jsonl", GOOD)
    path.write_text(path.read_text() + '{"type": "ok", "process": 9, "f": "read"}\n')
    result = run(str(path))
    assert result.exit_code == 3
    assert result.output.strip().count("\n") == 0  # one line
    assert "line 6:" in result.output and "no open invoke" in result.output


def test_unsupported_op_for_the_model_exits_3(tmp_path: Path) -> None:
    events = [Event("invoke", 0, "cas", "k", (None, 1)), Event("ok", 0, "cas", "k", (None, 1))]
    result = run("--model", "register", str(write_jsonl(tmp_path / "h.jsonl", events)))
    assert result.exit_code == 3
    assert "line 1:" in result.output and "does not support" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["does-not-exist.jsonl"],
        ["--format", "csv", "x"],
        ["--bogus"],
        ["--init", "{nope", "FILE"],
    ],
)
def test_usage_errors_exit_3_not_2(tmp_path: Path, args: list[str]) -> None:
    path = write_jsonl(tmp_path / "h.jsonl", GOOD)
    result = run(*[str(path) if a == "FILE" else a for a in args])
    assert result.exit_code == 3, result.output


def test_wrong_explicit_format_exits_3(tmp_path: Path) -> None:
    result = run("--format", "knossos-edn", str(write_jsonl(tmp_path / "h.jsonl", GOOD)))
    assert result.exit_code == 3
    assert "line 1:" in result.output


def test_init_option(tmp_path: Path) -> None:
    events = [Event("invoke", 0, "read", "k"), Event("ok", 0, "read", "k", 0)]
    path = str(write_jsonl(tmp_path / "h.jsonl", events))
    assert run(path).exit_code == 1
    assert run("--init", "0", path).exit_code == 0


@needs_conformance
def test_conformance_files_through_the_cli() -> None:
    assert CONFORMANCE is not None
    assert run(str(CONFORMANCE / "porcupine/jepsen/etcd_002.log")).exit_code == 0
    bad = run(str(CONFORMANCE / "porcupine/kv/c50-bad.txt"))
    assert bad.exit_code == 1 and "format porcupine-kv-log, model kv" in bad.output
    knossos = CONFORMANCE / "knossos/cas-register/good/memstress3-30.edn"
    assert run(str(knossos)).exit_code == 0
    reading_a = ["--init", "0", "--read-nil", "unconstrained", str(knossos)]
    assert run(*reading_a).exit_code == 0
    assert run("--init", "0", str(CONFORMANCE / "porcupine/jepsen/etcd_002.log")).exit_code == 1

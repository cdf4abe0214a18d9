"""The checker against the conformance histories and their known verdicts.

The smoke subset (29 files, marked ``"smoke": true`` in the manifest) runs in
CI; all 229 files run with ``-m slow``. Also checked: each of the README's
four traps really changes the verdicts, so these tests would fail if the
semantics drifted (a check must be seen failing before it is trusted).
"""

from __future__ import annotations

import time

import pytest
from jepsen_support import CONFORMANCE, manifest, needs_conformance

from jepsen_lite.checker import Verdict, check, model_for
from jepsen_lite.formats import detect_format, load_history

ENTRIES = manifest()
SMOKE = [e for e in ENTRIES if e["smoke"]]
TIMEOUT_S = 60.0


def _check_file(entry: dict, **overrides) -> Verdict:
    assert CONFORMANCE is not None
    history = load_history(str(CONFORMANCE / entry["file"]))
    assert history.format == entry["format"]
    ops = history.operations()
    result = check(ops, model_for(ops, history.hints, **overrides), timeout_s=TIMEOUT_S)
    assert result.verdict is not Verdict.UNKNOWN, f"{entry['file']} timed out"
    return result.verdict


@needs_conformance
def test_manifest_has_the_expected_shape() -> None:
    assert len(ENTRIES) == 229
    assert len(SMOKE) == 29
    assert sum(e["expect"] == "linearizable" for e in ENTRIES) == 140


@needs_conformance
@pytest.mark.timeout(60)
@pytest.mark.parametrize("entry", SMOKE, ids=[e["file"] for e in SMOKE])
def test_smoke_verdict(entry: dict) -> None:
    assert _check_file(entry).value == entry["expect"]


@needs_conformance
@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_every_verdict(entry: dict) -> None:
    assert _check_file(entry).value == entry["expect"]


@needs_conformance
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_all_229_within_budget() -> None:
    started = time.monotonic()
    wrong = [e["file"] for e in ENTRIES if _check_file(e).value != e["expect"]]
    elapsed_s = time.monotonic() - started
    assert wrong == []
    assert elapsed_s < 120, f"all 229 took {elapsed_s:.1f} s"


@needs_conformance
@pytest.mark.timeout(60)
def test_format_detection_on_every_file() -> None:
    assert CONFORMANCE is not None
    for entry in ENTRIES:
        text = (CONFORMANCE / entry["file"]).read_text()
        assert detect_format(text) == entry["format"], entry["file"]


# --- The traps: each semantic choice must matter -------------------------------


def _flips(entries: list[dict], **overrides) -> int:
    return sum(_check_file(e, **overrides).value != e["expect"] for e in entries)


@needs_conformance
@pytest.mark.timeout(60)
def test_trap1_etcd_initial_value_zero_flips_20_verdicts() -> None:
    etcd = [e for e in ENTRIES if e["format"] == "porcupine-etcd-log"]
    assert len(etcd) == 102
    assert _flips(etcd, init=0) == 20


@needs_conformance
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_trap2_knossos_readings() -> None:
    knossos = [e for e in ENTRIES if e["format"] == "knossos-edn" and e["model"] == "cas-register"]
    assert len(knossos) == 120
    # (b), the default: init nil, a nil read means absent.
    assert _flips(knossos) == 0
    # (a), knossos's own: init 0, a nil read is unconstrained.
    assert _flips(knossos, init=0, read_nil="unconstrained") == 0
    # Neither: init 0 and nil means absent makes 89 good files invalid.
    assert _flips(knossos, init=0) == 89


@needs_conformance
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_trap3_failed_cas_semantics_depend_on_the_source() -> None:
    etcd = [e for e in ENTRIES if e["format"] == "porcupine-etcd-log"]
    knossos = [e for e in ENTRIES if e["format"] == "knossos-edn" and e["model"] == "cas-register"]
    # On the etcd logs, dropping failed CASes happens not to change a verdict.
    assert _flips(etcd, failed_cas="drop") == 0
    # Knossos's :fail means "did not happen": a failed CAS there is no observation.
    assert _flips(knossos, failed_cas="observe") == 9


@needs_conformance
@pytest.mark.timeout(60)
def test_trap4_an_easy_illegal_key_is_found_before_a_hard_one() -> None:
    assert CONFORMANCE is not None
    history = load_history(str(CONFORMANCE / "porcupine/kv/c50-bad.txt"))
    ops = history.operations()
    model = model_for(ops, history.hints)
    # Key "0" alone is hard to refute ...
    alone = check([op for op in ops if op.key == "0"], model, timeout_s=0.5)
    assert alone.verdict is Verdict.UNKNOWN
    # ... but the whole history is refuted quickly, on another key.
    started = time.monotonic()
    whole = check(ops, model, timeout_s=30)
    assert whole.verdict is Verdict.NOT_LINEARIZABLE
    assert whole.counterexample is not None and whole.counterexample.key != "0"
    assert time.monotonic() - started < 5

"""Parsers: JSONL, porcupine etcd and kv logs, knossos EDN, and their errors."""

from __future__ import annotations

import json
import math

import pytest

from jepsen_lite.edn import EdnError, Keyword, read_collection, read_forms
from jepsen_lite.formats import detect_format, parse_history
from jepsen_lite.history import (
    UNKNOWN,
    Event,
    HistoryError,
    format_jsonl,
    pair_operations,
    parse_jsonl,
)

pytestmark = pytest.mark.timeout(30)


def _jsonl(*objs: dict) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def _ev(type_: str, process, f: str, value=None, key=None, time=None) -> dict:
    return {"type": type_, "process": process, "f": f, "key": key, "value": value, "time": time}


# --- JSONL ----------------------------------------------------------------------


def test_jsonl_round_trip_and_pairing() -> None:
    text = _jsonl(
        _ev("invoke", 0, "write", 3, "k", 10),
        _ev("invoke", 1, "cas", [3, 4], "k", 11),
        _ev("info", "nemesis", "partition-start", None, None, 12),
        _ev("ok", 0, "write", 3, "k", 13),
        _ev("fail", 1, "cas", [3, 4], "k", 14),
        _ev("invoke", 2, "read", None, "k", 15),
        _ev("ok", 2, "read", 3, "k", 16),
        _ev("invoke", 3, "write", 5, "k", 17),
    )
    history = parse_jsonl(text)
    assert [ev.line for ev in history.events] == list(range(1, 9))
    assert history.events[1].value == (3, 4)  # lists become tuples
    assert not history.events[2].is_client
    assert parse_jsonl("\n".join(format_jsonl(history.events))).events == history.events

    ops = pair_operations(history.events)
    assert [(op.f, op.status) for op in ops] == [
        ("write", "ok"),
        ("cas", "fail"),
        ("read", "ok"),
        ("write", "info"),  # never completed
    ]
    write, cas, read, open_write = ops
    assert (write.call, write.ret, write.call_time, write.ret_time) == (0, 3, 10, 13)
    assert (cas.call, cas.ret) == (1, 4)
    assert read.output == 3
    assert open_write.ret == math.inf and open_write.output is UNKNOWN
    assert open_write.line == 8


def test_info_completion_is_pending_forever() -> None:
    events = [Event("invoke", 0, "write", None, 1), Event("info", 0, "write", None, "timeout")]
    (op,) = pair_operations(events)
    assert op.status == "info" and op.ret == math.inf and op.output is UNKNOWN and op.value == 1


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (_jsonl(_ev("invoke", 0, "read")) + "{not json\n", 2, "invalid JSON"),
        (_jsonl(_ev("invoke", 0, "read"), _ev("done", 0, "read")), 2, "'type'"),
        ("\n" + _jsonl(_ev("invoke", True, "read")), 2, "'process'"),
        (_jsonl(_ev("invoke", 0, "frobnicate")), 1, "unknown f"),
        (_jsonl(_ev("invoke", 0, "read", key=5)), 1, "'key'"),
        (_jsonl(_ev("invoke", 0, "read", time="x")), 1, "'time'"),
        (_jsonl(_ev("invoke", 0, "read", time=5), _ev("ok", 0, "read", 1, time=4)), 2, "before"),
        ("[1, 2]\n", 1, "JSON object"),
        (_jsonl(_ev("invoke", 0, "write", [{"a": 1}])), 1, "no objects"),
    ],
)
def test_jsonl_errors_name_the_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(HistoryError) as info:
        parse_jsonl(text)
    assert info.value.line == line
    assert str(info.value).startswith(f"line {line}:")
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("events", "line", "fragment"),
    [
        ([_ev("ok", 0, "read", 1)], 1, "no open invoke"),
        ([_ev("invoke", 0, "read"), _ev("invoke", 0, "write", 1)], 2, "still open"),
        ([_ev("invoke", 0, "read"), _ev("ok", 0, "write", 1)], 2, "does not match"),
        (
            [_ev("invoke", 0, "read", key="a"), _ev("ok", 0, "read", 1, key="b")],
            2,
            "does not match",
        ),
    ],
)
def test_pairing_errors_name_the_line(events: list[dict], line: int, fragment: str) -> None:
    history = parse_jsonl(_jsonl(*events))
    with pytest.raises(HistoryError) as info:
        pair_operations(history.events)
    assert info.value.line == line and fragment in str(info.value)


# --- porcupine etcd log -----------------------------------------------------------

ETCD = """\
INFO  jepsen.util - 0\t:invoke\t:read\tnil
INFO  jepsen.util - 1\t:invoke\t:cas\t[1 2]
INFO  jepsen.util - 0\t:ok\t:read\tnil
INFO  jepsen.util - 1 :fail :cas [1 2]
INFO  jepsen.util - 2   :invoke :write   4
INFO  jepsen.util - 2\t:info\t:write\t:timed-out
INFO  jepsen.util - 3\t:invoke\t:read\tnil
INFO  jepsen.util - 3\t:fail\t:read\t:timed-out
"""


def test_etcd_log() -> None:
    history = parse_history(ETCD)
    assert history.format == "porcupine-etcd-log"
    assert history.hints == {"model": "cas-register", "init": None, "failed_cas": "observe"}
    ops = pair_operations(history.events)
    assert [(op.f, op.status, op.value, op.output) for op in ops] == [
        ("read", "ok", None, None),
        ("cas", "fail", (1, 2), (1, 2)),
        ("write", "info", 4, UNKNOWN),
        ("read", "fail", None, "timed-out"),
    ]


@pytest.mark.parametrize(
    ("bad_line", "fragment"),
    [
        ("INFO  jepsen.util - 0\t:invoke\t:read", "expected 'INFO"),
        ("INFO  jepsen.util - 0\t:begin\t:read\tnil", "unknown event type"),
        ("INFO  jepsen.util - 0\t:invoke\t:frob\tnil", "unknown function"),
        ('INFO  jepsen.util - 0\t:invoke\t:write\t"unterminated', "unterminated string"),
        ("INFO  jepsen.util - 0\t:invoke\t:write\t1 2", "one value"),
    ],
)
def test_etcd_log_errors_name_the_line(bad_line: str, fragment: str) -> None:
    text = ETCD + bad_line + "\n"
    with pytest.raises(HistoryError) as info:
        parse_history(text, "porcupine-etcd-log")
    assert info.value.line == 9 and fragment in str(info.value)


# --- porcupine kv log ---------------------------------------------------------------

KV = """\
{:process 0, :type :invoke, :f :append, :key "0", :value "x 0 0 y"}
{:process 1, :type :invoke, :f :get, :key "0", :value nil}
{:process 0, :type :ok, :f :append, :key "0", :value "x 0 0 y"}
{:process 1, :type :ok, :f :get, :key "0", :value ""}
"""


def test_kv_log() -> None:
    history = parse_history(KV)
    assert history.format == "porcupine-kv-log"
    assert history.hints == {"model": "kv", "init": ""}
    ops = pair_operations(history.events)
    assert [(op.f, op.key, op.value, op.output) for op in ops] == [
        ("append", "0", "x 0 0 y", "x 0 0 y"),
        ("get", "0", None, ""),
    ]


def test_kv_log_errors_name_the_line() -> None:
    with pytest.raises(HistoryError) as info:
        parse_history(KV + '{:process 2, :type :invoke, :f :get, :key "1"\n', "porcupine-kv-log")
    assert info.value.line == 5 and "never closed" in str(info.value)
    with pytest.raises(HistoryError) as info:
        parse_history(KV + "\n{:process 2, :f :get}\n", "porcupine-kv-log")
    assert info.value.line == 6 and ":type" in str(info.value)
    with pytest.raises(HistoryError) as info:
        parse_history(KV + '{:process 2, :type :begin, :f :get, :key "1"}\n', "porcupine-kv-log")
    assert info.value.line == 5 and "unknown :type" in str(info.value)


# --- knossos EDN ------------------------------------------------------------------

KNOSSOS = """\
; a comment
[{:process 0, :type :invoke, :f :write, :value 1}
 {:process :nemesis, :type :info, :f :start, :value "partition"}
 {:type :ok,
  :f :write,   ; keys in any order, maps over several lines
  :value 1,
  :process 0,
  :time 12}
 {:process 1 :type :invoke :f :read}
 {:process 1, :type :ok, :f :read, :value 1}
 {:process 2, :type :invoke, :f :cas, :value [1 2]}
 {:process 2, :type :fail, :f :cas, :value [1 2], :error [:temporarily-unavailable nil]}
 {:process 3, :type :invoke, :f :write, :value 2}]
"""


def test_knossos_edn() -> None:
    history = parse_history(KNOSSOS)
    assert history.format == "knossos-edn"
    assert history.hints == {"model": "cas-register", "init": None, "failed_cas": "drop"}
    nemesis = history.events[1]
    assert not nemesis.is_client and nemesis.process == "nemesis" and nemesis.line == 3
    assert history.events[2].line == 4 and history.events[2].time == 12
    ops = pair_operations(history.events)
    assert [(op.f, op.status, op.value, op.output) for op in ops] == [
        ("write", "ok", 1, 1),
        ("read", "ok", None, 1),  # missing :value is nil; the completion's value wins
        ("cas", "fail", (1, 2), (1, 2)),
        ("write", "info", 2, UNKNOWN),  # open at EOF
    ]
    assert ops[2].error == '["temporarily-unavailable", null]'


def test_knossos_list_and_multi_register() -> None:
    text = (
        "({:process 0, :type :invoke, :f :txn, :value [[:read :x nil] [:write :y 2]]}\n"
        " {:process 0, :type :ok, :f :txn, :value [[:read :x 0] [:write :y 2]]})"
    )
    history = parse_history(text)
    assert history.hints == {"model": "multi-register", "init": {"x": 0, "y": 0}}
    (op,) = pair_operations(history.events)
    assert op.value == (("read", "x", None), ("write", "y", 2))
    assert op.output == (("read", "x", 0), ("write", "y", 2))


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("[{:process 0 :type :invoke :f :read}\n {:process 0 :type :ok", 2, "never closed"),
        ("[{:process 0 :type :invoke :f :read}\n\n :x]", 3, "op map"),
        ("[{:process 0 :type :invoke :f :read}\n {:a}]", 2, "odd number"),
        ('[{:process 0 :type :invoke\n :f :read :value "abc]', 2, "unterminated string"),
        ("[{:process 0 :type :invoke :f :read})", 1, "closes"),
        ("[]\n[]", 2, "exactly one"),
        ('[{:process 0 :type :invoke :f :read :value #inst "2020"}]', 1, "tagged"),
        ("[{:process 0 :type :begin :f :read}]", 1, "unknown :type"),
        ("[{:process 0 :type :invoke :f :frob}]", 1, "unknown :f"),
        ('[\n{:process 0 :type "invoke" :f :read}]', 2, "keyword"),
    ],
)
def test_knossos_errors_name_the_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(HistoryError) as info:
        parse_history(text, "knossos-edn")
    assert info.value.line == line, str(info.value)
    assert fragment in str(info.value)


def test_edn_reader_subset() -> None:
    forms = read_forms(
        'nil true false -3 7N 1.5 :a/b "s\\"\\n" sym #{1 2} #_ [ignored] {:k [1 (2)]}'
    )
    values = [v for v, _ in forms]
    assert values[:6] == [None, True, False, -3, 7, 1.5]
    assert values[6] is Keyword("a/b")
    assert values[7] == 's"\n'
    assert repr(values[8]) == "sym"
    assert values[9] == frozenset({1, 2})
    assert values[10] == {Keyword("k"): (1, (2,))}
    assert len(values) == 11
    items = read_collection("[1,\n2\n ; c\n 3]")
    assert items == [(1, 1), (2, 2), (3, 4)]
    with pytest.raises(EdnError):
        read_forms("[#_]")


# --- detection ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        (ETCD, "porcupine-etcd-log"),
        (KV, "porcupine-kv-log"),
        (KNOSSOS, "knossos-edn"),
        ('\n{"type": "invoke", "process": 0, "f": "read"}\n', "jsonl"),
        ("", "jsonl"),
    ],
)
def test_detect_format(text: str, fmt: str) -> None:
    assert detect_format(text) == fmt


def test_detect_format_error_names_the_line() -> None:
    with pytest.raises(HistoryError) as info:
        detect_format("\n\nhello world\n")
    assert info.value.line == 3


def test_unknown_format_name() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        parse_history("", "csv")

"""A small EDN reader: the subset Jepsen and Knossos histories use.

Supported: vectors ``[..]``, lists ``(..)``, maps ``{..}``, sets ``#{..}``,
keywords ``:a/b``, strings with escapes, integers (``42``, ``-1``, ``7N``),
floats, ``nil``, ``true``, ``false``, symbols, ``;`` comments and ``#_``
discard. Commas are whitespace. Not supported (they raise `EdnError`):
tagged literals (``#inst``, ``#uuid``), characters (``\\a``), ratios.

Vectors and lists become tuples (hashable), maps dicts, sets frozensets,
keywords `Keyword` objects, symbols `Symbol` objects.
"""

from __future__ import annotations

import bisect
import re
from typing import Any, Final

from jepsen_lite.history import HistoryError


class EdnError(HistoryError):
    """The text is not EDN this reader understands; ``line`` says where."""


class Keyword:
    """An EDN keyword such as ``:read``; interned, so ``is`` works."""

    __slots__ = ("name",)
    _table: dict[str, Keyword] = {}

    name: str

    def __new__(cls, name: str) -> Keyword:
        kw = cls._table.get(name)
        if kw is None:
            kw = super().__new__(cls)
            kw.name = name
            cls._table[name] = kw
        return kw

    def __repr__(self) -> str:
        return ":" + self.name

    def __reduce__(self) -> tuple[type[Keyword], tuple[str]]:
        return (Keyword, (self.name,))


class Symbol:
    """An EDN symbol (a bare word that is not nil/true/false or a number)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Symbol) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("Symbol", self.name))


_TOKEN: Final = re.compile(
    r"""
      (?P<ws>(?:[\s,]+|;[^\n]*)+)
    | (?P<str>"(?:[^"\\]|\\.)*")
    | (?P<open>\#\{|[\[({])
    | (?P<close>[\])}])
    | (?P<discard>\#_)
    | (?P<atom>[^\s,;"\[\](){}]+)
    """,
    re.VERBOSE | re.DOTALL,
)
_INT: Final = re.compile(r"[+-]?\d+N?")
_FLOAT: Final = re.compile(r"[+-]?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?M?")
_ESCAPES: Final = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "b": "\b", "f": "\f"}
_ESCAPE_RE: Final = re.compile(r"\\(u[0-9a-fA-F]{4}|.)", re.DOTALL)
_CLOSER: Final = {"[": "]", "(": ")", "{": "}", "#{": "}"}
_DISCARD: Final = object()


class _LineIndex:
    def __init__(self, text: str, first_line: int) -> None:
        self._newlines = [m.start() for m in re.finditer("\n", text)]
        self._first = first_line

    def line(self, pos: int) -> int:
        return self._first + bisect.bisect_left(self._newlines, pos)


def _unescape(body: str, lines: _LineIndex, pos: int) -> str:
    if "\\" not in body:
        return body

    def sub(m: re.Match[str]) -> str:
        esc = m.group(1)
        if esc[0] == "u" and len(esc) == 5:
            return chr(int(esc[1:], 16))
        if esc in _ESCAPES:
            return _ESCAPES[esc]
        raise EdnError(f"unknown string escape \\{esc}", lines.line(pos))

    return _ESCAPE_RE.sub(sub, body)


def _atom(tok: str, lines: _LineIndex, pos: int) -> Any:
    if tok == "nil":
        return None
    if tok == "true":
        return True
    if tok == "false":
        return False
    if tok[0] == ":":
        if len(tok) == 1:
            raise EdnError("empty keyword ':'", lines.line(pos))
        return Keyword(tok[1:])
    if _INT.fullmatch(tok):
        return int(tok.rstrip("N"))
    if _FLOAT.fullmatch(tok):
        return float(tok.rstrip("M"))
    if tok[0] == "#":
        raise EdnError(
            f"unsupported EDN dispatch {tok!r} (tagged literals are not supported)", lines.line(pos)
        )
    if tok[0] == "\\":
        raise EdnError(f"unsupported EDN character literal {tok!r}", lines.line(pos))
    if tok[0].isdigit():
        raise EdnError(f"invalid number {tok!r}", lines.line(pos))
    return Symbol(tok)


def read_forms(text: str, first_line: int = 1) -> list[tuple[Any, int]]:
    """Read every top-level form of ``text``; return ``(form, start_line)`` pairs.

    ``first_line`` is the line number of the text's first line (for errors).
    """
    forms, _ = _read(text, first_line, want_items=False)
    return forms


def read_collection(text: str, first_line: int = 1) -> list[tuple[Any, int]]:
    """Read a text holding exactly one vector or list; return its items with lines."""
    forms, items = _read(text, first_line, want_items=True)
    if len(forms) != 1 or not isinstance(forms[0][0], tuple):
        where = forms[1][1] if len(forms) > 1 else (forms[0][1] if forms else first_line)
        raise EdnError("expected exactly one top-level vector or list", where)
    assert items is not None
    return items


def _read(  # noqa: PLR0915 - one flat tokenizer loop
    text: str, first_line: int, want_items: bool
) -> tuple[list[tuple[Any, int]], list[tuple[Any, int]] | None]:
    lines = _LineIndex(text, first_line)
    # Each frame: [opener, items, start position, item start positions].
    stack: list[tuple[str, list[Any], int, list[int]]] = []
    forms: list[tuple[Any, int]] = []
    top_items: list[tuple[Any, int]] | None = None
    discards: list[int] = []  # stack depth of each pending #_ marker
    pos = 0
    end = len(text)
    match = _TOKEN.match
    while pos < end:
        m = match(text, pos)
        if m is None:
            if text[pos] == '"':
                raise EdnError("unterminated string", lines.line(pos))
            raise EdnError(f"unexpected character {text[pos]!r}", lines.line(pos))
        kind = m.lastgroup
        start = pos
        pos = m.end()
        if kind == "ws":
            continue
        if kind == "discard":
            discards.append(len(stack))
            continue
        if kind == "open":
            stack.append((m.group(), [], start, []))
            continue
        if kind == "close":
            closer = m.group()
            if not stack:
                raise EdnError(f"unmatched {closer!r}", lines.line(start))
            if discards and discards[-1] > len(stack) - 1:
                raise EdnError(f"#_ discards nothing before {closer!r}", lines.line(start))
            opener, items, ostart, positions = stack.pop()
            if _CLOSER[opener] != closer:
                raise EdnError(
                    f"{closer!r} closes {opener!r} opened on line {lines.line(ostart)}",
                    lines.line(start),
                )
            if opener == "{":
                if len(items) % 2:
                    raise EdnError("map literal has an odd number of forms", lines.line(ostart))
                try:
                    value: Any = dict(zip(items[::2], items[1::2], strict=True))
                except TypeError as exc:
                    raise EdnError(f"unhashable map key: {exc}", lines.line(ostart)) from exc
            elif opener == "#{":
                try:
                    value = frozenset(items)
                except TypeError as exc:
                    raise EdnError(f"unhashable set element: {exc}", lines.line(ostart)) from exc
            else:
                value = tuple(items)
                if want_items and not stack and top_items is None:
                    top_items = [(v, lines.line(p)) for v, p in zip(items, positions, strict=True)]
            start = ostart
        elif kind == "str":
            value = _unescape(m.group()[1:-1], lines, start)
        else:
            value = _atom(m.group(), lines, start)
        if discards and discards[-1] == len(stack):
            discards.pop()
            continue
        if stack:
            stack[-1][1].append(value)
            stack[-1][3].append(start)
        else:
            forms.append((value, lines.line(start)))
    if stack:
        opener, _, ostart, _ = stack[-1]
        raise EdnError(f"{opener!r} opened here is never closed", lines.line(ostart))
    if discards:
        raise EdnError("#_ discards nothing at end of input", lines.line(end))
    return forms, top_items


def plain(value: Any) -> Any:
    """Convert EDN values to plain Python: keywords and symbols to their names."""
    if isinstance(value, Keyword | Symbol):
        return value.name
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    return value

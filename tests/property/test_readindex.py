"""The read index bookkeeping (raftkv/replication/readindex.py), pure: random
interleavings of reads, heartbeat rounds, acknowledgements (of any round, in
any term), commits, applies and term changes, against the rules that make a
read linearizable."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.replication.readindex import ReadIndex

PEERS = ["b", "c", "d", "e"]


@dataclass
class Read:
    id: int
    term: int
    started_at_request: int  # the last round started when the read arrived
    commit_at_request: int
    outcome: list[Any] = field(default_factory=list)


ops = st.lists(st.one_of(
    st.tuples(st.just("request"), st.booleans()),
    st.tuples(st.just("round")),
    st.tuples(st.just("ack"), st.sampled_from(PEERS), st.integers(0, 3), st.integers(-1, 1)),
    st.tuples(st.just("commit"), st.integers(1, 3), st.booleans()),
    st.tuples(st.just("apply"), st.integers(1, 3)),
    st.tuples(st.just("ready")),
    st.tuples(st.just("new_term")),
    st.tuples(st.just("step_down")),
), max_size=80)


@pytest.mark.parametrize("voters", [1, 3, 5])
@settings(max_examples=300, deadline=None)
@given(script=ops)
def test_a_read_is_served_only_when_confirmed_and_applied(voters: int,
                                                         script: list[tuple[Any, ...]]) -> None:
    peers = PEERS[:voters - 1]
    reads = ReadIndex()
    now = {"term": 1, "commit": 5, "applied": 5, "in_term": False, "leading": True}
    acks: list[tuple[str, int, int]] = []  # every acknowledgement given: (peer, round, term)
    log: list[Read] = []
    reads.leading(1)

    def on_read_for(read: Read) -> Any:
        def on_read(index: int | None, error: Any) -> None:
            read.outcome.append((index, error, now["term"], now["applied"], now["commit"]))
        return on_read

    for op in script:
        kind = op[0]
        term = now["term"]
        if kind == "request" and now["leading"]:
            read = Read(len(log), term, reads.started, now["commit"])
            log.append(read)
            reads.request(term, now["commit"], op[1] and now["in_term"], on_read_for(read))
        elif kind == "round":
            before = reads.started
            r = reads.start_round()
            assert r is None or r == before + 1
        elif kind == "ack":
            _, peer, back, dt = op
            if peer in peers:
                r = max(0, reads.started - back)
                acks.append((peer, r, term + dt))
                reads.ack(peer, r, term + dt)
        elif kind == "commit":
            now["commit"] += op[1]
            now["in_term"] = now["in_term"] or op[2]
            reads.commit_advanced(term, now["commit"], now["in_term"])
        elif kind == "apply":
            now["applied"] = min(now["commit"], now["applied"] + op[1])
        elif kind == "ready" and now["leading"]:
            for on_read, index in reads.ready(voters, now["applied"]):
                on_read(index, None)
        elif kind in ("new_term", "step_down"):
            failed = reads.leading(term + 1 if kind == "new_term" else None)
            now.update(term=term + 1, in_term=False, leading=kind == "new_term")
            for on_read in failed:
                on_read(None, "NOT_LEADER")

    for read in log:
        assert len(read.outcome) <= 1, f"read {read.id} completed twice"
        if not read.outcome or read.outcome[0][1] is not None:
            continue
        index, _, served_term, applied, _commit = read.outcome[0]
        # Served in the term it was taken in.
        assert served_term == read.term
        # Confirmed by a majority, in its term, in a round started after it arrived.
        confirming = {p for p, r, t in acks if t == read.term and r > read.started_at_request}
        assert len(confirming) + 1 > voters / 2, (read, acks)
        # Its index covers every commit before it arrived, and was applied.
        assert read.commit_at_request <= index <= applied

    # Whatever was not served failed when its term ended, or is still pending.
    ended = {r.id for r in log if r.outcome}
    assert reads.pending == len(log) - len(ended)


def test_reads_are_served_once_a_majority_confirms_a_later_round_and_the_index_applied() -> None:
    reads = ReadIndex()
    reads.leading(7)
    served: list[int] = []
    reads.request(7, 10, True, lambda index, error: served.append(index))
    assert reads.ready(3, 10) == []  # no round yet
    r = reads.start_round()
    assert r == 1
    reads.ack("b", 0, 7)  # an older round: not a confirmation of this read
    assert reads.ready(3, 10) == []
    reads.ack("b", 1, 6)  # the right round, but of another term
    assert reads.ready(3, 10) == []
    reads.ack("b", 1, 7)
    assert reads.ready(3, 9) == []  # confirmed, not applied yet
    ready = reads.ready(3, 10)
    assert [index for _, index in ready] == [10]
    assert reads.pending == 0


def test_a_read_before_the_terms_first_commit_takes_the_later_commit_index() -> None:
    reads = ReadIndex()
    reads.leading(2)
    reads.request(2, 4, False, lambda index, error: None)
    reads.start_round()
    reads.ack("b", 1, 2)
    assert reads.ready(3, 4) == []  # index unknown until a term-2 entry commits
    reads.commit_advanced(2, 6, True)
    assert [index for _, index in reads.ready(3, 6)] == [6]


def test_a_term_change_fails_every_pending_read() -> None:
    reads = ReadIndex()
    reads.leading(3)
    reads.request(3, 1, True, lambda index, error: None)
    reads.request(3, 1, True, lambda index, error: None)
    assert len(reads.leading(4)) == 2
    assert reads.pending == 0
    with pytest.raises(ValueError, match="term 3 while leading term 4"):
        reads.request(3, 1, True, lambda index, error: None)

"""The raftkv target's reshard fault against a scripted shard manager (no
processes): which counts it alternates between, how it asks for a reshard
and waits for it, and what it reports for result.json."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from jepsen_lite import raftkv_target
from jepsen_lite.raftkv_target import RaftkvTarget, ReshardOptions
from jepsen_lite.target import FaultError
from raftkv.errors import BadRequest, Unavailable
from raftkv.localcluster import ClusterError
from raftkv.protocol.framing import FrameTooLarge

pytestmark = pytest.mark.timeout(30)

Answer = Any | Exception


class Manager:
    """A LocalCluster stand-in whose ``manager`` answers from a script per op
    (the last answer repeats); exceptions in the script are raised."""

    def __init__(self, logical_map: list[int], **script: list[Answer]) -> None:
        self.directory = Path("/nonexistent")
        self.node_ids = ["n1", "n2", "n3"]
        self.logical_map = logical_map
        self.script = script
        self.asked: list[dict[str, Any]] = []
        self.config = SimpleNamespace(dc_of=lambda node: f"dc{node[1:]}")

    def manager(self, msg: dict[str, Any], timeout_s: float = 10.0) -> Any:
        self.asked.append(msg)
        if msg["op"] == "cluster":
            return {"state": {"keyspaces": [
                {"name": "default", "logical_shards": len(self.logical_map),
                 "logical_map": self.logical_map}]}}
        answers = self.script[msg["op"]]
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def status(id_: int, state: str, *, before: list[int], moves: int = 8,
           stuck: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"id": id_, "state": state, "target": 2, "before": before, "moves_total": moves,
            "moves_done": moves if state == "done" else 0, "moves_aborted": 0, "keys": 5,
            "records": 1, "stuck": stuck or [], "removed_shards": [],
            "unavailable_ms": {"p50": 1.0, "p99": 2.0, "max": 2.0, "count": moves},
            "started_at": 100.0, "finished_at": 102.5 if state in ("done", "aborted") else None}


@pytest.fixture(autouse=True)
def no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(raftkv_target, "start_workers", lambda *a: [])
    monkeypatch.setattr(raftkv_target, "RESHARD_POLL_S", 0.0)
    monkeypatch.setattr(raftkv_target, "RESHARD_RETRY_S", 0.0)


def target(manager: Manager, **options: Any) -> RaftkvTarget:
    made = RaftkvTarget(manager, reshard=ReshardOptions(**options))  # type: ignore[arg-type]
    made.start()
    return made


@pytest.mark.parametrize(("logical_map", "counts", "turns"), [
    ([1] * 32, None, ["shards:2", "shards:1"]),  # 1 -> 2 -> 1
    ([1] * 16 + [2] * 16, None, ["shards:4", "shards:2"]),
    ([1, 2, 3, 4], None, ["shards:2", "shards:4"]),  # twice is more than the logical shards
    ([1] * 8 + [2] * 8, (2, 5), ["shards:5", "shards:2"]),
    ([1] * 16, (3, 5), ["shards:3", "shards:5"]),  # neither is the count now: the first first
])
def test_the_counts_alternate_away_from_the_count_now_and_back(
        logical_map: list[int], counts: tuple[int, int] | None, turns: list[str]) -> None:
    made = target(Manager(logical_map), shard_counts=counts)
    assert made.nemesis_targets()["reshard"] == turns


@pytest.mark.parametrize("counts", [(1, 64), (0, 2), (2, 2)])
def test_counts_the_keyspace_cannot_take_are_refused_at_start(counts: tuple[int, int]) -> None:
    with pytest.raises(ClusterError, match="cannot reshard"):
        target(Manager([1] * 32), shard_counts=counts)


def test_without_reshard_options_there_is_no_reshard_fault_and_nothing_to_report() -> None:
    made = RaftkvTarget(Manager([1] * 32))  # type: ignore[arg-type]
    made.start()
    assert "reshard" not in made.nemesis_targets()
    assert made.summary() == {}


def test_a_reshard_is_asked_for_retried_while_a_node_is_not_live_and_waited_for() -> None:
    manager = Manager([1] * 32, reshard=[
        BadRequest("new groups need 3 live nodes; 2 are live"), Unavailable("no leader"),
        status(1, "running", before=[1])],
        reshard_status=[status(1, "running", before=[1]),
                        FrameTooLarge(1380667953, 8388608),  # a Raft address as a hint
                        ClusterError("no answer"), status(1, "done", before=[1])])
    made = target(manager)
    assert made.inject("reshard", "shards:2") == \
        "reshard 1 of default: 1 -> 2 physical shards, 8 moves"
    assert [m["op"] for m in manager.asked].count("reshard") == 3
    assert made.heal("reshard", "shards:2") == \
        "done in 2.5 s: 8 moves (5 keys), 0 aborted; cutover max 2.0 ms"
    reshards = made.summary()["reshards"]
    assert (reshards["count"], reshards["completed"]) == (1, 1)
    assert reshards["each"][0]["duration_s"] == 2.5
    assert reshards["each"][0]["from"] == 1 and reshards["each"][0]["to"] == 2


def test_a_reshard_refused_because_another_runs_is_skipped() -> None:
    manager = Manager([1] * 32, reshard=[BadRequest(
        "keyspace 'default' is already being resharded to 2 physical shards (running)")])
    made = target(manager)
    with pytest.raises(FaultError, match=r"^skipped: keyspace 'default' is already being"):
        made.inject("reshard", "shards:2")
    assert made.summary()["reshards"]["count"] == 0


@pytest.mark.parametrize(("answers", "message"), [
    ([status(1, "running", before=[1], stuck=[{"move": 3, "error": "bad"}])],
     "moves need an operator"),
    ([status(2, "running", before=[1])], "was replaced by 2"),
    ([status(1, "running", before=[1])], "did not end within 0.2 s"),
])
def test_waiting_ends_in_a_fault_error_when_the_reshard_cannot_end(
        answers: list[Answer], message: str) -> None:
    manager = Manager([1] * 32, reshard=[status(1, "running", before=[1])],
                      reshard_status=answers)
    made = target(manager, finish_timeout_s=0.2)
    made.inject("reshard", "shards:2")
    with pytest.raises(FaultError, match=message):
        made.heal("reshard", "shards:2")
    assert made.summary()["reshards"]["completed"] == 0


def test_an_aborted_reshard_is_not_completed() -> None:
    manager = Manager([1] * 32, reshard=[status(1, "running", before=[1])],
                      reshard_status=[status(1, "aborted", before=[1])])
    made = target(manager)
    made.inject("reshard", "shards:2")
    assert made.heal("reshard", "shards:2").startswith("aborted in 2.5 s")
    assert made.summary()["reshards"]["completed"] == 0


def test_a_target_that_is_not_shards_n_is_refused() -> None:
    made = target(Manager([1] * 32))
    with pytest.raises(FaultError, match="expected shards:N"):
        made.inject("reshard", "2")

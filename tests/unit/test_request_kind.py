"""The request kinds a node's and a shard manager's status count requests by."""

from __future__ import annotations

import cbor2

from raftkv.protocol.messages import GetRequest, MoveReadRequest, MoveRequest, decode_request
from raftkv.server.rpc import request_kind
from shardmgr.service import ManagerRequest


def test_request_kinds() -> None:
    assert request_kind(GetRequest(1, 0, "default", b"k")) == "get"
    assert request_kind(MoveRequest(2, 0, "ingest", 1, 7, 3, {})) == "move:ingest"
    assert request_kind(MoveReadRequest(3, 0, 1, 7, b"", None, 1, 100, 0)) == "moveread"
    assert request_kind(ManagerRequest(4, "move_update", {})) == "move_update"


def test_every_write_op_counts_as_a_write() -> None:
    for op, extra in (("put", {"value": b"v"}), ("delete", {}),
                      ("cas", {"value": b"v", "expect": None})):
        body = cbor2.dumps({"id": 1, "op": op, "shard": 0, "key": b"k", "cid": b"c" * 16,
                            "seq": 1, "ack": 0, **extra})
        assert request_kind(decode_request(body)) == "write"

"""pysyncobj stops a SyncObj's tick thread as soon as the thread that created
it exits. Nodes open replicas from short-lived worker threads
(``trio.to_thread``), so a replica must outlive the thread that opened it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from raftkv.localcluster import free_port
from raftkv.replication.replica import Replica
from tests.replication.support import FAST, put_command, submit, wait_for


def test_a_replica_keeps_working_after_the_thread_that_opened_it_exits(tmp_path: Path) -> None:
    made: list[Replica] = []
    opener = threading.Thread(target=lambda: made.append(Replica(
        1, tmp_path / "r", f"127.0.0.1:{free_port()}", [], "test-secret", settings=FAST)))
    opener.start()
    opener.join()
    (replica,) = made
    try:
        wait_for(lambda: replica.is_leader)
        time.sleep(0.5)  # several ticks after the opener is gone
        result, error = submit(replica, put_command(1, b"k"), timeout_s=5.0)
        assert error is None and result is not None, (result, error)
        assert result[-1]["r"] == [None]
    finally:
        replica.destroy()

"""A log tail kept by the journal gets back the membership changes pysyncobj
reversed in it, on a real SyncObj's cluster configuration."""

from __future__ import annotations

from pathlib import Path

import pysyncobj.pickle as pysyncobj_pickle
import pytest

from raftkv.localcluster import free_port
from raftkv.replication.replica import Replica, reapply_membership
from tests.replication.support import FAST, wait_for

pytestmark = pytest.mark.timeout(30)
MEMBERSHIP = b"\x02"  # pysyncobj's _COMMAND_TYPE.MEMBERSHIP


def test_reapplied_membership_changes_restore_the_configuration(tmp_path: Path) -> None:
    single = Replica(0, tmp_path, f"127.0.0.1:{free_port()}", [], "s", settings=FAST)
    try:
        wait_for(lambda: single.is_leader)
        group = single._group
        newcomer = f"127.0.0.1:{free_port()}"
        add = MEMBERSHIP + pysyncobj_pickle.dumps(["add", newcomer, newcomer])
        regular = b"\x00" + pysyncobj_pickle.dumps((0, (b"payload",)))
        # pysyncobj reversed the 'add' when it "deleted" the tail; the journal
        # kept the tail, so it is applied again:
        assert reapply_membership(group, [(regular, 10, 1), (add, 11, 1)]) == 1
        assert newcomer in {n.address for n in group.otherNodes}
        # a tail without membership changes changes nothing
        assert reapply_membership(group, [(regular, 12, 1)]) == 0
        assert len(group.otherNodes) == 1
    finally:
        single.destroy()

"""CLI plumbing that needs no cluster."""

from __future__ import annotations

import pytest
import trio

from raftkv.errors import ClusterUnavailable
from raftkv_cli.common import run_trio


async def _fails_in_a_task() -> None:
    async def task() -> None:
        raise ClusterUnavailable("no shard manager answered")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(task)


async def _fails_with_something_else() -> None:
    async def task() -> None:
        raise KeyError("x")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(task)


def test_run_trio_unwraps_a_raftkv_error_from_a_nursery() -> None:
    # trio.run reports it wrapped: a command's `except RaftKVError` would miss it.
    with pytest.raises(BaseExceptionGroup):
        trio.run(_fails_in_a_task)
    with pytest.raises(ClusterUnavailable, match="no shard manager answered"):
        run_trio(_fails_in_a_task)
    with pytest.raises(BaseExceptionGroup):  # other errors stay as they are
        run_trio(_fails_with_something_else)

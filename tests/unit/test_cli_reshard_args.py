"""The copy pace and move limit that ``raftkv reshard`` and ``raftkv bench
reshard`` give the worker processes they start: what each worker's command
line parses to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest

from raftkv_cli.main import bench_reshard
from raftkv_cli.reshard import reshard, reshard_worker, worker_args
from shardmgr.reshard import COPY_KEYS_PER_S_DEFAULT


def parsed(command: click.Command, args: list[str]) -> dict[str, Any]:
    with command.make_context(command.name, args) as ctx:
        return dict(ctx.params)


def test_the_commands_that_start_workers_default_to_the_copy_pace() -> None:
    assert parsed(reshard, [])["max_keys_per_s"] == COPY_KEYS_PER_S_DEFAULT
    assert parsed(bench_reshard, [])["max_keys_per_s"] == COPY_KEYS_PER_S_DEFAULT
    assert COPY_KEYS_PER_S_DEFAULT > 0  # 0 would mean no limit


@pytest.mark.parametrize("pace, expected", [
    (COPY_KEYS_PER_S_DEFAULT, COPY_KEYS_PER_S_DEFAULT),
    (300.0, 300.0),
    (0.0, 0.0),  # no limit, passed on as such
    (None, COPY_KEYS_PER_S_DEFAULT),  # the worker's own default
])
def test_a_started_worker_gets_the_pace_it_was_given(pace: float | None,
                                                     expected: float) -> None:
    params = parsed(reshard_worker, worker_args(Path("/c"), "w-1", 3, pace, "INFO"))
    assert params["max_keys_per_s"] == expected
    assert params["max_moves_per_node"] == 3
    assert params["worker_id"] == "w-1"
    assert params["cluster_dir"] == Path("/c")
    assert params["log_level"] == "INFO"

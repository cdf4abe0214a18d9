"""Pieces every ``raftkv`` command uses: exit codes, errors, options, clients."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from raftkv.errors import PreconditionFailed, RaftKVError
from raftkv.localcluster import DEFAULT_DIR, LocalCluster

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"raftkv: {message}", err=True)
    sys.exit(code)


def cluster_dir_option(f: Any) -> Any:
    return click.option(
        "--cluster", "--dir", "cluster_dir", type=click.Path(file_okay=False, path_type=Path),
        default=lambda: os.environ.get("RAFTKV_CLUSTER", str(DEFAULT_DIR)),
        show_default="$RAFTKV_CLUSTER or ~/.raftkv/local",
        help="Cluster directory.",
    )(f)


def open_cluster(cluster_dir: Path) -> LocalCluster:
    try:
        return LocalCluster(cluster_dir)
    except Exception as exc:  # ConfigError and file errors: one line, exit 3
        fail(str(exc), EXIT_UNAVAILABLE)


# -- data commands -----------------------------------------------------------------

def value_options(f: Any) -> Any:
    f = click.option("--hex", "as_hex", is_flag=True, help="Values are hex-encoded bytes.")(f)
    return f


def decode_value(value: str, as_hex: bool) -> bytes:
    if as_hex:
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise click.BadParameter(f"not hex: {value!r}") from None
    return value.encode()


def keyspace_option(f: Any) -> Any:
    return click.option("--keyspace", "-k", default="default", show_default=True,
                        help="Keyspace to use.")(f)


def with_client(cluster_dir: Path, action: Any, keyspace: str = "default") -> Any:
    from raftkv.client import Client

    cluster = open_cluster(cluster_dir)
    try:
        with Client(cluster.client_addresses(), retry_budget_s=10.0, keyspace=keyspace,
                    watch_map=False) as kv:
            return action(kv)
    except PreconditionFailed as exc:
        current = exc.details.get("current")
        if not exc.details.get("current_known", True):
            fail("precondition failed (on a retry: the current value is not known)",
                 EXIT_NOT_FOUND)
        shown = "absent" if current is None else repr(bytes(current))[1:]
        fail(f"precondition failed: the key holds {shown}", EXIT_NOT_FOUND)
    except RaftKVError as exc:
        definite = "did not happen" if exc.definite else "may or may not have happened"
        code = EXIT_UNAVAILABLE if exc.code in (
            "CLUSTER_UNAVAILABLE", "TIMEOUT", "CONNECTION_LOST", "OUTCOME_UNKNOWN",
            "UNAVAILABLE") else EXIT_NOT_FOUND
        fail(f"{exc.code}: {exc.message} (the operation {definite})", code)


def run_trio(fn: Any, *args: Any) -> Any:
    """``trio.run``, with a RaftKVError raised inside a nursery unwrapped: trio
    reports a task's error in an ExceptionGroup, and a command reports it as
    its one line."""
    import trio

    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        found = group.subgroup(lambda e: isinstance(e, RaftKVError))
        if found is None:
            raise
        leaf: BaseException = found
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise leaf from group

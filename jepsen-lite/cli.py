"""The ``jepsen-lite`` command.

``jepsen-lite check FILE`` reads a history, checks it for linearizability and
prints the verdict. Exit codes:

* 0: linearizable
* 1: not linearizable (the key and a window of operations are printed)
* 2: unknown (the timeout passed first; never a pass)
* 3: input error (one line on stderr, naming the line of the input), including
  command-line usage errors, so that 2 always means "unknown"
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Final

import click

from jepsen_lite.checker import CheckResult, Counterexample, Model, Verdict, check, model_for
from jepsen_lite.checker.models import MODELS
from jepsen_lite.checker.wgl import CACHE_ENTRIES_MAX
from jepsen_lite.formats import FORMATS, load_history
from jepsen_lite.history import HistoryError, Operation, describe_operation

EXIT_LINEARIZABLE: Final = 0
EXIT_NOT_LINEARIZABLE: Final = 1
EXIT_UNKNOWN: Final = 2
EXIT_INPUT_ERROR: Final = 3

_EXIT: Final = {
    Verdict.LINEARIZABLE: EXIT_LINEARIZABLE,
    Verdict.NOT_LINEARIZABLE: EXIT_NOT_LINEARIZABLE,
    Verdict.UNKNOWN: EXIT_UNKNOWN,
}
_STATE_CHARS_MAX: Final = 72
# Logical shards of the cluster ``run`` starts: as ``raftkv up``, or fewer with
# the reshard nemesis (a reshard then moves tens of logical shards, not hundreds).
LOGICAL_SHARDS_DEFAULT: Final = 256
LOGICAL_SHARDS_RESHARD: Final = 32


class _InputUsageError(click.UsageError):
    """A command-line usage error; exits with 3, since 2 means "unknown"."""

    exit_code = EXIT_INPUT_ERROR


class _Cli(click.Group):
    """A group whose usage errors exit with 3 (2 is reserved for "unknown")."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise _InputUsageError(exc.format_message(), exc.ctx) from exc

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _InputUsageError(exc.format_message(), exc.ctx) from exc


@click.group(cls=_Cli)
def cli() -> None:
    """jepsen-lite: raftkv's consistency harness."""


@cli.command("check")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", *FORMATS]),
    default="auto",
    show_default=True,
    help="History format; auto detects it from the content.",
)
@click.option(
    "--model",
    type=click.Choice(list(MODELS)),
    default=None,
    help="Model to check against [default: the format's, else inferred from the ops].",
)
@click.option(
    "--timeout-s",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Give up (verdict unknown, exit 2) after this many seconds.",
)
@click.option(
    "--init",
    "init_json",
    default=None,
    metavar="JSON",
    help='Initial value as JSON (e.g. 0, null, "", {"x": 0}) '
    "[default: the format's, else absent].",
)
@click.option(
    "--read-nil",
    type=click.Choice(["absent", "unconstrained"]),
    default=None,
    help="An ok read of nil means the key is absent (default) or the value is unknown (knossos).",
)
@click.option(
    "--failed-cas",
    type=click.Choice(["observe", "drop"]),
    default=None,
    help="A failed CAS ran and found the compare false (observe), or did not happen (drop) "
    "[default: the format's; observe for JSONL and etcd logs, drop for knossos].",
)
@click.option(
    "--cache-entries-max",
    type=click.IntRange(min=1),
    default=CACHE_ENTRIES_MAX,
    show_default=True,
    help="Give up (verdict unknown, exit 2) when the search memo holds this many entries.",
)
@click.option(
    "--window",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="How many operations of the counterexample to show.",
)
def check_command(
    file: str,
    fmt: str,
    model: str | None,
    timeout_s: float,
    init_json: str | None,
    read_nil: str | None,
    failed_cas: str | None,
    cache_entries_max: int,
    window: int,
) -> None:
    """Check the history in FILE for linearizability."""
    started = time.monotonic()
    try:
        history = load_history(file, fmt)
        ops = history.operations()
        init: dict[str, Any] = {}
        if init_json is not None:
            try:
                init["init"] = json.loads(init_json)
            except json.JSONDecodeError as exc:
                raise click.BadParameter(f"not JSON: {exc.msg}", param_hint="--init") from exc
        chosen = model_for(
            ops,
            history.hints,
            name=model,
            read_nil=read_nil,  # type: ignore[arg-type]
            failed_cas=failed_cas,  # type: ignore[arg-type]
            **init,
        )
        result = check(ops, chosen, timeout_s=timeout_s, cache_entries_max=cache_entries_max)
    except HistoryError as exc:
        _input_error(f"{file}: {exc}")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        _input_error(f"{file}: {exc}")
    elapsed_s = time.monotonic() - started
    for line in render(result, chosen, history.format, elapsed_s, window):
        click.echo(line)
    sys.exit(_EXIT[result.verdict])


def _input_error(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_INPUT_ERROR)


def render(result: CheckResult, model: Model, fmt: str, elapsed_s: float, window: int) -> list[str]:
    """The report: the verdict line, a summary line, and for a violation its window."""
    verdict = {
        Verdict.LINEARIZABLE: "linearizable",
        Verdict.NOT_LINEARIZABLE: "NOT LINEARIZABLE",
        Verdict.UNKNOWN: "UNKNOWN (this is not a pass)",
    }[result.verdict]
    if result.verdict is Verdict.UNKNOWN:
        verdict += {
            "timeout": ": the timeout passed first",
            "cache-limit": ": the search memo reached --cache-entries-max",
        }.get(result.reason or "", "")
    lines = [
        verdict,
        f"  format {fmt}, model {model.name}, {result.partitions} partition(s), "
        f"{result.ops_checked} op(s) checked, {elapsed_s:.2f} s",
    ]
    if result.verdict is Verdict.UNKNOWN:
        keys = ", ".join(_key(k) for k in result.unresolved)
        lines.append(f"  still searching: {keys}")
    if result.counterexample is not None:
        lines += _render_counterexample(result.counterexample, model, window)
    return lines


def _render_counterexample(cx: Counterexample, model: Model, window: int) -> list[str]:
    lines = [f"  key {_key(cx.key)}: no linearization of its {cx.ops_total} operation(s)"]
    shown = list(zip(cx.prefix, cx.states, strict=True))[-window:]
    if cx.prefix:
        lines.append(
            f"  longest linearizable prefix: {len(cx.prefix)} op(s); the last {len(shown)}, "
            "with the state after each:"
        )
        lines += [f"    {_op(op)}  => {_state(model, st)}" for op, st in shown]
    else:
        lines.append("  longest linearizable prefix: empty")
    lines.append(f"  state after the prefix: {_state(model, cx.state)}")
    lines.append(f"  must come next (earliest return left): {_op(cx.blocking)}")
    stuck = sorted(cx.stuck, key=lambda t: (t[0] is not cx.blocking, t[0].call))
    lines.append(f"  could not be placed next ({len(stuck)} op(s) called before it returned):")
    for op, illegal in stuck[:window]:
        why = "illegal in this state" if illegal else "legal here, but every continuation fails"
        lines.append(f"    {_op(op)}  -- {why}")
    if len(stuck) > window:
        lines.append(f"    ... and {len(stuck) - window} more")
    return lines


def _op(op: Operation) -> str:
    return describe_operation(op)


def _key(key: Any) -> str:
    return "(single register)" if key is None else json.dumps(key)


def _state(model: Model, state: Any) -> str:
    text = model.describe_state(state)
    if len(text) > _STATE_CHARS_MAX:
        text = text[: _STATE_CHARS_MAX - 3] + "..."
    return text


@cli.command("run")
@click.option("--target", type=click.Choice(["raftkv", "etcd"]), default="raftkv",
              show_default=True)
@click.option("--workload", type=click.Choice(["register", "set"]), default="register",
              show_default=True)
@click.option("--nemesis", "nemesis_text", default="kill,partition", show_default=True,
              help="Comma-separated: kill, pause, partition, manager, reshard; or none.")
@click.option("--time-limit", "time_limit_s", type=click.FloatRange(min=1), default=30.0,
              show_default=True, help="Seconds of load with faults.")
@click.option("--concurrency", type=click.IntRange(1, 256), default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--rate", "rate_per_s", type=click.FloatRange(min=1), default=200.0,
              show_default=True, help="Operations per second, all clients together.")
@click.option("--cluster", "cluster_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="A running raftkv cluster to use (default: start one in "
              "OUT/cluster and stop it at the end).")
@click.option("--read-consistency", type=click.Choice(["strong", "eventual"]),
              default="strong", show_default=True,
              help="raftkv reads; eventual is deliberately not linearizable.")
@click.option("--check-timeout-s", type=click.FloatRange(min=1), default=120.0,
              show_default=True)
@click.option("--logical-shards", type=click.IntRange(1, 65536), default=None,
              help="Logical shards of keyspace default in the cluster the run starts "
              f"(default {LOGICAL_SHARDS_DEFAULT}, or {LOGICAL_SHARDS_RESHARD} with the reshard "
              "nemesis, so that a reshard moves few enough to end within seconds).")
@click.option("--reshard-shards", "reshard_shards_text", default=None, metavar="A,B",
              help="The reshard nemesis alternates between A and B physical shards "
              "(default: the count at the start and twice that).")
@click.option("--reshard-workers", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Resharding worker processes the run starts (reshard nemesis).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Where history.jsonl, result.json and the plots go.")
def run_command(
        target: str, workload: str, nemesis_text: str, time_limit_s: float, concurrency: int,
        seed: int, rate_per_s: float, cluster_dir: Path | None, read_consistency: str,
        check_timeout_s: float, logical_shards: int | None, reshard_shards_text: str | None,
        reshard_workers: int, out_dir: Path) -> None:
    """Run a workload with faults against a target, check it, write a report.

    Exit code: the checker's (0 linearizable, 1 not, 2 unknown, also when the
    run failed before a verdict); 3 when the run could not be set up."""
    from jepsen_lite import runner
    from jepsen_lite.nemesis import parse_nemeses

    try:
        nemeses = parse_nemeses(nemesis_text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--nemesis") from exc
    if logical_shards is not None and logical_shards & (logical_shards - 1):
        raise click.BadParameter("must be a power of two", param_hint="--logical-shards")
    reshard_shards = _shard_pair(reshard_shards_text)
    if target == "etcd" and (workload != "register" or read_consistency != "strong"):
        raise click.BadParameter("etcd runs the register workload with strong reads",
                                 param_hint="--target")
    config = runner.RunConfig(workload=workload, nemeses=tuple(nemeses),
                              time_limit_s=time_limit_s, concurrency=concurrency, seed=seed,
                              rate_per_s=rate_per_s, check_timeout_s=check_timeout_s)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if target == "etcd":
            result = _run_etcd(config, out_dir)
        else:
            reshard = None
            if "reshard" in nemeses:
                from jepsen_lite.raftkv_target import ReshardOptions

                reshard = ReshardOptions(shard_counts=reshard_shards, workers=reshard_workers)
            if logical_shards is None:
                logical_shards = LOGICAL_SHARDS_RESHARD if reshard else LOGICAL_SHARDS_DEFAULT
            result = _run_raftkv(config, out_dir, cluster_dir, read_consistency,
                                 logical_shards=logical_shards, reshard=reshard)
    except _SetupError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_INPUT_ERROR)
    except Exception:  # a harness failure says nothing of the system: not exit 1
        import traceback

        traceback.print_exc()
        click.echo(f"error: the run failed before a verdict (unknown, never a pass); the "
                   f"history so far is in {out_dir / 'history.jsonl'}", err=True)
        sys.exit(EXIT_UNKNOWN)
    ops = result.get("outcomes", {})
    click.echo(f"{result['verdict'].upper()}  {result['target']} {workload}, "
               f"nemesis {','.join(nemeses) or 'none'}, {time_limit_s:g} s: "
               f"ok {ops.get('ok', 0)}, fail {ops.get('fail', 0)}, info {ops.get('info', 0)}; "
               f"{len(result.get('faults', []))} faults")
    for line in result.get("check", {}).get("report", []):
        click.echo(line)
    reshards = result.get("reshards")
    if reshards:
        click.echo(f"reshards: {reshards['count']} requested, {reshards['completed']} completed "
                   "(" + ", ".join(f"{r['from']}->{r['to']} {r['state']}"
                                   + (f" {r['duration_s']:.1f} s" if "duration_s" in r else "")
                                   for r in reshards["each"]) + ")")
    click.echo(f"report in {out_dir}")
    sys.exit(runner.EXIT_CODES[result["verdict"]])


class _SetupError(Exception):
    """The system under test could not be started (or found)."""


def _shard_pair(text: str | None) -> tuple[int, int] | None:
    """``--reshard-shards 2,4`` -> (2, 4)."""
    if text is None:
        return None
    try:
        first, second = (int(part) for part in text.split(","))
    except ValueError:
        raise click.BadParameter("give two physical shard counts, e.g. 2,4",
                                 param_hint="--reshard-shards") from None
    if first < 1 or second < 1 or first == second:
        raise click.BadParameter("two different counts of at least 1",
                                 param_hint="--reshard-shards")
    return first, second


def _run_raftkv(config: Any, out_dir: Path, cluster_dir: Path | None,
                read_consistency: str, *, logical_shards: int,
                reshard: Any) -> dict[str, Any]:
    from jepsen_lite import runner
    from jepsen_lite.raftkv_target import RaftkvTarget
    from raftkv.localcluster import ClusterError, LocalCluster

    owned = cluster_dir is None
    try:
        if owned:
            directory = out_dir / "cluster"
            if directory.exists():
                import shutil

                shutil.rmtree(directory)
            cluster = LocalCluster.create(directory, logical_shards=logical_shards)
            cluster.start()
        else:
            assert cluster_dir is not None
            cluster = LocalCluster(cluster_dir)
            cluster.wait_ready(timeout_s=30)
    except (ClusterError, OSError, ValueError) as exc:
        raise _SetupError(f"raftkv cluster: {exc}") from exc
    target = RaftkvTarget(cluster, read_consistency=read_consistency, reshard=reshard)
    try:
        try:
            target.start()  # the resharding workers, with the reshard nemesis
        except (ClusterError, OSError, ValueError) as exc:
            raise _SetupError(f"raftkv resharding: {exc}") from exc
        return runner.run(target, config, out_dir, {
            "read_consistency": read_consistency, "cluster": str(cluster.directory),
            **({"logical_shards": logical_shards} if owned else {})})
    finally:
        target.close()
        if owned:
            cluster.stop()


def _run_etcd(config: Any, out_dir: Path) -> dict[str, Any]:
    from jepsen_lite import etcd, runner

    if "reshard" in config.nemeses:
        raise _SetupError("the reshard nemesis needs --target raftkv: etcd has no shards to "
                          "split or merge")
    try:
        binary = etcd.ensure_etcd()
    except etcd.EtcdUnavailable as exc:
        raise _SetupError(str(exc)) from exc
    cluster = etcd.EtcdCluster(out_dir / "etcd", binary=binary)
    try:
        try:
            cluster.start()
        except Exception as exc:
            raise _SetupError(f"etcd did not start: {exc}") from exc
        return runner.run(etcd.EtcdTarget(cluster), config, out_dir,
                          {"etcd_binary": str(binary)})
    finally:
        cluster.stop()


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()

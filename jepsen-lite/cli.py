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
def check_command(  # noqa: PLR0917 - click passes options positionally
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


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()

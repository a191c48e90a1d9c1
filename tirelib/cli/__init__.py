"""The ``tirelib`` command line: one Typer app, one module per command group.

Every command calls the same library functions the Airflow tasks call, so each step of the
pipeline runs without Airflow. The command never shows a traceback: every outcome ends with an
exit status of :class:`~tirelib.cli.exit_codes.ExitCode` and, on failure, one line on stderr
(an error tirelib raised on purpose: its message; Ctrl-C: ``interrupted``; anything else: a line
naming the error and the log file that holds its traceback).
"""

from __future__ import annotations

import logging
import sys
import traceback
from datetime import UTC, datetime
from pathlib import Path

import typer

from tirelib.cli import data, demo, monitor, predict, registry, serve, stack, train
from tirelib.cli.exit_codes import ExitCode, exit_code
from tirelib.errors import TirelibError
from tirelib.logs import LOG_FORMAT, install_redaction, quiet_libraries
from tirelib.settings import get_settings
from tirelib.urls import mask_credentials

app = typer.Typer(
    name="tirelib",
    help="Tire-defect classification: local stack, data lake, training, registry, serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(stack.app, name="stack")
app.add_typer(data.app, name="data")
app.add_typer(registry.app, name="registry")
app.command()(train.train)
app.command()(train.evaluate)
app.command()(train.models)
app.command()(demo.demo)
app.command()(serve.serve)
app.command()(predict.predict)
app.command()(monitor.monitor)

# The earlier system's commands: `python -m tirelib Train --dataset_version split_1 ...`,
# `Stage Loss`, `Produce Loss`, `ProductionInfo`.
LEGACY_COMMANDS = {
    "Train": ["train"],
    "Stage": ["registry", "stage"],
    "Produce": ["registry", "produce"],
    "ProductionInfo": ["registry", "info"],
}
# Legacy commands whose first bare argument is the value of an option (`Stage Loss`).
LEGACY_POSITIONAL = {"Stage": "--metric", "Produce": "--metric"}


def translate_legacy(argv: list[str]) -> list[str]:
    """Map the earlier system's spelling (``Train --model_type cnn``, ``Stage Loss``) onto
    today's commands."""
    if not argv or argv[0] not in LEGACY_COMMANDS:
        return argv
    rest = [
        arg.replace("_", "-") if arg.startswith("--") and "=" not in arg else _legacy_eq(arg)
        for arg in argv[1:]
    ]
    option = LEGACY_POSITIONAL.get(argv[0])
    if option is not None and rest and not rest[0].startswith("-"):
        rest = [option, *rest]
    return [*LEGACY_COMMANDS[argv[0]], *rest]


def _legacy_eq(arg: str) -> str:
    if arg.startswith("--"):
        name, _, value = arg.partition("=")
        return f"{name.replace('_', '-')}={value}"
    return arg


@app.callback()
def _setup(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
) -> None:
    """Configure logging once, at the entry point (never at import)."""
    install_redaction()  # no log line shows a credential, whichever handler writes it
    level = logging.DEBUG if verbose else getattr(logging, get_settings().log_level)
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger().setLevel(level)  # also where a handler was installed before
    quiet_libraries()  # third-party clients are chatty at INFO; keep their warnings only


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tirelib`` script and ``python -m tirelib``."""
    args = translate_legacy(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=args, standalone_mode=True)
    except SystemExit as done:  # Typer turns Ctrl-C inside a command into exit status 130
        if done.code == ExitCode.INTERRUPTED:
            _say_interrupted(done)
        raise
    except KeyboardInterrupt as interrupt:
        _say_interrupted(interrupt)
        raise SystemExit(ExitCode.INTERRUPTED) from None
    except TirelibError as error:
        typer.secho(f"error: {mask_credentials(str(error))}", err=True, fg=typer.colors.RED)
        raise SystemExit(exit_code(error)) from None
    except Exception as error:  # a bug: one line here, the traceback in the log file
        _report_unexpected(error, args)
        raise SystemExit(ExitCode.INTERNAL) from None


def _say_interrupted(error: BaseException) -> None:
    """``interrupted``, with what the interrupted work said (an upload: what it sent)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, KeyboardInterrupt):
            detail = str(current)
            typer.secho(f"interrupted: {detail}" if detail else "interrupted", err=True)
            return
        current = current.__cause__ or current.__context__
    typer.secho("interrupted", err=True)


def _report_unexpected(error: Exception, args: list[str]) -> None:
    text = mask_credentials("".join(traceback.format_exception(error)))
    head = mask_credentials(f"{type(error).__name__}: {error}".splitlines()[0])[:300]
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        sys.stderr.write(text)
        where = "above"
    else:
        saved = _save_traceback(text, args)
        if saved is None:
            sys.stderr.write(text)
            where = "above"
        else:
            where = f"in {saved}; -v shows it here"
    typer.secho(
        f"error: unexpected {head} (a bug in tirelib: the traceback is {where})",
        err=True,
        fg=typer.colors.RED,
    )


def _save_traceback(text: str, args: list[str]) -> Path | None:
    """Append ``text`` to ``<TIRE_HOME>/logs/cli-errors.log``; its path, or None if it failed."""
    try:
        path = get_settings().home / "logs" / "cli-errors.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        command = mask_credentials(" ".join(["tirelib", *args]))
        with path.open("a", encoding="utf-8", errors="backslashreplace") as log:
            log.write(f"--- {datetime.now(UTC).isoformat(timespec='seconds')} {command}\n{text}\n")
    except (OSError, TirelibError):
        return None
    return path.resolve()

"""The ``tirelib`` command line: one Typer app, one module per command group.

Every command calls the same library functions the Airflow tasks call, so each step of the
pipeline runs without Airflow. Errors a user can cause (:class:`~tirelib.errors.TirelibError`)
end with a one-line message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import logging
import sys

import typer

from tirelib.cli import data, demo, registry, serve, stack, train
from tirelib.errors import TirelibError
from tirelib.logs import quiet_libraries
from tirelib.settings import get_settings

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
    level = logging.DEBUG if verbose else getattr(logging, get_settings().log_level)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    quiet_libraries()  # third-party clients are chatty at INFO; keep their warnings only


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tirelib`` script and ``python -m tirelib``."""
    args = translate_legacy(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=args, standalone_mode=True)
    except TirelibError as error:
        typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
        raise SystemExit(2) from None

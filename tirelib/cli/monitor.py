"""``tirelib monitor``: the monitoring DAG's check, run now from the command line."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from tirelib.cli.exit_codes import ExitCode
from tirelib.settings import get_settings


def monitor(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON (what the DAG returns).")
    ] = False,
) -> None:
    """Check the production version now: its live prediction mix, confidence, brightness and
    contrast against its baseline (PSI), and its live accuracy from feedback against the floor.

    Reads Prometheus (TIRE_PROMETHEUS_URL), as the hourly tire_model_monitoring DAG does; tells
    Slack when a threshold is crossed and rolls back when TIRE_AUTO_ROLLBACK allows it. Exits 1
    when a threshold is crossed, 0 when all is well or there is too little traffic to judge.
    """
    from tirelib import monitoring

    report = monitoring.check(get_settings())
    if as_json:
        typer.echo(json.dumps(report.summary(), indent=1, sort_keys=True))
    elif report.version is None:
        typer.echo("; ".join(report.notes) or "no production version: nothing to monitor")
    else:
        lines = report.message().splitlines()
        verdict = "a threshold was crossed" if report.alert else "within every threshold"
        typer.echo(f"{report.model_name} version {report.version}: {verdict}")
        typer.echo("\n".join(lines[1:]))
    if report.alert:
        raise typer.Exit(ExitCode.REFUSED)

"""`tirelib stack`: start, stop and inspect the local servers (SeaweedFS S3, MLflow, Prometheus,
Alertmanager, the Pushgateway, the model server, Airflow).

State lives in ``<TIRE_HOME>/stack``: one pid file per server and its log in ``logs/``.
``status`` exits 0 when every server runs and answers, 1 otherwise, so scripts can wait on it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from tirelib.settings import get_settings, load_settings
from tirelib.stack import ComponentStatus, Stack, airflow_password, airflow_url

app = typer.Typer(
    help="Start, stop and inspect the local stack on 127.0.0.1: SeaweedFS S3, MLflow, "
    "Prometheus, Alertmanager and the Pushgateway (when installed), the model server, Airflow.",
    no_args_is_help=True,
)


def _line(status: ComponentStatus, state: str) -> str:
    return f"{status.title:<16} {status.url:<24} {state}"


class Executor(StrEnum):
    """Airflow's executor: ``local`` runs ``airflow standalone``; ``celery`` runs each component,
    a worker for the ``default`` queue and one for the training queue (Redis, PostgreSQL)."""

    local = "local"
    celery = "celery"

    @property
    def setting(self) -> str:
        """The value of ``TIRE_AIRFLOW_EXECUTOR`` it stands for."""
        return f"{self.value.capitalize()}Executor"


@app.command()
def up(
    executor: Annotated[
        Executor | None,
        typer.Option(
            help="Airflow's executor (default: TIRE_AIRFLOW_EXECUTOR). celery needs Redis "
            "(TIRE_CELERY_BROKER_URL) and PostgreSQL (TIRE_AIRFLOW_DATABASE_URL).",
            case_sensitive=False,
        ),
    ] = None,
) -> None:
    """Start the servers that are not running and wait until each answers."""
    settings = get_settings()
    if executor is not None:
        settings = load_settings(airflow_executor=executor.setting)
    stack = Stack(settings)
    for status in stack.up():
        typer.echo(_line(status, status.describe()))
    typer.echo(f"logs: {stack.settings.stack_dir / 'logs'}")
    if any(component.name.startswith("airflow") for component in stack):
        password = airflow_password(stack.settings)
        where = stack.settings.resolved_airflow_home / "simple_auth_manager_passwords.json"
        typer.echo(
            f"Airflow UI: {airflow_url(stack.settings)}  user admin, password {password} "
            f"(kept in {where})"
        )
    exports = stack.exports()
    if exports:
        typer.echo("to use this stack from a shell, export:")
        for name, value in exports.items():
            typer.echo(f"  export {name}={value}")


@app.command()
def down() -> None:
    """Stop the servers, last started first (by the pids they were started with)."""
    for status, pid in Stack(get_settings()).down():
        state = f"stopped (pid {pid})" if pid is not None else "was not running"
        typer.echo(_line(status, state))


@app.command()
def status() -> None:
    """Show each server's state; exit 0 when all run and answer, else 1."""
    statuses = Stack(get_settings()).status()
    for item in statuses:
        typer.echo(_line(item, item.describe()))
    raise typer.Exit(0 if all(item.up for item in statuses) else 1)

"""The local stack: its servers, started in order and stopped in reverse.

With ``TIRE_PGPOOL=1`` PgPool starts before MLflow, in front of ``TIRE_DATABASE_URL``.

``tirelib stack up|down|status`` calls :class:`Stack`. A stack is an ordered list of
:class:`~tirelib.stack.process.Component` objects, so later servers (the model server, say) join
by adding a component.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from tirelib.settings import Settings
from tirelib.stack.airflow import airflow_component
from tirelib.stack.pgpool import pgpool_component
from tirelib.stack.process import Component, ComponentStatus
from tirelib.stack.services import mlflow_component, mlflow_url, s3_url, seaweedfs_component


class Stack:
    """The local servers, started in order and stopped in reverse."""

    def __init__(
        self,
        settings: Settings,
        components: Sequence[Component] | None = None,
        *,
        mlflow_workers: int = 1,
    ) -> None:
        self.settings = settings
        if components is None:
            components = [seaweedfs_component(settings)]
            if settings.pgpool:  # MLflow's backend connects through it (client_database_url)
                components.append(pgpool_component(settings))
            components.append(
                mlflow_component(settings, s3_endpoint_url=s3_url(settings), workers=mlflow_workers)
            )
            if settings.stack_with_airflow:
                components.append(airflow_component(settings))
        self.components = list(components)

    def __iter__(self) -> Iterator[Component]:
        return iter(self.components)

    def up(self) -> list[ComponentStatus]:
        """Start what is not running, wait until each answers; return every status."""
        self.settings.stack_dir.mkdir(parents=True, exist_ok=True)
        for component in self.components:
            component.up()
        return self.status()

    def down(self) -> list[tuple[ComponentStatus, int | None]]:
        """Stop every component, last first; return each with the pid stopped (or None)."""
        results = []
        for component in reversed(self.components):
            before = component.status()
            results.append((before, component.down()))
        return results

    def status(self) -> list[ComponentStatus]:
        return [component.status() for component in self.components]

    def exports(self) -> dict[str, str]:
        """Environment variables a shell needs so tirelib talks to this stack.

        Empty when the settings already point at it (the defaults do).
        """
        wanted = {
            "TIRE_S3_ENDPOINT_URL": (s3_url(self.settings), self.settings.s3_endpoint_url),
            "MLFLOW_TRACKING_URI": (
                mlflow_url(self.settings),
                self.settings.mlflow_tracking_uri.rstrip("/"),
            ),
        }
        return {name: url for name, (url, current) in wanted.items() if url != current}

    def log_files(self) -> list[Path]:
        return [component.process.log_path for component in self.components]

"""The local stack: its servers, started in order and stopped in reverse.

In order: SeaweedFS, PgPool (with ``TIRE_PGPOOL=1``, in front of ``TIRE_DATABASE_URL``), MLflow,
the Pushgateway, Alertmanager and Prometheus (``TIRE_STACK_WITH_MONITORING``, those installed),
the model server (``TIRE_STACK_WITH_SERVER``) and Airflow (``TIRE_STACK_WITH_AIRFLOW``). Airflow
comes last, so the servers its tasks use answer before its first task runs; when the stack runs
a Pushgateway, Airflow's tasks push to it unless ``TIRE_PUSHGATEWAY_URL`` names another, and
Prometheus's API is the stack's own unless ``TIRE_PROMETHEUS_URL`` was set.

``tirelib stack up|down|status`` calls :class:`Stack`. A stack is an ordered list of
:class:`~tirelib.stack.process.Component` objects, so later servers (the model server, say) join
by adding a component.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from tirelib.settings import Settings
from tirelib.stack.airflow import airflow_component
from tirelib.stack.celery import CELERY_EXECUTOR, celery_components
from tirelib.stack.monitoring import monitoring_components, prometheus_url, pushgateway_url
from tirelib.stack.pgpool import pgpool_component
from tirelib.stack.process import Component, ComponentStatus
from tirelib.stack.services import mlflow_component, mlflow_url, s3_url, seaweedfs_component
from tirelib.stack.serving import server_component


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
            monitoring = monitoring_components(settings) if settings.stack_with_monitoring else []
            components += monitoring
            if settings.stack_with_server:
                components.append(server_component(settings))
            if settings.stack_with_airflow:
                components += airflow_components(_for_tasks(settings, monitoring))
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
        """Stop every component, last first; return each with the pid stopped (or None).

        Airflow's components of the other executor's layout are stopped too when they run, so
        ``down`` needs no flag to stop what ``up --executor`` started (``status`` shows them).
        """
        results = []
        for component in reversed([*self.components, *self._other_layout_running()]):
            before = component.status()
            results.append((before, component.down()))
        return results

    def status(self) -> list[ComponentStatus]:
        others = self._other_layout_running()
        own = self.components
        if others:  # started with the other executor: show its Airflow, not this one's absence
            own = [c for c in own if c.name != "airflow" and not c.name.startswith("airflow-")]
        return [component.status() for component in [*own, *others]]

    def _other_layout_running(self) -> list[Component]:
        """Airflow's components of the other executor's layout that have a pid file."""
        if not self.settings.stack_with_airflow:
            return []
        names = {component.name for component in self.components}
        return [
            component
            for component in _other_airflow_layout(self.settings)
            if component.name not in names and component.process.read_pid_file() is not None
        ]

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


def _for_tasks(settings: Settings, monitoring: Sequence[Component]) -> Settings:
    """``settings`` as Airflow's tasks get them: pointed at the stack's Pushgateway and
    Prometheus when it runs them and the user named no others."""
    names = {component.name for component in monitoring}
    update: dict[str, str] = {}
    if "pushgateway" in names and settings.pushgateway_url is None:
        update["pushgateway_url"] = pushgateway_url(settings)
    if "prometheus" in names and "prometheus_url" not in settings.model_fields_set:
        update["prometheus_url"] = prometheus_url(settings)
    return settings.model_copy(update=update) if update else settings


def airflow_components(settings: Settings) -> list[Component]:
    """Airflow as the settings' executor runs it: ``airflow standalone`` for LocalExecutor, or
    each component and a worker per queue for CeleryExecutor."""
    if settings.airflow_executor == CELERY_EXECUTOR:
        return celery_components(settings)
    return [airflow_component(settings)]


def _other_airflow_layout(settings: Settings) -> list[Component]:
    if settings.airflow_executor == CELERY_EXECUTOR:
        return [airflow_component(settings)]
    return celery_components(settings, check=False)

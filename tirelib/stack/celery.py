"""Airflow on CeleryExecutor in the local stack: each component a process, a worker per queue.

``airflow standalone`` insists on a local executor, so with CeleryExecutor the stack runs
Airflow's components as processes of their own, in the layout a team deploys: api-server,
scheduler, dag-processor and triggerer, a Celery worker for the ``default`` queue and one for
the training queue (``TIRE_TRAINING_QUEUE``). The broker is Redis (``TIRE_CELERY_BROKER_URL``);
the metadata database must be PostgreSQL (``TIRE_AIRFLOW_DATABASE_URL``), and Celery keeps its
results there too unless ``TIRE_CELERY_RESULT_BACKEND`` says otherwise.

Each worker records its own name as the hostname of the task instances it runs
(``[core] hostname_callable`` is :func:`worker_hostname`), so two workers on one machine can be
told apart in the UI and in the metadata database.
"""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from tirelib.errors import ConfigurationError, StackError
from tirelib.settings import Settings, get_settings
from tirelib.stack.airflow import (
    TRAINING_POOL,
    airflow_command,
    airflow_env,
    airflow_url,
    create_pool,
    render_airflow_config,
)
from tirelib.stack.ports import HttpCheck
from tirelib.stack.process import Component, ManagedProcess
from tirelib.urls import is_postgresql, masked_url

DEFAULT_QUEUE = "default"
CELERY_EXECUTOR = "CeleryExecutor"
HOSTNAME_CALLABLE = "tirelib.stack.celery.worker_hostname"


def worker_hostname() -> str:
    """The hostname a task instance records: the Celery worker's name, else the machine's."""
    return get_settings().celery_worker_name or socket.getfqdn()


def check_celery_settings(settings: Settings) -> None:
    """Refuse a CeleryExecutor stack that cannot work: its metadata database must be PostgreSQL."""
    if not is_postgresql(settings.airflow_database_url):
        given = settings.airflow_database_url
        shown = f"it is {masked_url(given)!r}" if given else "it is not set"
        raise ConfigurationError(
            "CeleryExecutor needs a PostgreSQL metadata database shared by every component: set "
            "TIRE_AIRFLOW_DATABASE_URL=postgresql+psycopg2://user@host/airflow "
            f"({shown}; SQLite allows one process only)"
        )


def check_broker(settings: Settings, timeout: float = 5.0) -> None:
    """Raise :class:`StackError` unless the Redis broker answers a PING."""
    import redis

    url = settings.celery_broker_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return  # another broker (RabbitMQ, SQS): Celery itself reports what is wrong
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
    except redis.RedisError as error:
        raise StackError(
            f"the Celery broker at {masked_url(url)} does not answer ({error}); start Redis "
            "or set TIRE_CELERY_BROKER_URL"
        ) from error
    finally:
        client.close()


def celery_env(settings: Settings) -> dict[str, str]:
    """Airflow's environment for CeleryExecutor (the rest of its configuration is airflow.cfg)."""
    env = airflow_env(settings)
    env["AIRFLOW__CORE__HOSTNAME_CALLABLE"] = HOSTNAME_CALLABLE
    return env


@dataclass(frozen=True)
class HealthCheck:
    """Readiness of a component by Airflow's health endpoint (its heartbeat is recent)."""

    url: str
    component: str
    timeout: float = 2.0

    def __call__(self) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.url, timeout=self.timeout) as response:
                health = json.load(response)
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return bool((health.get(self.component) or {}).get("status") == "healthy")


@dataclass(frozen=True)
class LogLineCheck:
    """Readiness by a line a process writes to its log (since its start) once it is ready."""

    process: ManagedProcess
    text: str

    def __call__(self) -> bool:
        return self.text in self.process.log_tail(lines=200)


def _migrate(settings: Settings) -> None:
    done = subprocess.run(
        [*airflow_command(), "db", "migrate"],
        env=celery_env(settings),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise StackError(f"airflow db migrate failed: {done.stderr[-2000:]}")


def worker_name(queue: str) -> str:
    """The Celery hostname of the stack's worker for ``queue``: ``<queue>@<machine>``."""
    return f"{queue}@{socket.gethostname()}"


def celery_components(
    settings: Settings, *, check: bool = True, training_slots: int = 1
) -> list[Component]:
    """Airflow's components on CeleryExecutor, in start order, then a worker per queue.

    ``check=False`` builds them without checking the settings (to stop or inspect them).
    """
    if check:
        check_celery_settings(settings)
    if settings.airflow_executor != CELERY_EXECUTOR:
        settings = settings.model_copy(update={"airflow_executor": CELERY_EXECUTOR})
    state_dir = settings.stack_dir.absolute()
    home = settings.resolved_airflow_home.absolute()
    url = airflow_url(settings)
    health = f"{url}/api/v2/monitor/health"
    env = celery_env(settings)

    def process(
        name: str, title: str, args: list[str], ready: Callable[[], bool] | None, **extra: object
    ) -> ManagedProcess:
        return ManagedProcess(
            f"airflow-{name}",
            lambda: [*airflow_command(), *args],
            state_dir=state_dir,
            ready=ready,
            env={**env, **{key: str(value) for key, value in extra.items()}},
            cwd=home,
            title=title,
            url=url if name == "api-server" else "",
            ports=(settings.airflow_port,) if name == "api-server" else (),
        )

    def prepare() -> None:
        check_celery_settings(settings)
        check_broker(settings)
        render_airflow_config(settings)
        _migrate(settings)

    components = [
        Component(
            process("api-server", "Airflow API", ["api-server"], HttpCheck(health, status=200)),
            ready_timeout=180.0,
            stop_timeout=30.0,
            before_start=prepare,
            after_ready=lambda: create_pool(
                settings, TRAINING_POOL, training_slots, "Concurrent training tasks"
            ),
        ),
        Component(
            process("scheduler", "Scheduler", ["scheduler"], HealthCheck(health, "scheduler")),
            ready_timeout=180.0,
            stop_timeout=30.0,
        ),
        Component(
            process(
                "dag-processor",
                "DAG processor",
                ["dag-processor"],
                HealthCheck(health, "dag_processor"),
            ),
            ready_timeout=180.0,
            stop_timeout=30.0,
        ),
        Component(
            # Logs are files on this machine, read by the api-server: no log server needed.
            process(
                "triggerer",
                "Triggerer",
                ["triggerer", "--skip-serve-logs"],
                HealthCheck(health, "triggerer"),
            ),
            ready_timeout=180.0,
            stop_timeout=30.0,
        ),
    ]
    queues = [(DEFAULT_QUEUE, settings.celery_worker_concurrency)]
    if settings.training_queue != DEFAULT_QUEUE:
        queues.append((settings.training_queue, training_slots))
    for queue, concurrency in queues:
        name = worker_name(queue)
        worker = process(
            f"worker-{queue}",
            f"Worker {queue}",
            [
                "celery",
                "worker",
                "--queues",
                queue,
                "--concurrency",
                str(concurrency),
                "--celery-hostname",
                name,
                "--skip-serve-logs",
            ],
            None,
            TIRE_CELERY_WORKER_NAME=name,
        )
        # Celery logs "<name> ready." once it consumes from the broker.
        worker.ready = LogLineCheck(worker, f"{name} ready.")
        components.append(Component(worker, ready_timeout=180.0, stop_timeout=60.0))
    return components

"""The CeleryExecutor layout of the local stack, as built from settings (no server started)."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tirelib.cli.exit_codes import ExitCode
from tirelib.errors import ConfigurationError, StackError
from tirelib.settings import load_settings, reset_settings
from tirelib.stack import (
    ManagedProcess,
    Stack,
    celery_components,
    check_broker,
    free_port,
    render_airflow_config,
    worker_name,
)
from tirelib.stack.celery import worker_hostname

pytestmark = pytest.mark.unit

POSTGRES = "postgresql://airflow@db.internal/airflow"


def _argv(component: object) -> list[str]:
    argv = component.process.argv  # type: ignore[attr-defined]
    return [str(part) for part in argv()]


def test_celery_runs_each_component_and_a_worker_per_queue(tmp_path: Path) -> None:
    settings = load_settings(
        home=tmp_path, airflow_database_url=POSTGRES, training_queue="gpu", airflow_port=18080
    )
    components = celery_components(settings)
    names = [component.name for component in components]
    assert names == [
        "airflow-api-server",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker-default",
        "airflow-worker-gpu",
    ]
    assert len({component.process.pid_path for component in components}) == len(components)
    assert len({component.process.log_path for component in components}) == len(components)
    workers = {component.name: component for component in components[-2:]}
    default, gpu = (_argv(workers[f"airflow-worker-{q}"]) for q in ("default", "gpu"))
    assert default[default.index("--queues") + 1] == "default"
    assert gpu[gpu.index("--queues") + 1] == "gpu"
    assert gpu[gpu.index("--celery-hostname") + 1] == worker_name("gpu")
    assert default[default.index("--celery-hostname") + 1] == worker_name("default")
    assert gpu[gpu.index("--concurrency") + 1] == "1"
    # The name the worker gives Celery is the hostname its tasks record.
    env = workers["airflow-worker-gpu"].process.env or {}
    assert env["TIRE_CELERY_WORKER_NAME"] == worker_name("gpu")
    assert env["AIRFLOW__CORE__HOSTNAME_CALLABLE"] == "tirelib.stack.celery.worker_hostname"


def test_the_training_queue_on_default_needs_one_worker(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path, airflow_database_url=POSTGRES, training_queue="default")
    assert [c.name for c in celery_components(settings)][-1] == "airflow-worker-default"


@pytest.mark.parametrize("database", [None, "sqlite:////tmp/airflow.db"])
def test_celery_refuses_a_metadata_database_other_than_postgresql(
    tmp_path: Path, database: str | None
) -> None:
    settings = load_settings(
        home=tmp_path, airflow_database_url=database, airflow_executor="CeleryExecutor"
    )
    with pytest.raises(ConfigurationError, match="TIRE_AIRFLOW_DATABASE_URL"):
        celery_components(settings)
    with pytest.raises(ConfigurationError, match="PostgreSQL"):
        Stack(settings)


def test_the_rendered_config_names_the_broker_and_the_result_backend(tmp_path: Path) -> None:
    settings = load_settings(
        home=tmp_path,
        airflow_database_url=POSTGRES,
        airflow_executor="CeleryExecutor",
        celery_broker_url="redis://redis.internal:6379/3",
    )
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(render_airflow_config(settings))
    assert parser.get("core", "executor") == "CeleryExecutor"
    assert parser.get("celery", "broker_url") == "redis://redis.internal:6379/3"
    assert parser.get("celery", "result_backend") == (
        "db+postgresql+psycopg2://airflow@db.internal/airflow"
    )


def test_an_unreachable_broker_is_named() -> None:
    settings = load_settings(celery_broker_url=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StackError, match="TIRE_CELERY_BROKER_URL"):
        check_broker(settings, timeout=2)


def test_a_task_records_the_worker_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIRE_CELERY_WORKER_NAME", "training@node-1")
    reset_settings()
    try:
        assert worker_hostname() == "training@node-1"
        monkeypatch.delenv("TIRE_CELERY_WORKER_NAME")
        reset_settings()
        assert worker_hostname() and "@" not in worker_hostname()
    finally:
        reset_settings()


def test_stack_up_with_celery_and_no_postgresql_exits_with_the_reason(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIRE_", "AIRFLOW"))}
    env["TIRE_HOME"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "tirelib", "stack", "up", "--executor", "celery"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == ExitCode.BAD_INPUT, done.stderr
    assert "TIRE_AIRFLOW_DATABASE_URL" in done.stderr
    assert not (tmp_path / "stack").exists()  # nothing was started


def test_the_pinned_celery_executor_imports(tmp_path: Path) -> None:
    """The provider's executor must load with the pinned celery (5.7 removed what it imports)."""
    code = (
        "from airflow.providers.celery.executors.celery_executor import CeleryExecutor\n"
        "assert not CeleryExecutor.is_local\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["AIRFLOW_HOME"] = str(tmp_path)  # Airflow writes a default config where it starts
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_status_and_down_find_the_layout_that_runs(tmp_path: Path) -> None:
    """A stack started with --executor celery is shown and stopped with no flag."""
    settings = load_settings(home=tmp_path, airflow_executor="LocalExecutor")
    scheduler = ManagedProcess("airflow-scheduler", ["sleep", "60"], state_dir=settings.stack_dir)
    settings.stack_dir.mkdir(parents=True)
    scheduler.start()
    try:
        names = [status.name for status in Stack(settings).status()]
        assert "airflow-scheduler" in names and "airflow" not in names
        stopped = {status.name: pid for status, pid in Stack(settings).down()}
        assert stopped["airflow-scheduler"] is not None
        assert not scheduler.is_running()
    finally:
        scheduler.stop()

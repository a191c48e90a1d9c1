"""Airflow in the local stack: its configuration, environment, connections, pool and component.

``airflow standalone`` runs the api-server, scheduler, dag-processor and triggerer in one
process tree. Its ``airflow.cfg`` is rendered from the project's ``airflow.cfg.template``; S3 and
Slack reach its tasks as Airflow connections built from tirelib's settings, never as tirelib's
own credential variables; a ``training`` pool bounds concurrent training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tirelib.errors import StackError
from tirelib.settings import Settings, settings_env
from tirelib.stack.ports import HOST, HttpCheck
from tirelib.stack.process import Component, ManagedProcess, find_executable, inherited_env
from tirelib.stack.services import PLACEHOLDER_KEY, secret_access_key
from tirelib.urls import sqlalchemy_url

AIRFLOW_TEMPLATE = "airflow.cfg.template"


def project_root() -> Path:
    """The folder holding ``tirelib/``, ``dags/`` and ``airflow.cfg.template``."""
    return Path(__file__).resolve().parents[2]


def airflow_url(settings: Settings) -> str:
    return f"http://{HOST}:{settings.airflow_port}"


def _existing_secrets(config: Path) -> dict[str, str]:
    """Secrets of a config rendered before, so re-rendering never logs anyone out."""
    import configparser

    if not config.is_file():
        return {}
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(config)
    places = {
        "fernet_key": ("core", "fernet_key"),
        "api_secret_key": ("api", "secret_key"),
        "jwt_secret": ("api_auth", "jwt_secret"),
    }
    found = {name: parser.get(*where, fallback="") for name, where in places.items()}
    return {name: value for name, value in found.items() if value}


def render_airflow_config(settings: Settings, *, parallelism: int = 4) -> Path:
    """Write ``$AIRFLOW_HOME/airflow.cfg`` from ``airflow.cfg.template`` and the settings.

    Secrets are generated on the first render and kept on later ones.
    """
    import base64
    import secrets
    import string

    home = settings.resolved_airflow_home.absolute()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "airflow.cfg"
    template = project_root() / AIRFLOW_TEMPLATE
    if not template.is_file():
        raise StackError(f"{template} is missing: it ships with the project's source tree")
    kept = _existing_secrets(config)
    fresh = {
        "fernet_key": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
        "api_secret_key": secrets.token_urlsafe(32),
        "jwt_secret": secrets.token_urlsafe(32),
    }
    database = settings.airflow_database_url or f"sqlite:///{home / 'airflow.db'}"
    values = {
        **fresh,
        **kept,
        "airflow_home": str(home),
        "dags_folder": str((settings.dags_folder or project_root() / "dags").absolute()),
        "plugins_folder": str(project_root() / "plugins"),
        "executor": settings.airflow_executor,
        "parallelism": str(parallelism),
        "sql_alchemy_conn": sqlalchemy_url(database),
        "celery_broker_url": settings.celery_broker_url,
        "celery_result_backend": settings.celery_result_backend or f"db+{sqlalchemy_url(database)}",
        "api_host": HOST,
        "api_port": str(settings.airflow_port),
    }
    try:
        text = string.Template(template.read_text()).substitute(values)
    except (KeyError, ValueError) as error:
        raise StackError(f"{template} has an unknown placeholder: {error}") from error
    config.write_text(text)
    config.chmod(0o600)
    return config


def airflow_connections(settings: Settings) -> dict[str, str]:
    """``AIRFLOW_CONN_*`` variables for ``aws_default`` and ``slack_webhook``, from settings."""
    extra: dict[str, str] = {"region_name": settings.aws_default_region}
    if settings.s3_endpoint_url:
        extra["endpoint_url"] = settings.s3_endpoint_url
    aws: dict[str, object] = {"conn_type": "aws", "extra": extra}
    if settings.aws_access_key_id:
        aws["login"] = settings.aws_access_key_id
        aws["password"] = secret_access_key(settings) or ""
    elif settings.s3_endpoint_url:
        # An S3-compatible server started without credentials accepts any signature, but the
        # amazon provider's hook will not send an unsigned request: give it a placeholder pair.
        aws["login"] = aws["password"] = PLACEHOLDER_KEY
    connections = {"AIRFLOW_CONN_AWS_DEFAULT": json.dumps(aws)}
    if settings.slack_webhook_url is not None:
        connections["AIRFLOW_CONN_SLACK_WEBHOOK"] = json.dumps(
            {"conn_type": "slackwebhook", "password": settings.slack_webhook_url.get_secret_value()}
        )
    return connections


def airflow_env(settings: Settings) -> dict[str, str]:
    """The environment Airflow and its tasks run in: its home, connections, tirelib's settings."""
    env = inherited_env()
    env.update(airflow_connections(settings))
    env.update(settings_env(settings))
    env.update(
        {
            "AIRFLOW_HOME": str(settings.resolved_airflow_home.absolute()),
            "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
            # Task processes must not inherit a terminal's idea of progress bars.
            "NO_COLOR": "1",
            # `airflow standalone` starts its components as `airflow ...` from PATH.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }
    )
    # Inside Airflow, credentials come from the connections, never from tirelib's settings.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "TIRE_SLACK_WEBHOOK_URL"):
        env.pop(name, None)
    return env


def airflow_command() -> list[str]:
    path = find_executable("airflow")
    return [str(path)] if path is not None else [sys.executable, "-m", "airflow"]


def airflow_password(settings: Settings, user: str = "admin") -> str | None:
    """The generated password of ``user`` for Airflow's simple auth manager, once it exists."""
    path = settings.resolved_airflow_home / "simple_auth_manager_passwords.json"
    try:
        value = json.loads(path.read_text()).get(user)
    except (OSError, ValueError):
        return None
    return str(value) if value else None


def create_pool(settings: Settings, name: str, slots: int, description: str) -> None:
    """Create or resize an Airflow pool (idempotent)."""
    done = subprocess.run(
        [*airflow_command(), "pools", "set", name, str(slots), description],
        env=airflow_env(settings),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if done.returncode != 0:
        raise StackError(f"could not create the Airflow pool {name!r}: {done.stderr[-1000:]}")


TRAINING_POOL = "training"


def airflow_component(settings: Settings, *, training_slots: int = 1) -> Component:
    """``airflow standalone`` (api-server, scheduler, dag-processor, triggerer) on 127.0.0.1.

    Its configuration is rendered from ``airflow.cfg.template``; S3 and Slack reach it as Airflow
    connections built from the settings; a ``training`` pool bounds concurrent training.
    """
    state_dir = settings.stack_dir.absolute()
    url = airflow_url(settings)
    process = ManagedProcess(
        "airflow",
        lambda: [*airflow_command(), "standalone"],
        state_dir=state_dir,
        ready=HttpCheck(f"{url}/api/v2/monitor/health", status=200),
        env=airflow_env(settings),
        cwd=settings.resolved_airflow_home.absolute(),
        title="Airflow",
        url=url,
        ports=(settings.airflow_port,),
    )

    def configure() -> None:
        render_airflow_config(settings)

    return Component(
        process,
        ready_timeout=300.0,
        stop_timeout=30.0,
        before_start=configure,
        after_ready=lambda: create_pool(
            settings, TRAINING_POOL, training_slots, "Concurrent training tasks"
        ),
    )

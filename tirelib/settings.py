"""One settings object for every part of tirelib, read from the environment.

Variables carry the ``TIRE_`` prefix (``TIRE_DATA_BUCKET``); the ecosystem's own variables are
honoured as they are (``MLFLOW_TRACKING_URI``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, ``AIRFLOW_HOME``). Defaults describe the local stack on loopback, so a new
user needs to set nothing; production sets the endpoint, buckets and credentials.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tirelib.errors import ConfigurationError
from tirelib.urls import add_secrets, mask_credentials, url_secrets, with_address

# S3's own rule for bucket names, shortened: 3-63 lowercase letters, digits, dots and hyphens.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _env(name: str, *ecosystem: str) -> AliasChoices:
    """Accept ``TIRE_<NAME>`` first, then the ecosystem's own variable names."""
    return AliasChoices(f"TIRE_{name}", *ecosystem)


class Settings(BaseSettings):
    """Where things are and how to reach them. Read once per process with :func:`get_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="TIRE_", extra="ignore", frozen=True, populate_by_name=True
    )

    home: Path = Field(
        default=Path(".tire"),
        description="Folder for the local stack's state and logs, and the default cache.",
    )
    cache_dir: Path | None = Field(
        default=None, description="Content-addressed image cache; defaults to <home>/cache."
    )
    s3_endpoint_url: str | None = Field(
        default="http://127.0.0.1:8333",
        description="S3 endpoint. Empty means the provider's default (AWS).",
    )
    data_bucket: str = "tire-data"
    artifact_bucket: str = "tire-mlflow"
    s3_max_workers: int = Field(default=16, ge=1, le=256, description="Parallel S3 transfers.")
    s3_max_attempts: int = Field(default=5, ge=1, le=20, description="botocore retry attempts.")

    mlflow_tracking_uri: str = Field(
        default="http://127.0.0.1:5000",
        validation_alias=_env("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"),
    )
    experiment: str = "tire-defect"
    model_name: str = "tire-defect-classifier"

    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the MLflow backend store (PostgreSQL)."
    )
    pgpool: bool = Field(
        default=False,
        description="Whether `tirelib stack up` puts PgPool in front of TIRE_DATABASE_URL; "
        "MLflow's backend and the registry lock then connect through it.",
    )
    pgpool_port: int = Field(default=9999, ge=1, le=65535, description="Local PgPool's port.")
    slack_webhook_url: SecretStr | None = None

    aws_access_key_id: str | None = Field(
        default=None, validation_alias=_env("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID")
    )
    aws_secret_access_key: SecretStr | None = Field(
        default=None, validation_alias=_env("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")
    )
    aws_default_region: str = Field(
        default="us-east-1", validation_alias=_env("AWS_DEFAULT_REGION", "AWS_DEFAULT_REGION")
    )
    airflow_home: Path | None = Field(
        default=None, validation_alias=_env("AIRFLOW_HOME", "AIRFLOW_HOME")
    )

    s3_port: int = Field(default=8333, ge=1, le=65535, description="Local S3 server's port.")
    mlflow_port: int = Field(default=5000, ge=1, le=65535, description="Local MLflow's port.")
    airflow_port: int = Field(default=8080, ge=1, le=65535, description="Airflow's api-server.")
    airflow_database_url: str | None = Field(
        default=None, description="Airflow's metadata database; default SQLite in AIRFLOW_HOME."
    )
    airflow_executor: Literal["LocalExecutor", "CeleryExecutor"] = "LocalExecutor"
    dags_folder: Path | None = Field(
        default=None, description="DAG files; default: the dags/ folder beside the package."
    )
    stack_with_airflow: bool = Field(
        default=True, description="Whether `tirelib stack up` starts Airflow too."
    )
    stack_with_server: bool = Field(
        default=True,
        description="Whether `tirelib stack up` starts the model server (`tirelib serve`, "
        "serving the production alias).",
    )
    stack_with_monitoring: bool = Field(
        default=True,
        description="Whether `tirelib stack up` starts Prometheus, Alertmanager and the "
        "Pushgateway (each one only when installed).",
    )
    serve_port: int = Field(
        default=8501,
        ge=1,
        le=65535,
        description="The local stack's model server port (the variable `tirelib serve` reads).",
    )
    prometheus_port: int = Field(default=9090, ge=1, le=65535, description="Local Prometheus.")
    alertmanager_port: int = Field(default=9093, ge=1, le=65535, description="Local Alertmanager.")
    pushgateway_port: int = Field(default=9091, ge=1, le=65535, description="Local Pushgateway.")
    pushgateway_url: str | None = Field(
        default=None,
        description="Pushgateway the pipeline pushes its batch-job metrics to; unset: none is "
        "pushed. The local stack sets it for Airflow when it runs a Pushgateway.",
    )
    # Unset, these take the defaults of tirelib.config (Hyperparameters, Thresholds).
    pipeline_epochs: int | None = Field(
        default=None, ge=1, le=1000, description="Default epochs of a pipeline run."
    )
    min_accuracy: float | None = Field(
        default=None, ge=0, le=1, description="Registration floor on test accuracy (DAG default)."
    )
    min_f1: float | None = Field(
        default=None, ge=0, le=1, description="Registration floor on test F1 (DAG default)."
    )
    training_queue: str = Field(
        default="training", description="Executor queue of training tasks (CeleryExecutor)."
    )
    celery_broker_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="CeleryExecutor's broker (Redis)."
    )
    celery_result_backend: str | None = Field(
        default=None,
        description="Celery's result backend; default: the Airflow metadata database (db+...).",
    )
    celery_worker_concurrency: int = Field(
        default=4, ge=1, le=64, description="Task slots of the stack's `default` queue worker."
    )
    celery_worker_name: str | None = Field(
        default=None,
        description="This Celery worker's name, recorded as the hostname of the tasks it runs "
        "(tells workers on one host apart); default: the machine's name.",
    )
    sensor_poke_seconds: int = Field(
        default=30, ge=1, le=3600, description="How often the data sensor looks at the lake."
    )
    settle_seconds: int = Field(
        default=120,
        ge=0,
        le=86400,
        description="A version uploaded without a manifest is ingested once no object under "
        "raw/<version>/ has changed for this long.",
    )
    predict_batch_size: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="Images scored per forward pass by batch prediction (`tirelib predict`).",
    )
    prometheus_url: str = Field(
        default="http://127.0.0.1:9090",
        description="Prometheus's HTTP API, which the monitoring DAG reads live statistics from.",
    )
    monitor_window_seconds: int = Field(
        default=3600,
        ge=60,
        le=7 * 86400,
        description="Window of live traffic monitoring compares with the baseline (shortened to "
        "the time since the production version was promoted).",
    )
    monitor_psi_threshold: float = Field(
        default=0.25,
        gt=0,
        description="Population stability index over which a statistic has drifted.",
    )
    monitor_min_observations: int = Field(
        default=100,
        ge=1,
        description="Live images (predictions) in the window before drift is judged.",
    )
    monitor_min_labels: int = Field(
        default=50,
        ge=1,
        description="Labelled predictions (feedback) in the window before live accuracy is judged.",
    )
    monitor_accuracy_floor: float = Field(
        default=0.8,
        ge=0,
        le=1,
        description="Live accuracy under this is an alert (a rollback with TIRE_AUTO_ROLLBACK).",
    )
    monitor_max_accuracy_drop: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Live accuracy this far under the offline test accuracy is an alert.",
    )
    auto_rollback: bool = Field(
        default=False,
        description="Whether monitoring rolls production back when its live accuracy, on at "
        "least TIRE_MONITOR_MIN_LABELS labels, is under TIRE_MONITOR_ACCURACY_FLOOR.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator(
        "s3_endpoint_url",
        "database_url",
        "airflow_database_url",
        "celery_result_backend",
        "celery_worker_name",
        "pushgateway_url",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("s3_endpoint_url", "pushgateway_url", "prometheus_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value.rstrip("/") if value else value

    @field_validator("data_bucket", "artifact_bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not _BUCKET_RE.match(value):
            raise ValueError(
                f"{value!r} is not a valid S3 bucket name "
                "(3-63 characters: lowercase letters, digits, '.' and '-')"
            )
        return value

    @field_validator("database_url", "airflow_database_url")
    @classmethod
    def _database_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql", "sqlite", "mysql")):
            raise ValueError(
                f"must be a SQLAlchemy URL (postgresql://, sqlite://, mysql://), got {value!r}"
            )
        return value

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.home / "cache"

    @property
    def client_database_url(self) -> str | None:
        """The URL clients of ``database_url`` connect to: PgPool's address on 127.0.0.1 when
        ``pgpool`` is on (same user, password and database), else ``database_url`` itself."""
        if self.pgpool and self.database_url:
            return with_address(self.database_url, "127.0.0.1", self.pgpool_port)
        return self.database_url

    @property
    def stack_dir(self) -> Path:
        return self.home / "stack"

    @property
    def resolved_airflow_home(self) -> Path:
        return self.airflow_home if self.airflow_home is not None else self.home / "airflow"


SECRET_FIELDS = frozenset({"aws_access_key_id", "aws_secret_access_key", "slack_webhook_url"})


# Credentials the ecosystem's clients read from the environment themselves.
_SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SESSION_TOKEN")


def secret_values(settings: Settings) -> list[str]:
    """Every credential ``settings`` hold: the passwords in its URLs, the AWS secret key, the
    Slack webhook (its path is the secret), and MLflow's and AWS's own secret variables."""
    values: list[str] = []
    for url in (
        settings.mlflow_tracking_uri,
        settings.s3_endpoint_url,
        settings.database_url,
        settings.airflow_database_url,
        settings.celery_broker_url,
        settings.celery_result_backend,
        settings.pushgateway_url,
        settings.prometheus_url,
    ):
        values += url_secrets(url)
    if settings.aws_secret_access_key is not None:
        values.append(settings.aws_secret_access_key.get_secret_value())
    if settings.slack_webhook_url is not None:
        webhook = settings.slack_webhook_url.get_secret_value()
        values.append(webhook)
        path = webhook.partition("://")[2].partition("/")[2]
        if path.count("/") >= 1:  # services/T.../B.../secret: the part after the host
            values.append(path)
    values += [os.environ[name] for name in _SECRET_ENV if os.environ.get(name)]
    return [value for value in values if value]


def settings_env(settings: Settings, *, secrets: bool = False) -> dict[str, str]:
    """``TIRE_*`` variables that give another process these settings (credentials only on
    request: inside Airflow they come from connections)."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None or (name in SECRET_FIELDS and not secrets):
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"TIRE_{name.upper()}"] = (
            str(value.absolute()) if isinstance(value, Path) else str(value)
        )
    return env


def _explain(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else "?"
        variable = f"TIRE_{field.upper()}"
        shown = "'***'" if field in SECRET_FIELDS else repr(item.get("input"))
        lines.append(mask_credentials(f"{variable}={shown}: {item['msg']}"))
    return "invalid settings:\n  " + "\n  ".join(lines)


def load_settings(**overrides: object) -> Settings:
    """Read the settings from the environment, with ``overrides`` taking precedence.

    Raises :class:`ConfigurationError` naming each bad variable and what it allows. The
    credentials the settings hold are masked from then on (see :func:`secret_values`).
    """
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise ConfigurationError(_explain(error)) from error
    add_secrets(*secret_values(settings))  # masked in every message of this process from now on
    return settings


_cached: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    global _cached
    if _cached is None:
        _cached = load_settings()
    return _cached


def reset_settings() -> None:
    """Forget the cached settings (tests and the CLI change the environment)."""
    global _cached
    _cached = None

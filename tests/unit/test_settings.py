"""Settings: the TIRE_ prefix, the ecosystem's own variables, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from tirelib.errors import ConfigurationError
from tirelib.settings import get_settings, load_settings, reset_settings

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [
        "TIRE_DATA_BUCKET",
        "TIRE_S3_ENDPOINT_URL",
        "MLFLOW_TRACKING_URI",
        "TIRE_MLFLOW_TRACKING_URI",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "TIRE_HOME",
        "TIRE_CACHE_DIR",
    ]:
        monkeypatch.delenv(name, raising=False)
    reset_settings()


def test_defaults_describe_the_local_stack() -> None:
    settings = load_settings()
    assert settings.data_bucket == "tire-data"
    assert settings.artifact_bucket == "tire-mlflow"
    assert settings.experiment == "tire-defect"
    assert settings.model_name == "tire-defect-classifier"
    assert settings.s3_endpoint_url == "http://127.0.0.1:8333"
    assert settings.resolved_cache_dir == Path(".tire") / "cache"


def test_prefixed_and_ecosystem_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIRE_DATA_BUCKET", "factory-7-tires")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    monkeypatch.setenv("TIRE_CACHE_DIR", "/var/cache/tires")
    settings = get_settings()
    assert settings.data_bucket == "factory-7-tires"
    assert settings.mlflow_tracking_uri == "http://mlflow.internal:5000"
    assert settings.aws_access_key_id == "AKIAEXAMPLE"
    assert settings.aws_secret_access_key is not None
    assert "wJalrXUtnFEMI" not in repr(settings)
    assert settings.resolved_cache_dir == Path("/var/cache/tires")


def test_the_prefixed_tracking_uri_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://a:5000")
    monkeypatch.setenv("TIRE_MLFLOW_TRACKING_URI", "http://b:5000")
    assert load_settings().mlflow_tracking_uri == "http://b:5000"


def test_empty_endpoint_means_the_provider_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIRE_S3_ENDPOINT_URL", "")
    assert load_settings().s3_endpoint_url is None


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("TIRE_DATA_BUCKET", "Bad_Bucket", "not a valid S3 bucket name"),
        ("TIRE_S3_ENDPOINT_URL", "ftp://x", "http:// or https://"),
        ("TIRE_S3_MAX_WORKERS", "0", "greater than or equal to 1"),
        ("TIRE_LOG_LEVEL", "LOUD", "DEBUG"),
        ("TIRE_DATABASE_URL", "mongodb://x", "SQLAlchemy URL"),
    ],
)
def test_errors_name_the_variable_and_what_is_allowed(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as error:
        load_settings()
    assert variable in str(error.value)
    assert message in str(error.value)

"""Airflow's configuration and connections, as the local stack renders them from settings."""

from __future__ import annotations

import configparser
import json
from pathlib import Path

import pytest

from tirelib.settings import load_settings
from tirelib.stack import airflow_connections, render_airflow_config

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "TIRE_SLACK_WEBHOOK_URL"):
        monkeypatch.delenv(name, raising=False)


def _read(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    return parser


def test_the_config_is_rendered_and_keeps_its_secrets(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path, airflow_port=18080)
    first = _read(render_airflow_config(settings))
    assert first.get("core", "load_examples") == "False"
    assert first.get("api", "host") == "127.0.0.1"
    assert first.get("api", "port") == "18080"
    assert first.get("core", "dags_folder").endswith("dags")
    assert first.get("database", "sql_alchemy_conn").startswith("sqlite:///")
    secret = first.get("api_auth", "jwt_secret")
    assert len(secret) > 30
    again = _read(render_airflow_config(settings))
    assert again.get("api_auth", "jwt_secret") == secret
    assert again.get("core", "fernet_key") == first.get("core", "fernet_key")
    other = _read(render_airflow_config(load_settings(home=tmp_path / "other")))
    assert other.get("api_auth", "jwt_secret") != secret


def test_a_postgresql_metadata_database_names_its_driver(tmp_path: Path) -> None:
    settings = load_settings(
        home=tmp_path, airflow_database_url="postgresql://airflow@db.internal/airflow"
    )
    config = _read(render_airflow_config(settings))
    assert config.get("database", "sql_alchemy_conn") == (
        "postgresql+psycopg2://airflow@db.internal/airflow"
    )


def test_connections_carry_the_endpoint_and_credentials() -> None:
    settings = load_settings(
        s3_endpoint_url="http://127.0.0.1:9000",
        aws_access_key_id="key",
        aws_secret_access_key="secret",
        slack_webhook_url="http://127.0.0.1:9999/hook",
    )
    connections = airflow_connections(settings)
    aws = json.loads(connections["AIRFLOW_CONN_AWS_DEFAULT"])
    assert aws["extra"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert (aws["login"], aws["password"]) == ("key", "secret")
    slack = json.loads(connections["AIRFLOW_CONN_SLACK_WEBHOOK"])
    assert slack["password"] == "http://127.0.0.1:9999/hook"


def test_an_open_local_server_gets_placeholder_credentials() -> None:
    """The amazon provider's hook never sends unsigned requests; an open server takes any."""
    local = json.loads(
        airflow_connections(load_settings(s3_endpoint_url="http://127.0.0.1:8333"))[
            "AIRFLOW_CONN_AWS_DEFAULT"
        ]
    )
    assert local["login"] and local["password"]
    aws = json.loads(
        airflow_connections(load_settings(s3_endpoint_url=""))["AIRFLOW_CONN_AWS_DEFAULT"]
    )
    assert "login" not in aws  # real AWS: boto3's own chain (roles, profiles)

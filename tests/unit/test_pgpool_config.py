"""PgPool in the local stack, without servers: the rendered configuration and the URL rewrite."""

from __future__ import annotations

from pathlib import Path

import pytest

from tirelib.errors import ConfigurationError
from tirelib.settings import load_settings
from tirelib.stack import RESET_QUERY_LIST, Stack, pgpool_component, render_pgpool_config
from tirelib.stack.services import mlflow_backend_uri
from tirelib.urls import with_address

pytestmark = pytest.mark.unit

DB = "postgresql+psycopg2://tire:s3cret@db.example:6543/mlflow"


def _config(tmp_path: Path) -> dict[str, str]:
    text = render_pgpool_config(
        backend_host="db.example",
        backend_port=6543,
        port=9999,
        pcp_port=9898,
        state_dir=tmp_path,
        socket_dir=tmp_path,
    )
    pairs = (line.split(" = ", 1) for line in text.splitlines() if not line.startswith("#"))
    return {name: value for name, value in pairs}


def test_the_config_pools_sessions_and_resets_them_with_discard_all(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert config["reset_query_list"] == "'ABORT; DISCARD ALL'" == f"'{RESET_QUERY_LIST}'"
    assert config["connection_cache"] == "on"
    assert config["backend_clustering_mode"] == "'raw'"
    assert config["load_balance_mode"] == "off"
    assert config["listen_addresses"] == "'127.0.0.1'"
    assert (config["backend_hostname0"], config["backend_port0"]) == ("'db.example'", "6543")
    assert config["pid_file_name"] == f"'{tmp_path / 'pgpool.pid'}'"


def test_with_pgpool_clients_connect_to_its_address() -> None:
    settings = load_settings(database_url=DB, pgpool=True, pgpool_port=7000)
    assert settings.client_database_url == "postgresql+psycopg2://tire:s3cret@127.0.0.1:7000/mlflow"
    assert mlflow_backend_uri(settings) == settings.client_database_url
    assert load_settings(database_url=DB, pgpool=False).client_database_url == DB
    assert with_address("postgresql://db/x", "127.0.0.1", 5) == "postgresql://127.0.0.1:5/x"


def test_the_stack_starts_pgpool_before_mlflow_only_when_asked(tmp_path: Path) -> None:
    base = {
        "home": tmp_path,
        "database_url": DB,
        "stack_with_airflow": False,
        "stack_with_server": False,
        "stack_with_monitoring": False,
    }
    assert [c.name for c in Stack(load_settings(**base, pgpool=False))] == ["seaweedfs", "mlflow"]
    pooled = Stack(load_settings(**base, pgpool=True))
    assert [c.name for c in pooled] == ["seaweedfs", "pgpool", "mlflow"]


def test_pgpool_needs_a_postgresql_database(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="TIRE_DATABASE_URL"):
        pgpool_component(load_settings(home=tmp_path, pgpool=True))
    with pytest.raises(ConfigurationError, match="TIRE_DATABASE_URL"):
        pgpool_component(load_settings(home=tmp_path, pgpool=True, database_url="sqlite:///x"))

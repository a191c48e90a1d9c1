"""The compose stack's PostgreSQL init script, run by psql against the local PostgreSQL.

The script is what the postgres image runs from /docker-entrypoint-initdb.d; here it gets names of
its own (so nothing clashes with other tests) and a password that needs quoting.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg2 import sql

from tests.conftest import PG_HOST, PG_PORT, PG_USER, _pg_connect

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "postgres" / "init" / "10-databases.sh"


@pytest.fixture
def names() -> Iterator[dict[str, str]]:
    suffix = secrets.token_hex(4)
    chosen = {
        "AIRFLOW_DB_USER": f"tirelib_test_af_{suffix}",
        "AIRFLOW_DB_NAME": f"tirelib_test_afdb_{suffix}",
        "MLFLOW_DB_USER": f"tirelib_test_ml_{suffix}",
        "MLFLOW_DB_NAME": f"tirelib_test_mldb_{suffix}",
    }
    yield chosen
    connection = _pg_connect()
    try:
        with connection.cursor() as cursor:
            for key in ("AIRFLOW_DB_NAME", "MLFLOW_DB_NAME"):
                cursor.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(chosen[key]))
                )
            for key in ("AIRFLOW_DB_USER", "MLFLOW_DB_USER"):
                cursor.execute(
                    sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(chosen[key]))
                )
    finally:
        connection.close()


def run_script(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if shutil.which("psql") is None:
        pytest.fail("psql is not installed: run `make system-deps` (postgresql-client)")
    base = {
        "PATH": os.environ["PATH"],
        "PGHOST": PG_HOST,
        "PGPORT": str(PG_PORT),
        "POSTGRES_USER": PG_USER,
        "POSTGRES_DB": "postgres",
    }
    return subprocess.run(
        ["bash", str(SCRIPT)], env=base | env, capture_output=True, text=True, timeout=60
    )


def test_init_script_creates_both_databases_owned_by_their_users(names: dict[str, str]) -> None:
    done = run_script(
        names | {"AIRFLOW_DB_PASSWORD": "it's-a-secret", "MLFLOW_DB_PASSWORD": "other-secret"}
    )
    assert done.returncode == 0, done.stderr
    connection = _pg_connect()
    try:
        with connection.cursor() as cursor:
            for user, database in (
                (names["AIRFLOW_DB_USER"], names["AIRFLOW_DB_NAME"]),
                (names["MLFLOW_DB_USER"], names["MLFLOW_DB_NAME"]),
            ):
                cursor.execute(
                    "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                    (database,),
                )
                assert cursor.fetchone() == (user,)
                cursor.execute(
                    "SELECT rolcanlogin, rolsuper, rolpassword IS NOT NULL "
                    "FROM pg_authid WHERE rolname = %s",
                    (user,),
                )
                assert cursor.fetchone() == (True, False, True)
    finally:
        connection.close()


def test_init_script_refuses_to_run_without_passwords(names: dict[str, str]) -> None:
    done = run_script(names | {"MLFLOW_DB_PASSWORD": "x"})
    assert done.returncode != 0
    assert "AIRFLOW_DB_PASSWORD" in done.stderr
    connection = _pg_connect()
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_roles WHERE rolname = %s", (names["MLFLOW_DB_USER"],)
            )
            assert cursor.fetchone() == (0,)
    finally:
        connection.close()

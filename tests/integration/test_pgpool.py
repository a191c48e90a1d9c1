"""PgPool-II in front of PostgreSQL: MLflow's backend and the registry lock through the pool.

The stack is started the way ``TIRE_PGPOOL=1 tirelib stack up`` starts it (SeaweedFS, PgPool,
MLflow; no Airflow) on free ports, in front of a fresh database on the local PostgreSQL. The
tests prove that MLflow reaches its database only through PgPool, that the promotion lock
(a session advisory lock) still excludes a second client, and that a lock never outlives its
client inside the pool: PgPool resets a pooled backend connection with ``DISCARD ALL``, and a
control run with a reset list lacking it shows the lock leaking to the pool.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from mlflow import MlflowClient

from tests.conftest import PG_HOST, PG_PORT, PG_USER, fresh_database
from tirelib.errors import RegistryError, StackError
from tirelib.registry import model_lock
from tirelib.registry.locks import lock_key
from tirelib.settings import Settings, load_settings
from tirelib.stack import Stack, free_port, mlflow_url, pgpool_binary, pgpool_component
from tirelib.stack import pgpool as pgpool_module
from tirelib.urls import libpq_url

pytestmark = pytest.mark.integration

DEADLINE_S = 15.0


@pytest.fixture(scope="module")
def pooled_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """S3, PgPool and MLflow from :class:`Stack` with ``pgpool=True``; yields the settings."""
    try:
        pgpool_binary()
    except StackError as error:
        pytest.skip(f"{error} (`make system-deps` installs it when run as root)")
    with fresh_database("tirelib_pgpool") as database_url:
        settings = load_settings(
            home=tmp_path_factory.mktemp("pgpool"),
            database_url=database_url,
            pgpool=True,
            pgpool_port=free_port(),
            s3_port=free_port(),
            mlflow_port=free_port(),
            stack_with_airflow=False,
            stack_with_server=False,
            stack_with_monitoring=False,
            model_name=f"tire-defect-classifier-{secrets.token_hex(4)}",
            aws_access_key_id=None,
            aws_secret_access_key=None,
        )
        stack = Stack(settings)
        assert [component.name for component in stack] == ["seaweedfs", "pgpool", "mlflow"]
        try:
            stack.up()
            yield settings
        finally:
            stack.down()


def _direct(query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of ``query`` on a direct connection to PostgreSQL (not through PgPool)."""
    connection = psycopg2.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=5
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute(query, params)
            return list(cursor.fetchall())
    finally:
        connection.close()


def _pooled(settings: Settings) -> Any:
    assert settings.client_database_url is not None
    connection = psycopg2.connect(libpq_url(settings.client_database_url), connect_timeout=5)
    connection.autocommit = True
    return connection


def _database(settings: Settings) -> str:
    assert settings.database_url is not None
    return settings.database_url.rsplit("/", 1)[1]


def _advisory_holders(settings: Settings) -> list[int]:
    """Backend pids holding the model's advisory lock (a bigint key: two 32-bit halves)."""
    key = lock_key(settings.model_name) & 0xFFFFFFFFFFFFFFFF
    rows = _direct(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1",
        (key >> 32, key & 0xFFFFFFFF),
    )
    return [row[0] for row in rows]


def _wait(condition: Any, what: str, timeout: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


def test_mlflow_reaches_its_database_only_through_pgpool(pooled_stack: Settings) -> None:
    settings = pooled_stack
    log_text = (settings.stack_dir / "logs" / "mlflow.log").read_text()
    pooled_url = f"{PG_USER}@127.0.0.1:{settings.pgpool_port}/{_database(settings)}"
    assert f"mlflow db upgrade postgresql+psycopg2://{pooled_url}" in log_text

    client = MlflowClient(tracking_uri=mlflow_url(settings))
    experiment = client.create_experiment(f"pgpool-{secrets.token_hex(4)}")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "test_accuracy", 0.9)
    client.set_terminated(run.info.run_id)
    client.create_registered_model(settings.model_name)
    version = client.create_model_version(
        settings.model_name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    with model_lock(settings) as what:  # as a promotion does: aliases move under the lock
        assert "PostgreSQL advisory lock" in what
        client.set_registered_model_alias(settings.model_name, "production", version.version)
    assert client.get_model_version_by_alias(settings.model_name, "production").run_id == (
        run.info.run_id
    )

    # Every backend connection of the database belongs to PgPool's pool: none is direct.
    def direct_ones() -> set[int] | None:
        rows = _direct(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (_database(settings),)
        )
        backends = {row[0] for row in rows}
        connection = _pooled(settings)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SHOW pool_pools")
                names = [column[0] for column in cursor.description]
                pools = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            connection.close()
        pooled = {int(row["pool_backendpid"]) for row in pools if int(row["pool_backendpid"])}
        return backends if backends and backends <= pooled else None

    # MLflow keeps its connections open, so the database has backends, all of them PgPool's.
    assert _wait(direct_ones, "MLflow's connections all through PgPool")


def _hold_lock_in_child(settings: Settings) -> subprocess.Popen[str]:
    """Another process that takes the promotion lock through PgPool and keeps it."""
    env = {
        **os.environ,
        "TIRE_HOME": str(settings.home),
        "TIRE_DATABASE_URL": str(settings.database_url),
        "TIRE_PGPOOL": "1",
        "TIRE_PGPOOL_PORT": str(settings.pgpool_port),
        "TIRE_MODEL_NAME": settings.model_name,
    }
    code = (
        "import time\n"
        "from tirelib.registry import model_lock\n"
        "from tirelib.settings import get_settings\n"
        "with model_lock(get_settings()):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(300)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "held"
    return child


def test_the_promotion_lock_excludes_a_second_client_through_pgpool(
    pooled_stack: Settings,
) -> None:
    settings = pooled_stack
    with model_lock(settings):
        holders = _advisory_holders(settings)
        assert len(holders) == 1
        with pytest.raises(RegistryError, match="held its lock"), model_lock(settings, timeout=1):
            pass
    assert _advisory_holders(settings) == []
    with model_lock(settings, timeout=5):
        pass

    # A holder that dies without closing its connection: PgPool drops or resets that backend.
    child = _hold_lock_in_child(settings)
    try:
        with pytest.raises(RegistryError), model_lock(settings, timeout=1):
            pass
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=DEADLINE_S)
    with model_lock(settings, timeout=DEADLINE_S) as what:
        assert "PostgreSQL advisory lock" in what


def _lock_and_leave(settings: Settings) -> int:
    """Take the advisory lock through PgPool and disconnect without unlocking; the backend pid."""
    connection = _pooled(settings)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_backend_pid(), pg_advisory_lock(%s)", (lock_key(settings.model_name),)
        )
        backend = int(cursor.fetchone()[0])
    connection.close()
    return backend


def _backend_state(backend: int) -> tuple[str, str] | None:
    rows = _direct("SELECT state, query FROM pg_stat_activity WHERE pid = %s", (backend,))
    return (rows[0][0], rows[0][1].strip()) if rows else None


def test_a_lock_is_never_inherited_through_a_pooled_connection(pooled_stack: Settings) -> None:
    settings = pooled_stack
    assert (
        "reset_query_list = 'ABORT; DISCARD ALL'"
        in (settings.stack_dir / "pgpool" / "pgpool.conf").read_text()
    )

    backend = _lock_and_leave(settings)
    _wait(lambda: not _advisory_holders(settings), "the lock released by PgPool's reset")
    # The backend connection was kept for the next client, reset rather than closed.
    assert _backend_state(backend) == ("idle", "DISCARD ALL")
    with model_lock(settings, timeout=5):
        pass


def test_without_discard_all_the_pool_would_keep_the_lock(
    pooled_stack: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: a reset list without DISCARD ALL leaves the lock on the pooled backend."""
    monkeypatch.setattr(pgpool_module, "RESET_QUERY_LIST", "ABORT")
    leaky = pooled_stack.model_copy(update={"home": tmp_path / "leaky", "pgpool_port": free_port()})
    component = pgpool_component(leaky)
    component.up()
    try:
        backend = _lock_and_leave(leaky)
        # PgPool sends ABORT only inside a transaction: the pooled backend keeps the session.
        assert _advisory_holders(leaky) == [backend]  # still held, by nobody's session
        assert _backend_state(backend) is not None
        # Any other session is shut out. (Not asked through the pool: a client handed the same
        # pooled backend would be granted the lock again, advisory locks being re-entrant.)
        direct = leaky.model_copy(update={"pgpool": False})
        with pytest.raises(RegistryError, match="held its lock"), model_lock(direct, timeout=1):
            pass
    finally:
        component.down()
    _wait(lambda: not _advisory_holders(leaky), "the lock gone with PgPool's connections")

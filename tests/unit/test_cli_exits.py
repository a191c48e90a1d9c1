"""The command line never shows a traceback: each outcome has its exit status and one line.

The failures are made in a fresh interpreter (``python -c``) that replaces one library call of
``tirelib data list`` and runs :func:`tirelib.cli.main`, so logging is set up exactly as for a
user, and the status and output are those a shell sees.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tirelib.cli.exit_codes import ExitCode, exit_code
from tirelib.errors import (
    ConfigurationError,
    DataError,
    PromotionConflictError,
    RegistryError,
    RegistryUnavailableError,
    StackError,
    StorageError,
    StorageUnavailableError,
    VersionExistsError,
)

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ConfigurationError("x"), 2),
        (DataError("x"), 2),
        (VersionExistsError("x"), 2),
        (RegistryUnavailableError("x"), 3),
        (StorageUnavailableError("x"), 3),
        (RegistryError("x"), 4),
        (PromotionConflictError("x"), 4),
        (StorageError("x"), 4),
        (StackError("x"), 4),
    ],
)
def test_each_error_has_its_exit_status(error: Exception, status: int) -> None:
    assert isinstance(error, Exception)
    assert exit_code(error) == status  # type: ignore[arg-type]


def test_the_readme_lists_every_exit_status() -> None:
    text = README.read_text()
    section = text[text.index("\n## Exit status") :]
    section = section[: section.index("\n## ", 1)]
    rows = dict(re.findall(r"^\| `(\d+)` \| (.+?) \|$", section, flags=re.MULTILINE))
    assert sorted(int(code) for code in rows) == sorted(int(code) for code in ExitCode)


def _run_failing_list(
    tmp_path: Path, raise_: str, *options: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """``tirelib [options] data list`` in a fresh interpreter whose listing raises ``raise_``."""
    code = (
        "import sys\n"
        "import tirelib.cli.data as commands\n"
        "from tirelib.errors import UploadInterrupted\n"
        "def fail(*args, **kwargs):\n"
        f"    raise {raise_}\n"
        "commands.list_versions = fail\n"
        "commands._store = lambda: None\n"
        "from tirelib.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *options, "data", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TIRE_HOME": str(tmp_path / "home"), "TIRE_LOG_LEVEL": "INFO", **env},
        check=False,
    )


def test_an_unexpected_error_is_one_line_and_its_traceback_goes_to_the_log(
    tmp_path: Path,
) -> None:
    done = _run_failing_list(tmp_path, "RuntimeError('boom at http://user:hunter2@db:5432/x')")
    assert done.returncode == ExitCode.INTERNAL
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    log = tmp_path / "home" / "logs" / "cli-errors.log"
    assert "RuntimeError: boom" in lines[0] and str(log) in lines[0]
    saved = log.read_text()
    assert "Traceback" in saved and "RuntimeError: boom" in saved and "data list" in saved
    assert "hunter2" not in done.stderr + saved


@pytest.mark.parametrize("how", [("-v",), ()])
def test_with_debug_logging_the_traceback_is_shown(tmp_path: Path, how: tuple[str, ...]) -> None:
    env = {} if how else {"TIRE_LOG_LEVEL": "DEBUG"}
    done = _run_failing_list(tmp_path, "RuntimeError('boom')", *how, **env)
    assert done.returncode == ExitCode.INTERNAL
    assert "Traceback" in done.stderr and "RuntimeError: boom" in done.stderr
    assert not (tmp_path / "home" / "logs" / "cli-errors.log").exists()


def test_ctrl_c_exits_130_with_a_short_line(tmp_path: Path) -> None:
    done = _run_failing_list(tmp_path, "KeyboardInterrupt")
    assert done.returncode == 130
    assert done.stderr.strip() == "interrupted"


def test_an_interrupted_upload_says_what_was_sent(tmp_path: Path) -> None:
    done = _run_failing_list(tmp_path, "UploadInterrupted('sent 3 of 10 files of version v1')")
    assert done.returncode == 130
    assert done.stderr.strip() == "interrupted: sent 3 of 10 files of version v1"


def test_a_service_outage_exits_3_and_bad_input_2(tmp_path: Path) -> None:
    down = _run_failing_list(
        tmp_path, "__import__('tirelib.errors').errors.StorageUnavailableError('S3 is down')"
    )
    assert down.returncode == 3
    assert down.stderr.strip() == "error: S3 is down"
    bad = _run_failing_list(tmp_path, "__import__('tirelib.errors').errors.DataError('no')")
    assert bad.returncode == 2


def test_a_usage_error_exits_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tirelib", "data", "list", "--no-such-option"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TIRE_HOME": str(tmp_path / "home")},
        check=False,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "--no-such-option" in done.stderr


@pytest.mark.parametrize(
    ("name", "shown"),
    [("v1\n", "'v1\\n'"), ("v" * 2000, "2000 characters")],
)
def test_a_version_name_breaking_the_rule_is_refused_with_the_rule(
    tmp_path: Path, name: str, shown: str
) -> None:
    (tmp_path / "src" / "good").mkdir(parents=True)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tirelib",
            "data",
            "upload",
            str(tmp_path / "src"),
            "--version",
            name,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "TIRE_HOME": str(tmp_path / "home"),
            # Nothing may be asked of S3: the name is refused first.
            "TIRE_S3_ENDPOINT_URL": "http://127.0.0.1:9",
        },
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert shown in done.stderr
    assert "letters, digits" in done.stderr and "at most 128 characters" in done.stderr
    assert len(done.stderr) < 1000  # a short excerpt of the name, not all of it

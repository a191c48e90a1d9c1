"""The command line run in the test's own process, as the ``tirelib`` script runs it.

:func:`tirelib` calls :func:`tirelib.cli.main` (the script's entry point: the earlier
spellings, the exit statuses, the one-line errors) and returns what a shell would see: the
status it exits with and what it wrote to stdout and stderr. Tests whose subject is the process
itself (a signal, a fresh interpreter's logging, a port held by another process) start one;
the others save an interpreter start and the imports of torch and MLflow on every call.
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass

import pytest

from tirelib.cli import main
from tirelib.settings import reset_settings


@dataclass(frozen=True)
class Done:
    """What a finished command left: like :class:`subprocess.CompletedProcess`."""

    returncode: int
    stdout: str
    stderr: str


def tirelib(*args: str, **env: str) -> Done:
    """``tirelib ARGS`` with ``env`` added to the environment (for this call only); settings
    are read anew before and after, as a fresh process would read them."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        reset_settings()
        try:
            with redirect_stdout(out), redirect_stderr(err):
                main(list(args))
        except SystemExit as done:
            code = done.code
        else:  # main always exits; returning is a bug of its own
            raise AssertionError(f"tirelib {' '.join(args)} returned instead of exiting")
        finally:
            reset_settings()
    if code is not None and not isinstance(code, int):
        raise AssertionError(f"tirelib {' '.join(args)} exited with {code!r}, not a status")
    return Done(code or 0, out.getvalue(), err.getvalue())

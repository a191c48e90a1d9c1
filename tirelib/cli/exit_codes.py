"""The exit statuses of the ``tirelib`` command line, declared once.

A script tells the outcomes apart by the status alone: an answer of "no" (1) is not an error,
bad input (2) will fail the same way again, an unreachable service (3) is worth a retry later,
a refusal by a service (4) needs a change on that side, 5 is a bug. The README's table lists
these (a test keeps the two equal).
"""

from __future__ import annotations

from enum import IntEnum

from tirelib.errors import (
    ConfigurationError,
    DataError,
    RegistryError,
    ServiceUnavailableError,
    StackError,
    StorageError,
    TirelibError,
)


class ExitCode(IntEnum):
    """What the ``tirelib`` command's exit status means."""

    OK = 0
    """Done; for ``registry produce``: production is the version asked for."""
    REFUSED = 1
    """The answer is no: the gate refused a promotion, ``stack status`` found a server down."""
    BAD_INPUT = 2
    """Bad input or usage: an unknown option, a value or name not allowed, missing data."""
    UNAVAILABLE = 3
    """A service (S3, MLflow, PostgreSQL, Slack) could not be reached after the retries."""
    SERVICE_REFUSED = 4
    """A service refused the request: the registry, the object store, a local server."""
    INTERNAL = 5
    """An unexpected error (a bug): the traceback goes to the CLI's log file."""
    INTERRUPTED = 130
    """Interrupted (Ctrl-C); an upload says what was sent and the next run resumes it."""


def exit_code(error: TirelibError) -> ExitCode:
    """The exit status for an error tirelib raised on purpose, by what it means."""
    # An unreachable service first: those classes also derive from StorageError/RegistryError.
    if isinstance(error, ServiceUnavailableError):
        return ExitCode.UNAVAILABLE
    if isinstance(error, (ConfigurationError, DataError)):
        return ExitCode.BAD_INPUT
    if isinstance(error, (RegistryError, StorageError, StackError)):
        return ExitCode.SERVICE_REFUSED
    return ExitCode.BAD_INPUT


__all__ = ["ExitCode", "exit_code"]

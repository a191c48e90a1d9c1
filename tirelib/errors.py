"""Every exception tirelib raises, classified by what it means rather than where it was noticed.

Two families matter to a caller that decides whether to try again:

* **bad input** (:class:`ConfigurationError`, :class:`DataError` and their subclasses): a retry
  cannot help; Airflow's retry policy fails these at once and the CLI exits with status 2.
* **an unreachable service** (:class:`ServiceUnavailableError`: S3, MLflow, PostgreSQL,
  Prometheus, Slack):
  connection errors, timeouts, 5xx answers and throttling. These are retried with backoff.

Errors are classified once, where they enter tirelib (the S3 store, the registry's MLflow calls,
the lock's PostgreSQL connection), with :func:`is_transient_http_status` and the helpers below,
so the rest of the code never inspects a third-party exception again.
"""

from __future__ import annotations


class TirelibError(Exception):
    """Base class of every error tirelib raises on purpose."""


class ConfigurationError(TirelibError):
    """A setting or a hyperparameter has a value that is not allowed. Never retried."""


class DataError(TirelibError):
    """A dataset version, manifest or image is missing, malformed or inconsistent. Never retried."""


class VersionExistsError(DataError):
    """A dataset version already exists with different content."""


class ImageTooLargeError(DataError):
    """An image, or a request's images together, hold more pixels than the budget allows."""


class StorageError(TirelibError):
    """The object store refused a request (access denied, no such bucket, ...)."""


class StackError(TirelibError):
    """A local server of the stack failed to start, answer or stop."""


class RegistryError(TirelibError):
    """The model registry refused a request, or a registry operation cannot go ahead."""


class PromotionConflictError(RegistryError):
    """``production`` moved after the comparison a promotion was decided on was made."""


class ServiceUnavailableError(TirelibError):
    """A service could not be reached, timed out, answered 5xx or throttled: worth a retry.

    ``service`` names it (``S3``, ``MLflow``, ``PostgreSQL``, ``Slack``) for messages and for
    the failure marker of a dataset version.
    """

    service = "a service"


class StorageUnavailableError(ServiceUnavailableError, StorageError):
    """S3 could not be reached (connection refused or reset, timeout, 5xx, SlowDown)."""

    service = "S3"


class RegistryUnavailableError(ServiceUnavailableError, RegistryError):
    """The MLflow tracking server could not be reached, even after retries."""

    service = "MLflow"


class DatabaseUnavailableError(ServiceUnavailableError):
    """PostgreSQL could not be reached (the registry's lock, the MLflow backend)."""

    service = "PostgreSQL"


class PrometheusUnavailableError(ServiceUnavailableError):
    """Prometheus's HTTP API could not be reached, timed out or answered 5xx (monitoring)."""

    service = "Prometheus"


class UploadInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped an upload; the message says how many files were sent.

    Still a :class:`KeyboardInterrupt`, so whatever handles an interrupt handles this one; the
    CLI prints the message and exits 130. The next upload of the version resumes it.
    """


# S3 error codes that mean "slow down" or "try later", whatever the HTTP status says.
TRANSIENT_S3_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "RequestLimitExceeded",
    }
)


def is_transient_http_status(status: int | None) -> bool:
    """5xx answers and 429 (throttling) are worth a retry; other statuses are final."""
    return status is not None and (status >= 500 or status == 429)


def is_retryable(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) says a service was unreachable."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ServiceUnavailableError):
            return True
        if isinstance(current, (ConfigurationError, DataError)):
            return False
        seen.add(id(current))
        current = current.__cause__
    return False


RETRYABLE_ERRORS: tuple[str, ...] = (
    "tirelib.errors.ServiceUnavailableError",
    "tirelib.errors.StorageUnavailableError",
    "tirelib.errors.RegistryUnavailableError",
    "tirelib.errors.DatabaseUnavailableError",
    "tirelib.errors.PrometheusUnavailableError",
)
"""Dotted names for Airflow's ``ExceptionRetryPolicy``, which imports each one and matches with
``isinstance``: the base class alone would do, the subclasses are listed for the reader."""

FAIL_FAST_ERRORS: tuple[str, ...] = (
    "tirelib.errors.DataError",
    "tirelib.errors.VersionExistsError",
    "tirelib.errors.ConfigurationError",
)
"""Bad data or parameters: a retry cannot help."""

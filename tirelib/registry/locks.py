"""The lock of a registered model: held for the short read-check-write of its aliases.

A PostgreSQL advisory lock when ``TIRE_DATABASE_URL`` names PostgreSQL (it spans machines), else
an ``fcntl`` lock file under ``<home>/locks``. Both are released when the process dies. Nothing
slow happens under it: models are scored and loaded before it is taken.

Through PgPool (``TIRE_PGPOOL``) the advisory lock stays a session lock: PgPool pools whole
client sessions, so the lock lives on one backend connection for as long as our connection does,
and PgPool's ``reset_query_list`` (``ABORT; DISCARD ALL``) releases it before that backend
connection serves another client; a client that vanishes without closing has its backend
connection closed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import re
import time
from collections.abc import Iterator

from tirelib.errors import ConfigurationError, DatabaseUnavailableError, RegistryError
from tirelib.settings import Settings
from tirelib.urls import is_postgresql, libpq_url, mask_credentials, masked_url

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 120.0
"""How long an operation waits for another one's lock (holders only read and write tags)."""

# What a PostgreSQL server says when it refuses these credentials or this database: a setting
# to fix, not an outage to wait out.
_REFUSALS = ("authentication failed", "does not exist", "no pg_hba.conf entry", "permission denied")


def lock_key(model_name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_lock`` (Python's ``hash`` is salted)."""
    digest = hashlib.blake2b(f"tirelib.registry/{model_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextlib.contextmanager
def model_lock(settings: Settings, *, timeout: float = LOCK_TIMEOUT_S) -> Iterator[str]:
    """Hold the lock of ``settings.model_name`` (for read-check-write of its aliases).

    Yields a description of the lock. Raises :class:`RegistryError` after ``timeout`` seconds,
    :class:`DatabaseUnavailableError` (retryable) when PostgreSQL cannot be reached, and
    :class:`ConfigurationError` when it refuses the credentials or the database.
    """
    url = settings.client_database_url  # through PgPool when the stack puts it in front
    if url and is_postgresql(url):
        with _pg_lock(url, settings.model_name, timeout) as what:
            yield what
    else:
        with _file_lock(settings, timeout) as what:
            yield what


@contextlib.contextmanager
def _pg_lock(url: str, model_name: str, timeout: float) -> Iterator[str]:
    try:
        import psycopg2
        import psycopg2.errors
    except ImportError as error:
        raise ConfigurationError(
            "TIRE_DATABASE_URL names PostgreSQL but psycopg2 is not installed "
            "(pip install psycopg2-binary)"
        ) from error
    key = lock_key(model_name)
    where = masked_url(url)
    try:
        connection = psycopg2.connect(
            libpq_url(url), connect_timeout=10, application_name="tirelib-registry"
        )
    except psycopg2.Error as error:
        detail = mask_credentials(str(error).strip())
        if any(refusal in detail for refusal in _REFUSALS):
            raise ConfigurationError(
                f"cannot take the registry lock: PostgreSQL at {where} refused the connection "
                f"(check TIRE_DATABASE_URL): {detail}"
            ) from error
        raise DatabaseUnavailableError(
            f"cannot take the registry lock: PostgreSQL at {where} cannot be reached: {detail}"
        ) from error
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            try:
                cursor.execute("SET lock_timeout = %s", (f"{int(timeout * 1000)}ms",))
                cursor.execute("SELECT pg_advisory_lock(%s)", (key,))
            except psycopg2.errors.LockNotAvailable as error:
                raise RegistryError(
                    f"another registry operation on {model_name!r} held its lock for more "
                    f"than {timeout:g} s (PostgreSQL advisory lock {key} at {where})"
                ) from error
            except psycopg2.OperationalError as error:  # the server went away meanwhile
                raise DatabaseUnavailableError(
                    f"lost PostgreSQL at {where} while taking the registry lock: "
                    f"{mask_credentials(str(error).strip())}"
                ) from error
            log.debug("holding advisory lock %d for %s", key, model_name)
            try:
                yield f"PostgreSQL advisory lock {key}"
            finally:
                with contextlib.suppress(psycopg2.Error):  # closing releases it anyway
                    cursor.execute("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        with contextlib.suppress(psycopg2.Error):
            connection.close()


@contextlib.contextmanager
def _file_lock(settings: Settings, timeout: float) -> Iterator[str]:
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", settings.model_name)
    path = settings.home / "locks" / f"registry-{slug}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    # flock locks belong to the open file, so two threads of one process exclude each other too.
    with path.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"another registry operation on {settings.model_name!r} held the lock "
                        f"file {path} for more than {timeout:g} s"
                    ) from None
                time.sleep(0.1)
        try:
            yield f"lock file {path}"
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


__all__ = ["LOCK_TIMEOUT_S", "libpq_url", "lock_key", "model_lock"]

"""The exceptions tirelib raises.

Every error a user can cause derives from :class:`TirelibError`, so the CLI can turn it into a
clear message and exit status 2 instead of a traceback.
"""

from __future__ import annotations


class TirelibError(Exception):
    """Base class of every error tirelib raises on purpose."""


class ConfigurationError(TirelibError):
    """A setting or a hyperparameter has a value that is not allowed."""


class DataError(TirelibError):
    """A dataset version, manifest or image is missing, malformed or inconsistent."""


class VersionExistsError(DataError):
    """A dataset version already exists with different content."""


class StorageError(TirelibError):
    """The object store could not be reached or refused a request."""


class StackError(TirelibError):
    """A local server of the stack failed to start, answer or stop."""


class RegistryError(TirelibError):
    """The model registry refused a request, or a registry operation cannot go ahead."""


class RegistryUnavailableError(RegistryError):
    """The MLflow tracking server could not be reached, even after retries."""

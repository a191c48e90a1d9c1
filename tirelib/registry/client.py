"""The MLflow calls the registry makes for one registered model, with their errors classified.

Errors are classified here, where they enter tirelib: a tracking server that cannot be reached,
times out, or answers 5xx or 429 raises :class:`RegistryUnavailableError` (retryable); any other
refusal (4xx: unknown version, bad parameter, permission denied) raises :class:`RegistryError`.
Messages never show a password of the tracking URI.

MLflow calls retry transient HTTP errors with backoff (MLflow's own
``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``..._BACKOFF_FACTOR`` and ``..._TIMEOUT``, defaulted by
:func:`configure`); a server that stays down ends in :class:`RegistryUnavailableError` naming it.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import re
import socket
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException

from tirelib.errors import (
    ConfigurationError,
    RegistryError,
    RegistryUnavailableError,
)
from tirelib.registry.history import HistoryEvent, event_tag, parse_events
from tirelib.registry.results import PRODUCTION
from tirelib.settings import Settings
from tirelib.tracking import HTTP_DEFAULTS, apply_http_defaults, server_unreachable
from tirelib.urls import mask_credentials, masked_url

log = logging.getLogger(__name__)


def configure(settings: Settings) -> MlflowClient:
    """Point MLflow at the tracking server, with retry defaults for the registry; a client.

    The HTTP settings are MLflow's own variables (:data:`tirelib.tracking.HTTP_DEFAULTS`);
    values already in the environment win.
    """
    apply_http_defaults()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def who() -> str:
    """Who acts: the Airflow DAG run inside a task, else ``user@host``."""
    dag = os.environ.get("AIRFLOW_CTX_DAG_ID")
    if dag:
        return f"airflow:{dag}/{os.environ.get('AIRFLOW_CTX_DAG_RUN_ID', '?')}"
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, as in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class RegistryClient:
    """The calls the registry makes for one registered model, with MLflow errors translated."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.model_name
        self.uri = settings.mlflow_tracking_uri
        if "'" in self.name:
            raise ConfigurationError(f"model name {self.name!r} must not contain a quote")
        self.client = configure(settings)

    @property
    def where(self) -> str:
        """The tracking URI without its password, for messages."""
        return masked_url(self.uri)

    @contextlib.contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """Classify MLflow and HTTP failures: unreachable (retryable) or refused."""
        try:
            yield
        except (MlflowException, requests.RequestException) as error:
            detail = mask_credentials(
                str(error.message) if isinstance(error, MlflowException) else str(error)
            )
            if server_unreachable(error):
                raise self.unavailable(doing, detail) from error
            raise RegistryError(f"MLflow at {self.where} refused {doing}: {detail}") from error

    def unavailable(self, doing: str, detail: str) -> RegistryUnavailableError:
        retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "?")
        lowered = detail.lower()
        if "timeout" in lowered or "timed out" in lowered:
            cause = "timed out"
        elif "error code" in lowered or "too many" in lowered:  # 5xx, 429
            cause = "it answered with a server error or throttling"
        else:
            cause = "connection failed"
        return RegistryUnavailableError(
            f"cannot reach the MLflow tracking server at {self.where} while {doing} "
            f"({cause} after {retries} retries; is it running? see `tirelib stack status`). "
            "What was written before stays consistent (`tirelib registry history` marks an "
            "interrupted promotion); run the command again once it answers. "
            f"Detail: {mask_credentials(detail)[:300]}"
        )

    # -- reads

    def registered_model(self) -> RegisteredModel | None:
        try:
            return self.client.get_registered_model(self.name)
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def aliases(self) -> dict[str, str]:
        model = self.registered_model()
        return dict(model.aliases) if model is not None else {}

    def version(self, version: str) -> ModelVersion:
        try:
            return self.client.get_model_version(self.name, str(version))
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                known = ", ".join(v.version for v in self.versions()) or "none"
                raise RegistryError(
                    f"model {self.name!r} has no version {version!r} (versions: {known})"
                ) from error
            raise

    def versions(self, extra_filter: str = "") -> list[ModelVersion]:
        """Every version (paginated); ``search_model_versions`` leaves their aliases out."""
        query = f"name = '{self.name}'" + (f" and {extra_filter}" if extra_filter else "")
        found: list[ModelVersion] = []
        token: str | None = None
        while True:
            page = self.client.search_model_versions(query, max_results=1000, page_token=token)
            found.extend(page)
            token = page.token
            if not token:
                return sorted(found, key=lambda v: int(v.version))

    def version_for_run(self, run_id: str) -> ModelVersion | None:
        if not re.fullmatch(r"[0-9A-Za-z-]+", run_id):
            raise RegistryError(f"{run_id!r} is not an MLflow run id")
        matches = self.versions(f"run_id = '{run_id}'")
        return matches[0] if matches else None

    def run(self, run_id: str) -> Run:
        try:
            return self.client.get_run(run_id)
        except MlflowException as error:
            if error.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
                raise RegistryError(f"no MLflow run {run_id!r} at {self.where}") from error
            raise

    def run_link(self, run_id: str | None, experiment_id: str | None = None) -> str | None:
        if not run_id:
            return None
        if experiment_id is None:
            try:
                experiment_id = self.client.get_run(run_id).info.experiment_id
            except MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                return None
        return f"{self.uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    def events(self, model: RegisteredModel | None = None) -> list[HistoryEvent]:
        """The history events, oldest first, with ``applied`` derived from the alias chain."""
        model = model if model is not None else self.registered_model()
        if model is None:
            return []
        return parse_events(model.tags, model.aliases.get(PRODUCTION))

    # -- writes

    def ensure_model(self) -> None:
        try:
            self.client.create_registered_model(
                self.name, description="Tire defect classifier (tirelib)."
            )
        except MlflowException as error:
            if error.error_code not in {"RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"}:
                raise

    def set_tags(self, version: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, value)

    def delete_tags(self, version: ModelVersion, keys: Sequence[str]) -> None:
        for key in keys:
            if key in version.tags:
                self.client.delete_model_version_tag(self.name, version.version, key)

    def append_event(self, events: Sequence[HistoryEvent], event: Mapping[str, Any]) -> None:
        key, value = event_tag(events, event)
        self.client.set_registered_model_tag(self.name, key, value)

    def move_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, version)

    def archive(self, version: str, *, replaced_by: str, rolled_back: bool) -> None:
        tags = {"archived": "true", "archived_at": now(), "replaced_by": replaced_by}
        if rolled_back:
            tags["rolled_back"] = "true"
        self.set_tags(version, tags)

    def finish_interrupted(self, events: Sequence[HistoryEvent]) -> None:
        """Write the archive tags an interrupted promotion left out (step 4 of the order)."""
        last = events[-1] if events else None
        if last is None or not last.applied or last.previous in {None, last.version}:
            return
        replaced = self.version(str(last.previous))
        if "archived" not in replaced.tags:
            log.warning(
                "completing the interrupted %s of version %s: archiving version %s",
                last.action, last.version, replaced.version,
            )  # fmt: skip
            self.archive(
                replaced.version, replaced_by=last.version, rolled_back=last.action == "rollback"
            )

    def check_loadable(self, version: str) -> None:
        """Load the version as MLflow would serve it; refuse a promotion when that fails.

        A server that cannot be reached meanwhile is :class:`RegistryUnavailableError`, not a
        broken model.
        """
        uri = f"models:/{self.name}/{version}"
        saved_path = list(sys.path)  # loading prepends the model's code path
        try:
            with tempfile.TemporaryDirectory(prefix="tire-check-") as tmp:
                mlflow.pyfunc.load_model(uri, dst_path=tmp)
        except Exception as error:
            # Whatever breaks the load (missing files, bad weights, import errors) must stop
            # the promotion; the cause travels with the error.
            detail = mask_credentials(f"{type(error).__name__}: {str(error)[:300]}")
            if server_unreachable(error):
                raise self.unavailable(f"loading version {version}", detail) from error
            raise RegistryError(
                f"refusing to promote version {version} of {self.name!r}: its model cannot be "
                f"loaded ({detail})"
            ) from error
        finally:
            sys.path[:] = saved_path


__all__ = [
    "HTTP_DEFAULTS",
    "RegistryClient",
    "configure",
    "now",
    "who",
]

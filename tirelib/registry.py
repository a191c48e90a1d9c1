"""The model registry: which trained runs become versions, and which version serves.

The life cycle of the registered model ``settings.model_name``::

    register_run  a run whose test metrics meet the floors (Thresholds) becomes a version
    stage         alias ``staging`` -> the best version by a metric's test tag
    compare       candidate vs the ``production`` model, both scored on the candidate's test split
    produce       alias ``production`` -> the staging version, when it passes the gate
    rollback      alias ``production`` -> the version it replaced, in one step
    info, history what serves now, and every promotion so far

The gate is MLflow's own ``validate_evaluation_results``: value thresholds (floors; a ceiling for
loss) and, once there is a champion, a change threshold against it as the baseline in the metric
the user names. Every result is a small dataclass whose ``summary()`` is JSON for XCom; a
candidate that fails the gate is a *metric drop* (``metric_drop``), for the pipeline to report.

Consistency. Every operation that moves an alias holds a lock on the model for its whole
read-check-write: a PostgreSQL advisory lock when ``TIRE_DATABASE_URL`` names PostgreSQL (it
spans machines), else an ``fcntl`` lock under ``settings.home``. A promotion writes in this order,
so an interruption at any point leaves a registry that says what happened:

1. tags on the new version (``promoted_at``, ``promoted_by``, ``previous_production_version``)
2. the history event (a ``tirelib.history.<seq>`` tag of the registered model)
3. the ``production`` alias: the commit point
4. ``archived`` tags on the version it replaced

Before 3, production is untouched and the event reads as not applied (``applied`` is derived:
an event took effect when the next event's ``previous`` names its version, or, for the last one,
when ``production`` does). After 3, a missing step 4 is completed by the next operation under the
lock. The ``production`` alias therefore only ever points at a version whose tags are complete.

MLflow calls retry transient HTTP errors with backoff (MLflow's own
``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``..._BACKOFF_FACTOR`` and ``..._TIMEOUT``, defaulted by
:func:`configure`); a server that stays down ends in :class:`RegistryUnavailableError` naming it.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import math
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.models.evaluation import EvaluationResult
from mlflow.models.evaluation.validation import (
    MetricThreshold,
    ModelValidationFailedException,
    validate_evaluation_results,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tirelib.errors import ConfigurationError, RegistryError, RegistryUnavailableError
from tirelib.evaluate import MODEL_URI_TAG, Evaluation, evaluate_model
from tirelib.metrics import METRIC_NAMES, canonical_metric, higher_is_better
from tirelib.settings import Settings
from tirelib.stack import masked_url

log = logging.getLogger(__name__)

PRODUCTION = "production"
STAGING = "staging"
PREVIOUS_TAG = "previous_production_version"
ARCHIVE_TAGS = ("archived", "archived_at", "replaced_by", "rolled_back")
HISTORY_PREFIX = "tirelib.history."
METRIC_TAGS: tuple[str, ...] = (
    *(f"test_{name}" for name in METRIC_NAMES),
    "inference_ms_per_image",
)
"""The run metrics copied onto a version as tags, and shown by :func:`info`."""

HTTP_DEFAULTS = {
    # Four retries with backoff 1 wait about 0 + 2 + 4 + 8 s: a restarting server is ridden
    # out, a stopped one is reported within ~15 s (MLflow's own defaults wait ~4 minutes).
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
LOCK_TIMEOUT_S = 600.0
"""How long an operation waits for another one's lock (a gated promotion scores two models)."""

Action = Literal["promote", "force", "rollback"]


# --------------------------------------------------------------------------- the gate


class Thresholds(BaseModel):
    """What a model's test metrics must reach, and by how much it must beat the champion.

    ``accuracy`` ... ``roc_auc`` are floors (``>=``), ``loss`` is a ceiling (``<=``); ``None``
    switches a check off. ``margin`` is the least improvement over the production model in the
    chosen metric's own units; 0 means "at least as good". Keys may use the earlier names
    (``Accuracy``, ``F1``), as DAG params and JSON often do.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    accuracy: float | None = Field(default=0.80, ge=0, le=1)
    f1: float | None = Field(default=0.75, ge=0, le=1)
    precision: float | None = Field(default=None, ge=0, le=1)
    recall: float | None = Field(default=None, ge=0, le=1)
    roc_auc: float | None = Field(default=None, ge=0, le=1)
    loss: float | None = Field(default=None, gt=0)
    margin: float = Field(default=0.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _canonical_keys(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        out = {}
        for key, value in data.items():
            name = key.strip().lower() if isinstance(key, str) else key
            if isinstance(name, str) and name != "margin":
                with contextlib.suppress(ConfigurationError):  # unknown keys: extra="forbid"
                    name = canonical_metric(name)
            out[name] = value
        return out

    @classmethod
    def parse(cls, values: Mapping[str, Any] | None = None, **overrides: Any) -> Thresholds:
        """Defaults, then ``values`` (DAG params, JSON), then the ``overrides`` that are not None.

        Raises :class:`ConfigurationError` naming each bad value and what is allowed.
        """
        data = {**(values or {}), **{k: v for k, v in overrides.items() if v is not None}}
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            lines = [
                f"{'.'.join(map(str, item['loc'])) or 'thresholds'}={item.get('input')!r}: "
                f"{item['msg']}"
                for item in error.errors()
            ]
            raise ConfigurationError(
                "invalid thresholds:\n  " + "\n  ".join(lines) + f"\n  allowed keys: "
                f"{', '.join((*METRIC_NAMES, 'margin'))}"
            ) from error

    @classmethod
    def off(cls, margin: float = 0.0) -> Thresholds:
        """No floors at all: only the comparison with the champion counts."""
        return cls(**dict.fromkeys(METRIC_NAMES), margin=margin)

    def limits(self) -> dict[str, float]:
        """The checks that are on: canonical metric name -> floor (ceiling for loss)."""
        values = {name: getattr(self, name) for name in METRIC_NAMES}
        return {name: float(value) for name, value in values.items() if value is not None}

    def describe(self) -> str:
        text = ", ".join(
            f"{name} {'<=' if name == 'loss' else '>='} {value:g}"
            for name, value in self.limits().items()
        )
        return text or "no thresholds"

    def value_thresholds(self) -> dict[str, MetricThreshold]:
        """MLflow value thresholds on the ``test_*`` metrics."""
        return {
            f"test_{name}": MetricThreshold(
                threshold=value, greater_is_better=higher_is_better(name)
            )
            for name, value in self.limits().items()
        }

    def change_threshold(self, metric: str) -> dict[str, MetricThreshold]:
        """An MLflow change threshold: ``metric`` beats the baseline by at least ``margin``."""
        name = canonical_metric(metric)
        better = higher_is_better(name)
        # MLflow wants a positive min_absolute_change; a relative change of 0 says "not worse".
        threshold = (
            MetricThreshold(min_absolute_change=float(self.margin), greater_is_better=better)
            if self.margin > 0
            else MetricThreshold(min_relative_change=0.0, greater_is_better=better)
        )
        return {f"test_{name}": threshold}

    def check(self, metrics: Mapping[str, float]) -> list[str]:
        """Why ``metrics`` (``test_accuracy``...) miss the floors; empty when they pass."""
        return _validate(self.value_thresholds(), metrics, None)


@dataclass(frozen=True)
class Decision:
    """The gate's verdict: floors met, and champion beaten (``None`` when there is none)."""

    meets_thresholds: bool
    beats_champion: bool | None
    reasons: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.meets_thresholds and self.beats_champion is not False


def decide(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    *,
    metric: str,
    thresholds: Thresholds,
) -> Decision:
    """Judge a candidate's ``test_*`` metrics: floors, then ``metric`` against the champion's.

    Both checks run through MLflow's ``validate_evaluation_results``; the champion is the
    baseline. Without a champion only the floors apply.
    """
    name = canonical_metric(metric)
    missing_floors = thresholds.check(candidate)
    if champion is None:
        return Decision(not missing_floors, None, tuple(missing_floors))
    key = f"test_{name}"
    if key not in champion:
        lost = [f"the champion has no {key} to compare with"]
    else:
        lost = _validate(thresholds.change_threshold(name), candidate, champion)
    return Decision(not missing_floors, not lost, tuple(missing_floors + lost))


def _validate(
    thresholds: dict[str, MetricThreshold],
    candidate: Mapping[str, float],
    baseline: Mapping[str, float] | None,
) -> list[str]:
    if not thresholds:
        return []
    # run_id given, so EvaluationResult does not look for an active run.
    results = [
        EvaluationResult(metrics=dict(values), artifacts={}, run_id="")
        for values in (candidate, baseline)
        if values is not None
    ]
    try:
        validate_evaluation_results(thresholds, *results)
    except ModelValidationFailedException as failure:
        return [line.strip() for line in failure.message.splitlines() if line.strip()]
    return []


# --------------------------------------------------------------------------- results


@dataclass
class Registration:
    """What :func:`register_run` did with one run."""

    model_name: str
    run_id: str
    registered: bool
    version: str | None
    created: bool
    dataset_version: str | None
    model_type: str | None
    metrics: dict[str, float]
    thresholds: str
    reasons: list[str] = field(default_factory=list)

    @property
    def metric_drop(self) -> bool:
        """The run missed the floors (a message for Slack)."""
        return not self.registered

    def describe(self) -> str:
        if self.registered:
            how = "registered as" if self.created else "was already"
            return f"run {self.run_id} {how} version {self.version} of {self.model_name}"
        why = "; ".join(self.reasons)
        return f"run {self.run_id} was not registered ({self.thresholds}): {why}"

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "metric_drop": self.metric_drop, "message": self.describe()}


@dataclass
class Comparison:
    """A candidate and the production model scored on the same test split."""

    model_name: str
    metric: str
    dataset_version: str
    candidate_version: str
    champion_version: str | None
    candidate_score: float | None
    champion_score: float | None
    margin: float
    meets_thresholds: bool
    beats_champion: bool | None
    reasons: list[str]
    candidate_metrics: dict[str, float]
    champion_metrics: dict[str, float] | None

    @property
    def passed(self) -> bool:
        return self.meets_thresholds and self.beats_champion is not False

    @property
    def metric_drop(self) -> bool:
        """Below the floors or not better than the champion (a message for Slack)."""
        return not self.passed

    @property
    def difference(self) -> float | None:
        """Candidate minus champion, in the metric's units (for loss, negative is better)."""
        if self.candidate_score is None or self.champion_score is None:
            return None
        return self.candidate_score - self.champion_score

    def describe(self) -> str:
        head = (
            f"{self.model_name} version {self.candidate_version} on the test split of "
            f"{self.dataset_version}: {self.metric} {_fmt(self.candidate_score)}"
        )
        if self.champion_version is not None:
            head += (
                f" vs production version {self.champion_version} {_fmt(self.champion_score)} "
                f"(difference {_fmt(self.difference, signed=True)}, margin {self.margin:g})"
            )
        else:
            head += " (no production version yet: thresholds only)"
        verdict = "passes the gate" if self.passed else "fails the gate: " + "; ".join(self.reasons)
        return f"{head}; {verdict}"

    def summary(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "difference": self.difference,
            "passed": self.passed,
            "metric_drop": self.metric_drop,
            "message": self.describe(),
        }


@dataclass
class Staging:
    """Where :func:`stage` pointed the ``staging`` alias, and the scores it chose among."""

    model_name: str
    metric: str
    version: str
    score: float | None
    previous: str | None
    scores: dict[str, float]

    def describe(self) -> str:
        moved = "kept" if self.previous == self.version else "moved"
        by = f" ({self.metric} {_fmt(self.score)})" if self.score is not None else ""
        return f"{STAGING} of {self.model_name} {moved} at version {self.version}{by}"

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "message": self.describe()}


@dataclass
class Promotion:
    """What :func:`produce` or :func:`rollback` did to the ``production`` alias."""

    model_name: str
    action: Action
    version: str
    previous: str | None
    promoted: bool
    reason: str
    metric: str | None = None
    comparison: Comparison | None = None
    at: str | None = None
    by: str | None = None

    @property
    def metric_drop(self) -> bool:
        return self.comparison is not None and self.comparison.metric_drop

    def describe(self) -> str:
        if not self.promoted:
            return f"version {self.version} of {self.model_name} not promoted: {self.reason}"
        was = f" (was {self.previous})" if self.previous else ""
        verb = "rolled back to" if self.action == "rollback" else "now"
        head = f"{PRODUCTION} of {self.model_name} {verb} version {self.version}{was}"
        return f"{head}: {self.reason}"

    def summary(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k != "comparison"},
            "comparison": self.comparison.summary() if self.comparison else None,
            "metric_drop": self.metric_drop,
            "message": self.describe(),
        }


@dataclass(frozen=True)
class HistoryEvent:
    """One promotion or rollback. ``applied`` is false for one that was interrupted."""

    seq: int
    action: str
    version: str
    previous: str | None
    at: str
    by: str
    metric: str | None = None
    score: float | None = None
    champion_score: float | None = None
    applied: bool = True

    def summary(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VersionInfo:
    """One version as :func:`info` shows it."""

    version: str
    aliases: list[str]
    model_type: str | None
    dataset_version: str | None
    metrics: dict[str, float]
    run_id: str | None
    run_link: str | None
    model_uri: str
    source: str | None
    artifact_uri: str | None
    tags: dict[str, str]

    def summary(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RegistryInfo:
    """The ``production`` and ``staging`` versions of the registered model."""

    model_name: str
    tracking_uri: str
    exists: bool
    production: VersionInfo | None
    staging: VersionInfo | None
    version_count: int = 0

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


# --------------------------------------------------------------------------- locking


def _lock_key(model_name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_lock`` (Python's ``hash`` is salted)."""
    digest = hashlib.blake2b(f"tirelib.registry/{model_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg2://...``) as libpq reads it (``postgresql://``)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    base = scheme.split("+", 1)[0]
    return f"{'postgresql' if base == 'postgres' else base}://{rest}"


@contextlib.contextmanager
def model_lock(settings: Settings, *, timeout: float = LOCK_TIMEOUT_S) -> Iterator[str]:
    """Hold the lock of ``settings.model_name`` (for read-check-write of its aliases).

    A PostgreSQL advisory lock when ``settings.database_url`` names PostgreSQL, else an
    ``fcntl`` lock file under ``<home>/locks``. Both are released when the process dies. Yields
    a description of the lock; raises :class:`RegistryError` after ``timeout`` seconds.
    """
    url = settings.database_url
    if url and url.startswith(("postgresql", "postgres")):
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
        raise RegistryError(
            "TIRE_DATABASE_URL names PostgreSQL but psycopg2 is not installed "
            "(pip install psycopg2-binary)"
        ) from error
    key = _lock_key(model_name)
    where = masked_url(url)
    try:
        connection = psycopg2.connect(
            libpq_url(url), connect_timeout=10, application_name="tirelib-registry"
        )
    except psycopg2.Error as error:
        raise RegistryError(
            f"cannot take the registry lock: PostgreSQL at {where} refused a connection: "
            f"{str(error).strip()}"
        ) from error
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = %s", (f"{int(timeout * 1000)}ms",))
            try:
                cursor.execute("SELECT pg_advisory_lock(%s)", (key,))
            except psycopg2.errors.LockNotAvailable as error:
                raise RegistryError(
                    f"another registry operation on {model_name!r} held its lock for more "
                    f"than {timeout:g} s (PostgreSQL advisory lock {key} at {where})"
                ) from error
            log.debug("holding advisory lock %d for %s", key, model_name)
            try:
                yield f"PostgreSQL advisory lock {key}"
            finally:
                with contextlib.suppress(psycopg2.Error):  # closing releases it anyway
                    cursor.execute("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
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


# --------------------------------------------------------------------------- MLflow access


def configure(settings: Settings) -> MlflowClient:
    """Point MLflow at the tracking server, with retry defaults for the registry; a client.

    The HTTP settings are MLflow's own variables; values already in the environment win.
    """
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri)


def _now() -> str:
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


def _float(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


class _Registry:
    """The calls this module makes for one registered model, with MLflow errors translated."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.model_name
        self.uri = settings.mlflow_tracking_uri
        if "'" in self.name:
            raise ConfigurationError(f"model name {self.name!r} must not contain a quote")
        self.client = configure(settings)

    @contextlib.contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """Turn MLflow and HTTP failures into :class:`RegistryError` naming the server."""
        try:
            yield
        except MlflowException as error:
            message = str(error.message)
            if message.startswith("API request to"):  # what MLflow says once retries are spent
                raise self._unavailable(doing, message) from error
            raise RegistryError(f"MLflow at {self.uri} refused {doing}: {message}") from error
        except requests.RequestException as error:
            raise self._unavailable(doing, str(error)) from error

    def _unavailable(self, doing: str, detail: str) -> RegistryUnavailableError:
        retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "?")
        cause = "timed out" if "timeout" in detail.lower() else "connection failed"
        return RegistryUnavailableError(
            f"cannot reach the MLflow tracking server at {self.uri} while {doing} "
            f"({cause} after {retries} retries; is it running? see `tirelib stack status`). "
            "What was written before stays consistent (`tirelib registry history` marks an "
            "interrupted promotion); run the command again once it answers. "
            f"Detail: {detail[:300]}"
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
                raise RegistryError(f"no MLflow run {run_id!r} at {self.uri}") from error
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
        raw: list[tuple[int, dict[str, Any]]] = []
        for key, value in model.tags.items():
            if not key.startswith(HISTORY_PREFIX):
                continue
            try:
                raw.append((int(key.removeprefix(HISTORY_PREFIX)), json.loads(value)))
            except ValueError:
                log.warning("ignoring malformed history tag %s=%r", key, value)
        raw.sort(key=lambda item: item[0])
        applied = applied_flags([event for _, event in raw], model.aliases.get(PRODUCTION))
        return [
            HistoryEvent(
                seq=seq,
                action=str(event.get("action", "?")),
                version=str(event.get("version")),
                previous=event.get("previous"),
                at=str(event.get("at", "")),
                by=str(event.get("by", "")),
                metric=event.get("metric"),
                score=event.get("score"),
                champion_score=event.get("champion_score"),
                applied=flag,
            )
            for (seq, event), flag in zip(raw, applied, strict=True)
        ]

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

    def append_event(self, events: Sequence[HistoryEvent], event: Mapping[str, Any]) -> int:
        seq = max((e.seq for e in events), default=0) + 1
        self.client.set_registered_model_tag(
            self.name, f"{HISTORY_PREFIX}{seq:06d}", json.dumps(dict(event), sort_keys=True)
        )
        return seq

    def move_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, version)

    def archive(self, version: str, *, replaced_by: str, rolled_back: bool) -> None:
        tags = {"archived": "true", "archived_at": _now(), "replaced_by": replaced_by}
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
        """Load the version as MLflow would serve it; refuse a promotion when that fails."""
        uri = f"models:/{self.name}/{version}"
        saved_path = list(sys.path)  # loading prepends the model's code path
        try:
            with tempfile.TemporaryDirectory(prefix="tire-check-") as tmp:
                mlflow.pyfunc.load_model(uri, dst_path=tmp)
        except Exception as error:
            # Whatever breaks the load (missing files, bad weights, import errors) must stop
            # the promotion; the cause travels with the error.
            raise RegistryError(
                f"refusing to promote version {version} of {self.name!r}: its model cannot be "
                f"loaded ({type(error).__name__}: {str(error)[:300]})"
            ) from error
        finally:
            sys.path[:] = saved_path


def applied_flags(events: Sequence[Mapping[str, Any]], production: str | None) -> list[bool]:
    """Which events (oldest first) took effect: each is confirmed by the next one's
    ``previous``, and the last by the ``production`` alias itself."""
    flags = []
    for index, event in enumerate(events):
        version = str(event.get("version"))
        if index + 1 < len(events):
            flags.append(events[index + 1].get("previous") == version)
        else:
            flags.append(production == version)
    return flags


# --------------------------------------------------------------------------- the life cycle


def register_run(
    settings: Settings, run_id: str, *, thresholds: Thresholds | None = None
) -> Registration:
    """Make the run's logged model a version of ``settings.model_name`` if it meets the floors.

    The run's own ``test_*`` metrics are judged. A run registered before returns its existing
    version (looked up by run id, under the model's lock), so a retried task adds no duplicate.
    The version carries tags: dataset_version, model_type, source_run_id and the test metrics.
    """
    thresholds = thresholds or Thresholds()
    registry = _Registry(settings)
    with registry.errors(f"registering run {run_id}"):
        run = registry.run(run_id)
        model_uri = run.data.tags.get(MODEL_URI_TAG)
        if not model_uri:
            raise RegistryError(
                f"run {run_id} has no logged model (tag {MODEL_URI_TAG} is missing); "
                "only runs made by `tirelib train` can be registered"
            )
        metrics = {k: float(v) for k, v in run.data.metrics.items() if k in METRIC_TAGS}
        dataset_version = run.data.tags.get("dataset_version") or run.data.params.get(
            "dataset_version"
        )
        model_type = run.data.tags.get("model_type") or run.data.params.get("model_type")

        def result(version: ModelVersion | None, created: bool, reasons: list[str]) -> Registration:
            return Registration(
                model_name=registry.name,
                run_id=run_id,
                registered=version is not None,
                version=version.version if version is not None else None,
                created=created,
                dataset_version=dataset_version,
                model_type=model_type,
                metrics=metrics,
                thresholds=thresholds.describe(),
                reasons=reasons,
            )

        existing = registry.version_for_run(run_id)
        if existing is not None:
            log.info("run %s is already version %s", run_id, existing.version)
            return result(existing, False, [])
        reasons = thresholds.check(metrics)
        if reasons:
            log.warning("run %s misses the thresholds: %s", run_id, "; ".join(reasons))
            return result(None, False, reasons)
        tags = {
            "dataset_version": dataset_version or "",
            "model_type": model_type or "",
            "source_run_id": run_id,
            "registration_gate": thresholds.describe(),
            "registered_at": _now(),
            "registered_by": who(),
            **{name: repr(value) for name, value in metrics.items()},
        }
        if commit := run.data.tags.get("git_commit"):
            tags["git_commit"] = commit
        model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else None
        with model_lock(settings):
            existing = registry.version_for_run(run_id)  # a concurrent retry may have won
            if existing is not None:
                return result(existing, False, [])
            registry.ensure_model()
            # Tags go in with the version in one request: a version never lacks them.
            version = registry.client.create_model_version(
                registry.name,
                source=model_uri,
                run_id=run_id,
                tags=tags,
                run_link=registry.run_link(run_id, run.info.experiment_id),
                model_id=model_id if model_id and "/" not in model_id else None,
            )
        log.info("registered run %s as version %s of %s", run_id, version.version, registry.name)
        return result(version, True, [])


def compare(
    settings: Settings,
    candidate: str | int,
    *,
    metric: str = "f1",
    thresholds: Thresholds | None = None,
    progress: bool | None = None,
) -> Comparison:
    """Score ``candidate`` and the production model on the candidate's test split; judge it.

    Both go through :func:`tirelib.evaluate.evaluate_model` on the same images. With no
    production model the candidate only has to meet the floors.
    """
    thresholds = thresholds or Thresholds()
    registry = _Registry(settings)
    with registry.errors(f"comparing version {candidate}"):
        version = registry.version(str(candidate))
        champion = registry.aliases().get(PRODUCTION)
        return _compare(registry, version, champion, canonical_metric(metric), thresholds, progress)


def _compare(
    registry: _Registry,
    version: ModelVersion,
    champion: str | None,
    metric: str,
    thresholds: Thresholds,
    progress: bool | None,
) -> Comparison:
    dataset_version = version.tags.get("dataset_version")
    if not dataset_version:
        raise RegistryError(
            f"version {version.version} of {registry.name!r} has no dataset_version tag, so "
            "there is no test split to compare on; register runs with `tirelib registry register`"
        )

    def score(v: str) -> Evaluation:
        uri = f"models:/{registry.name}/{v}"
        log.info("scoring %s on the test split of %s", uri, dataset_version)
        return evaluate_model(uri, dataset_version, registry.settings, progress=progress)

    mine = score(version.version).flat()
    theirs: dict[str, float] | None = None
    if champion is not None:
        theirs = mine if champion == version.version else score(champion).flat()
    decision = decide(mine, theirs, metric=metric, thresholds=thresholds)
    key = f"test_{metric}"
    return Comparison(
        model_name=registry.name,
        metric=metric,
        dataset_version=dataset_version,
        candidate_version=version.version,
        champion_version=champion,
        candidate_score=mine.get(key),
        champion_score=theirs.get(key) if theirs is not None else None,
        margin=thresholds.margin,
        meets_thresholds=decision.meets_thresholds,
        beats_champion=decision.beats_champion,
        reasons=list(decision.reasons),
        candidate_metrics=mine,
        champion_metrics=theirs,
    )


def stage(
    settings: Settings,
    *,
    metric: str = "f1",
    version: str | int | None = None,
    dataset_version: str | None = None,
) -> Staging:
    """Point ``staging`` at the best version by its ``test_<metric>`` tag (or at ``version``).

    Archived versions (ones that left production) are not candidates; ``dataset_version``
    narrows the choice to the versions trained on it. Ties go to the newest version.
    """
    name = canonical_metric(metric)
    key = f"test_{name}"
    registry = _Registry(settings)
    with registry.errors("staging a version"), model_lock(settings):
        previous = registry.aliases().get(STAGING)
        scores: dict[str, float] = {}
        if version is not None:
            chosen = registry.version(str(version))
        else:
            candidates = {
                v.version: v
                for v in registry.versions()
                if "archived" not in v.tags
                and (dataset_version is None or v.tags.get("dataset_version") == dataset_version)
            }
            for number, v in candidates.items():
                value = _float(v.tags.get(key))
                if value is not None:
                    scores[number] = value
            if not scores:
                where = f" trained on {dataset_version!r}" if dataset_version else ""
                raise RegistryError(
                    f"model {registry.name!r} has no unarchived version{where} with a {key} tag "
                    "to stage; register a run first (`tirelib registry register --run-id ...`)"
                )
            sign = 1 if higher_is_better(name) else -1
            best = max(scores, key=lambda v: (sign * scores[v], int(v)))
            chosen = candidates[best]
        if previous != chosen.version:
            # Tags first, alias last: the alias never points at a version without them.
            registry.set_tags(
                chosen.version, {"staged_at": _now(), "staged_by": who(), "staging_metric": name}
            )
            registry.move_alias(STAGING, chosen.version)
        return Staging(
            model_name=registry.name,
            metric=name,
            version=chosen.version,
            score=_float(chosen.tags.get(key)),
            previous=previous,
            scores=scores,
        )


def produce(
    settings: Settings,
    *,
    metric: str = "f1",
    force: bool = False,
    version: str | int | None = None,
    thresholds: Thresholds | None = None,
    by: str | None = None,
    progress: bool | None = None,
) -> Promotion:
    """Promote the ``staging`` version (or ``version``) to ``production`` if it passes the gate.

    The gate is :func:`compare` against the current production model, under the model's lock,
    so two promotions racing are decided one after the other. ``force`` skips the gate, never
    the check that the model loads. The replaced version is tagged ``archived``; the new one
    records it as ``previous_production_version``, so :func:`rollback` is one step.
    """
    name = canonical_metric(metric)
    thresholds = thresholds or Thresholds()
    registry = _Registry(settings)
    with registry.errors("promoting a version"), model_lock(settings):
        model = registry.registered_model()
        aliases = dict(model.aliases) if model is not None else {}
        candidate = str(version) if version is not None else aliases.get(STAGING)
        if candidate is None:
            raise RegistryError(
                f"model {registry.name!r} has no {STAGING!r} version to promote; run "
                "`tirelib registry stage --metric ...` first, or pass --version"
            )
        chosen = registry.version(candidate)
        champion = aliases.get(PRODUCTION)
        events = registry.events(model)
        registry.finish_interrupted(events)
        action: Action = "force" if force else "promote"
        if champion == chosen.version:
            return Promotion(
                registry.name, action, chosen.version, champion, False,
                "it is already the production version", metric=name,
            )  # fmt: skip
        comparison = None
        if not force:
            comparison = _compare(registry, chosen, champion, name, thresholds, progress)
            if not comparison.passed:
                log.warning("metric drop: %s", comparison.describe())
                return Promotion(
                    registry.name, action, chosen.version, champion, False,
                    "; ".join(comparison.reasons), metric=name, comparison=comparison,
                )  # fmt: skip
        return _promote(registry, chosen, champion, events, action, name, comparison, by)


def rollback(settings: Settings, *, by: str | None = None) -> Promotion:
    """Move ``production`` back to the version it replaced, in one step.

    The version rolled back from is tagged ``archived`` and ``rolled_back``. The restored one
    keeps its own ``previous_production_version``, so a second rollback goes one further back.
    """
    registry = _Registry(settings)
    with registry.errors("rolling back"), model_lock(settings):
        model = registry.registered_model()
        aliases: dict[str, str] = dict(model.aliases) if model is not None else {}
        current = aliases.get(PRODUCTION)
        if current is None:
            raise RegistryError(f"model {registry.name!r} has no {PRODUCTION!r} version")
        events = registry.events(model)
        registry.finish_interrupted(events)
        target = registry.version(current).tags.get(PREVIOUS_TAG)
        if not target:
            raise RegistryError(
                f"production version {current} of {registry.name!r} records no previous "
                "production version: there is nothing to roll back to"
            )
        chosen = registry.version(target)
        return _promote(registry, chosen, current, events, "rollback", None, None, by)


def _promote(
    registry: _Registry,
    chosen: ModelVersion,
    previous: str | None,
    events: Sequence[HistoryEvent],
    action: Action,
    metric: str | None,
    comparison: Comparison | None,
    by: str | None,
) -> Promotion:
    """Move ``production`` to ``chosen`` in the documented order (see the module docstring)."""
    version = chosen.version
    registry.check_loadable(version)
    at, by = _now(), by or who()
    # 1. the new version's tags
    tags = {"promoted_at": at, "promoted_by": by, "promotion_action": action}
    if metric is not None:
        tags["promotion_metric"] = metric
    if action != "rollback":  # a restored version keeps its own predecessor
        if previous is not None:
            tags[PREVIOUS_TAG] = previous
        else:
            registry.delete_tags(chosen, [PREVIOUS_TAG])  # left by an interrupted attempt
    registry.set_tags(version, tags)
    registry.delete_tags(chosen, ARCHIVE_TAGS)
    # 2. the history event
    event = {
        "action": action,
        "version": version,
        "previous": previous,
        "at": at,
        "by": by,
        "metric": metric,
        "score": comparison.candidate_score if comparison else None,
        "champion_score": comparison.champion_score if comparison else None,
    }
    registry.append_event(events, event)
    # 3. the alias: the commit point
    registry.move_alias(PRODUCTION, version)
    # 4. the replaced version
    if previous is not None:
        registry.archive(previous, replaced_by=version, rolled_back=action == "rollback")
    reason = {
        "promote": comparison.describe() if comparison else "passed the gate",
        "force": "forced (gate skipped)",
        "rollback": f"rolled back from version {previous}",
    }[action]
    log.info("%s of %s -> version %s (%s)", PRODUCTION, registry.name, version, action)
    return Promotion(
        registry.name, action, version, previous, True, reason,
        metric=metric, comparison=comparison, at=at, by=by,
    )  # fmt: skip


def info(settings: Settings) -> RegistryInfo:
    """The production and staging versions: type, data, metrics, run link and model URIs."""
    registry = _Registry(settings)
    with registry.errors("reading the registry"):
        model = registry.registered_model()
        if model is None:
            return RegistryInfo(registry.name, registry.uri, False, None, None)
        by_version: dict[str, list[str]] = {}
        for alias, version in model.aliases.items():
            by_version.setdefault(version, []).append(alias)

        def describe(version: str | None) -> VersionInfo | None:
            if version is None:
                return None
            mv = registry.version(version)
            return VersionInfo(
                version=mv.version,
                aliases=sorted(by_version.get(mv.version, [])),
                model_type=mv.tags.get("model_type"),
                dataset_version=mv.tags.get("dataset_version"),
                metrics={
                    key: value
                    for key in METRIC_TAGS
                    if (value := _float(mv.tags.get(key))) is not None
                },
                run_id=mv.run_id,
                run_link=registry.run_link(mv.run_id),
                model_uri=f"models:/{registry.name}/{mv.version}",
                source=mv.source,
                artifact_uri=registry.client.get_model_version_download_uri(
                    registry.name, mv.version
                ),
                tags=dict(mv.tags),
            )

        return RegistryInfo(
            model_name=registry.name,
            tracking_uri=registry.uri,
            exists=True,
            production=describe(model.aliases.get(PRODUCTION)),
            staging=describe(model.aliases.get(STAGING)),
            version_count=len(registry.versions()),
        )


def history(settings: Settings, *, limit: int | None = None) -> list[HistoryEvent]:
    """Promotions and rollbacks, newest first; ``applied`` is false for interrupted ones."""
    registry = _Registry(settings)
    with registry.errors("reading the promotion history"):
        events = registry.events()
    newest = list(reversed(events))
    return newest[:limit] if limit is not None else newest


__all__ = [
    "PRODUCTION",
    "STAGING",
    "Comparison",
    "Decision",
    "HistoryEvent",
    "Promotion",
    "Registration",
    "RegistryInfo",
    "Staging",
    "Thresholds",
    "VersionInfo",
    "applied_flags",
    "compare",
    "configure",
    "decide",
    "history",
    "info",
    "libpq_url",
    "model_lock",
    "produce",
    "register_run",
    "rollback",
    "stage",
]

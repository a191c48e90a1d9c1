"""The pipeline's steps: every task the DAGs run is one function here, and the CLI can run it too.

Each step takes and returns small JSON values (version names, run ids, model versions, metrics)
so they travel through XCom. Each is idempotent: a retried task, or a re-run of a version, finds
the splits, runs and model versions made before and returns them instead of making new ones.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from tirelib import batch, data, notify
from tirelib.data import (
    DEFAULT_RATIOS,
    TireImageDataset,
    ensure_splits,
    processed_versions,
    read_manifest,
    validate_name,
)
from tirelib.errors import (
    ConfigurationError,
    DataError,
    RegistryError,
    ServiceUnavailableError,
    TirelibError,
    is_retryable,
)
from tirelib.logs import quiet_task_logs
from tirelib.settings import Settings, get_settings, secret_values
from tirelib.storage import ContentCache, ObjectStore, processed_key
from tirelib.urls import add_secrets, mask_credentials, url_secrets

log = logging.getLogger(__name__)

AWS_CONN_ID = "aws_default"


# --- settings inside and outside Airflow ---------------------------------------------------


def task_settings(conn_id: str = AWS_CONN_ID) -> Settings:
    """tirelib's settings, with S3 reached through Airflow's ``aws_default`` inside a task.

    Inside Airflow the endpoint, region and credentials come from the connection (its extra
    holds ``endpoint_url``), never from code; outside, from the environment as usual. Every
    step starts here, so inside a task this also keeps the libraries' chatter out of its log
    and masks every credential of the settings and the connection in it.
    """
    settings = get_settings()
    if not notify.in_airflow():
        return settings
    quiet_task_logs()
    _mask_everywhere(secret_values(settings))
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        connection = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        log.warning("no Airflow connection %r; using tirelib's own S3 settings", conn_id)
        return settings
    extra = connection.extra_dejson
    update: dict[str, Any] = {}
    if extra.get("endpoint_url"):
        update["s3_endpoint_url"] = str(extra["endpoint_url"]).rstrip("/")
    if extra.get("region_name"):
        update["aws_default_region"] = extra["region_name"]
    if connection.login:
        update["aws_access_key_id"] = connection.login
        update["aws_secret_access_key"] = SecretStr(connection.password or "")
    _mask_everywhere([connection.password or "", *url_secrets(update.get("s3_endpoint_url"))])
    return settings.model_copy(update=update)


def _mask_everywhere(values: list[str]) -> None:
    """Mask ``values`` in tirelib's messages and in Airflow's own task log (which logs a failed
    task's exception, causes and all, without tirelib's log records)."""
    from airflow.sdk.log import mask_secret

    add_secrets(*values)
    for value in values:
        if value:
            mask_secret(value)


def _store(settings: Settings) -> ObjectStore:
    return ObjectStore.for_data(settings)


# --- the sensor DAG ------------------------------------------------------------------------


def new_versions(settings: Settings | None = None) -> list[str]:
    """Versions waiting for the pipeline (state ``new``, manifest written), oldest first."""
    settings = settings or task_settings()
    waiting = data.waiting_versions(_store(settings), settle_seconds=settings.settle_seconds)
    return [v.version for v in waiting if v.complete]


def poke_new_versions(settings: Settings | None = None) -> list[str]:
    """The sensor's poke: the versions ready for the pipeline, oldest first.

    Stateless, so it works in reschedule mode: a version with a manifest and no marker is
    ready; one uploaded without a manifest is ingested first, once S3 says no object under it
    has changed for ``TIRE_SETTLE_SECONDS``. A version with no usable image is marked failed
    (Slack hears of it once) and the others go ahead.
    """
    settings = settings or task_settings()
    store = _store(settings)
    ready = []
    for info in data.waiting_versions(store, settle_seconds=settings.settle_seconds):
        if not info.complete:
            try:
                data.ingest_version(
                    store,
                    info.version,
                    cache=ContentCache(settings.resolved_cache_dir),
                    max_workers=settings.s3_max_workers,
                )
            except DataError as error:
                version_failed(
                    TaskFailure.here("wait_for_new_version", error, version=info.version),
                    settings,
                )
                continue
        ready.append(info.version)
    log.info("versions ready for the pipeline: %s", ready or "none")
    if notify.in_airflow():  # a poke that read the lake is the sensor working
        record_run(True, dag_id=os.environ["AIRFLOW_CTX_DAG_ID"], count=False, settings=settings)
    return ready


def announce_versions() -> dict[str, Any]:
    """The extra of the asset event that starts the training pipeline."""
    versions = new_versions()
    if not versions:
        raise DataError("the sensor fired but no unprocessed version is left")
    return {"version": versions[0], "pending": versions}


# --- the training pipeline -----------------------------------------------------------------


def _event_versions(events: Mapping[Any, Iterable[Any]] | None) -> list[str]:
    versions = []
    for asset_events in (events or {}).values():
        for event in asset_events:
            extra = getattr(event, "extra", None) or {}
            if extra.get("version"):
                versions.append(str(extra["version"]))
    return versions


def _event_version(store: ObjectStore, events: Mapping[Any, Iterable[Any]]) -> str | None:
    """The first version the asset events name that is neither processed nor marked failed."""
    candidates = _event_versions(events)
    finished = processed_versions(store) | data.failed_versions(store)
    fresh = [v for v in candidates if v not in finished]
    if not fresh:
        log.info("versions %s are processed or failed already: nothing to do", candidates or "none")
        return None
    return fresh[0]


def newest_waiting_version(settings: Settings | None = None) -> str:
    """The newest version in state ``new``: what a run started by hand without a version takes."""
    settings = settings or task_settings()
    waiting = data.waiting_versions(_store(settings), settle_seconds=settings.settle_seconds)
    complete = [v.version for v in waiting if v.complete]
    if not complete:
        raise DataError(
            "no dataset version is waiting: every version is processed, marked failed or still "
            "uploading (`tirelib data list` shows their states); name one in dataset_version "
            "to run it again, or clear a failed one with `tirelib data retry <version>`"
        )
    return complete[-1]


def resolve_version(
    params: Mapping[str, Any], triggering_asset_events: Mapping[Any, Iterable[Any]] | None = None
) -> list[dict[str, Any]]:
    """The training jobs of this run, one per model type (times a sweep's combinations), each
    naming the version to process.

    A run started by hand names its version in ``params`` (none named: the newest waiting
    version, or a :class:`DataError` saying none is waiting); one started by the sensor takes
    it from the asset event. A version processed or marked failed meanwhile gives no jobs: the
    run skips the rest, so duplicate events cost nothing. Every param is checked here, before
    any work: an unknown key, a bad hyperparameter or threshold, a sweep too large.
    """
    from tirelib.config import expand_jobs, parse_pipeline_params

    settings = task_settings()
    defaults = {"epochs": settings.pipeline_epochs} if settings.pipeline_epochs else {}
    run = parse_pipeline_params({**defaults, **params})
    version = params.get("dataset_version")
    source = "named in the run's params"
    if not version and triggering_asset_events:
        version = _event_version(_store(settings), triggering_asset_events)
        if version is None:
            return []
        source = "from the sensor's asset event"
    elif not version:
        version = newest_waiting_version(settings)
        source = "the newest waiting version: the run named none"
    version = validate_name(str(version))
    log.info("processing dataset version %s (%s)", version, source)
    read_manifest(_store(settings), version)  # a clear error for an unknown version
    jobs = expand_jobs(run, version)
    log.info(
        "version %s: %d training job(s): %s%s", version, len(jobs), run.model_types,
        f", sweep {jobs[0]['sweep']['id']} over {sorted(run.sweep)}" if run.sweep else "",
    )  # fmt: skip
    if os.environ.get("AIRFLOW_CTX_DAG_RUN_ID"):  # the sensor skips a version a run has taken
        data.mark_processing(_store(settings), version, os.environ["AIRFLOW_CTX_DAG_RUN_ID"])
    return jobs


def version_of(jobs: Sequence[Mapping[str, Any]]) -> str:
    """The dataset version a run's jobs train on (all of them name the same one)."""
    versions = {str(job["dataset_version"]) for job in jobs}
    if len(versions) != 1:
        raise DataError(f"the jobs of one run must share one dataset version, got {versions}")
    return versions.pop()


def validate_data(version: str) -> dict[str, Any]:
    """Every image of the version is in the cache, checksummed and decodable; counts per label."""
    settings = task_settings()
    store = _store(settings)
    manifest = read_manifest(store, version)
    labels = manifest.counts
    if len(labels) < 2:
        raise DataError(f"version {version!r} has labels {list(labels)}: at least two are needed")
    dataset = TireImageDataset(
        manifest.records, sorted(labels), ContentCache(settings.resolved_cache_dir), memory_mb=0
    )
    dataset.prepare(store, max_workers=settings.s3_max_workers, progress=False)
    for index in range(len(dataset)):
        dataset[index]  # decodes; a corrupt cached file raises here, before any training
    return {
        "version": version,
        "images": len(manifest.records),
        "labels": labels,
        "skipped": len(manifest.skipped),
    }


def split(version: str, ratios: Sequence[float] = DEFAULT_RATIOS) -> dict[str, dict[str, int]]:
    """The version's splits (made once; a re-run reads them back): counts per split and label."""
    splits = ensure_splits(_store(task_settings()), version, ratios)
    return {name: manifest.counts for name, manifest in splits.items()}


def train(job: Mapping[str, Any]) -> dict[str, Any]:
    """Train one model, or return the finished run of the same job trained before.

    A sweep's member (``job["sweep"]``) is tagged with the sweep and returns its place in it.
    """
    from tirelib.config import split_job
    from tirelib.train import find_finished_run
    from tirelib.train import train as run_training

    settings = task_settings()
    config, sweep = split_job(job)
    extra = {"sweep": sweep.as_dict()} if sweep is not None else {}
    earlier = find_finished_run(config, settings, sweep)
    if earlier is not None:
        log.info("job already trained in run %s; reusing it", earlier.run_id)
        return {**earlier.summary(), **extra}
    started = time.monotonic()
    result = run_training(config, settings, progress=False, sweep=sweep).summary()
    # Only a job trained here has a training time; a reused run reports none.
    return {**result, **extra, "training_seconds": round(time.monotonic() - started, 3)}


def evaluate(version: str, trained: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Challengers and the champion on the version's test split: the evidence the gate judges.

    A challenger's metrics are its run's: training tested it on this same split. The champion
    (the production version at this moment, by number) is scored here, once; ``promote`` judges
    these numbers and applies them only while production is still that version.
    """
    from tirelib.evaluate import evaluate_model
    from tirelib.registry import info

    settings = task_settings()
    production = info(settings).production
    champion = None
    if production is not None:
        uri = f"models:/{settings.model_name}/{production.version}"
        scored = evaluate_model(uri, version, settings, progress=False)
        champion = {"version": production.version, "metrics": scored.flat()}
    challengers = [
        {
            "run_id": t["run_id"],
            "model_type": t["model_type"],
            "metrics": t["test_metrics"],
            **({"training_seconds": t["training_seconds"]} if "training_seconds" in t else {}),
        }
        for t in trained
    ]
    return {"version": version, "champion": champion, "challengers": challengers}


def register(trained: Sequence[Mapping[str, Any]], thresholds: Mapping[str, Any]) -> list[dict]:
    """Register the runs that pass the thresholds; a run that fails them is a metric drop."""
    from tirelib.registry import Thresholds, register_run

    settings = task_settings()
    limits = Thresholds.parse(thresholds)
    results = [register_run(settings, t["run_id"], thresholds=limits).summary() for t in trained]
    for result in results:
        if result["metric_drop"]:
            notify.send(f":warning: metric drop: {result['message']}", settings)
    return results


def stage(registered: Sequence[Mapping[str, Any]], metric: str) -> dict[str, Any]:
    """Point ``staging`` at the best of this run's registered versions ({} when none passed).

    The registry's :func:`~tirelib.registry.best_version` chooses (ties: the newest version).
    """
    from tirelib.registry import best_version
    from tirelib.registry import stage as stage_version

    candidates = {str(r["version"]): r["metrics"] for r in registered if r["registered"]}
    if not candidates:
        log.info("no version of this run passed the thresholds: nothing to stage")
        return {}
    best = best_version(candidates, metric)
    if best is None:
        log.warning("no registered version of this run has a test %s: nothing to stage", metric)
        return {}
    return stage_version(task_settings(), metric=metric, version=best).summary()


def promote(
    staged: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    metric: str,
    thresholds: Mapping[str, Any],
) -> dict[str, Any]:
    """Move ``production`` to the staged version if, in ``evaluation``, it beats the champion.

    Nothing is scored here: the gate judges the ``evaluate`` task's numbers (the staged
    version's run and the champion on the same test split), and the promotion is applied only
    if production is still the champion that was scored (else PromotionConflictError).
    Returns {} when nothing was staged (XCom carries no None).
    """
    from tirelib.registry import Thresholds, judge, produce

    if not staged:
        return {}
    settings = task_settings()
    run_id = staged.get("run_id")
    challenger = next((c for c in evaluation.get("challengers", []) if c["run_id"] == run_id), None)
    if challenger is None:
        raise RegistryError(
            f"staged version {staged['version']} (run {run_id}) is not among the challengers "
            f"this run evaluated on {evaluation.get('version')!r}; stage a version of this run"
        )
    champion = evaluation.get("champion") or None
    comparison = judge(
        model_name=settings.model_name,
        dataset_version=str(evaluation["version"]),
        candidate_version=str(staged["version"]),
        candidate_metrics=challenger["metrics"],
        champion_version=str(champion["version"]) if champion else None,
        champion_metrics=champion["metrics"] if champion else None,
        metric=metric,
        thresholds=Thresholds.parse(thresholds),
    )
    result = produce(
        settings, comparison=comparison, by=os.environ.get("AIRFLOW_CTX_DAG_RUN_ID")
    ).summary()
    if result["metric_drop"]:
        notify.send(f":warning: metric drop: {result['message']}", settings)
    return result


def mark_processed(version: str, summary: Mapping[str, Any]) -> str:
    """Write ``state/processed/<version>.json``: the sensor will not announce it again."""
    data.mark_processed(_store(task_settings()), version, dict(summary))
    return processed_key(version)


def report(version: str, evaluation: Mapping[str, Any], promotion: Mapping[str, Any]) -> str:
    """A summary of the run for Slack: the challengers, the champion, what was promoted."""
    settings = task_settings()
    lines = [f"*tire pipeline* on dataset version `{version}`"]
    for challenger in evaluation.get("challengers", []):
        metrics = challenger["metrics"]
        lines.append(
            f"- {challenger['model_type']} (run {challenger['run_id'][:8]}): "
            f"accuracy {metrics.get('test_accuracy', float('nan')):.3f}, "
            f"f1 {metrics.get('test_f1', float('nan')):.3f}"
        )
    champion = evaluation.get("champion")
    if champion:
        metrics = champion["metrics"]
        lines.append(
            f"- champion v{champion['version']} on the same split: "
            f"accuracy {metrics.get('test_accuracy', float('nan')):.3f}, "
            f"f1 {metrics.get('test_f1', float('nan')):.3f}"
        )
    if not promotion:
        lines.append("no model was promoted (none passed the thresholds)")
    else:
        emoji = ":rocket:" if promotion["promoted"] else ":no_entry:"
        lines.append(f"{emoji} {promotion['message']}")
    text = "\n".join(lines)
    notify.send(text, settings)
    dag_id = os.environ.get("AIRFLOW_CTX_DAG_ID", TRAINING_DAG)
    record_run(True, dag_id=dag_id, evaluation=evaluation, promotion=promotion, settings=settings)
    return text


# --- batch-job metrics ---------------------------------------------------------------------

TRAINING_DAG = "tire_training_pipeline"


def record_run(
    succeeded: bool,
    *,
    dag_id: str,
    evaluation: Mapping[str, Any] | None = None,
    promotion: Mapping[str, Any] | None = None,
    count: bool = True,
    settings: Settings | None = None,
) -> bool:
    """Push the end of a run of ``dag_id`` to the Pushgateway (``TIRE_PUSHGATEWAY_URL``).

    Pushed: the time of the success or failure; with ``count``, the lake's processed and failed
    versions; from a training run's ``evaluation`` the seconds spent training each model type,
    and from its ``promotion`` the version promoted and its test metrics. True when pushed;
    never raises (see :mod:`tirelib.jobmetrics`).
    """
    from tirelib.jobmetrics import RunMetrics, push

    settings = settings or task_settings()
    if not settings.pushgateway_url:
        return False
    processed = failed = None
    if count:
        try:
            store = _store(settings)
            processed, failed = len(processed_versions(store)), len(data.failed_versions(store))
        except TirelibError as error:  # S3 may be what failed: push the time all the same
            log.warning("dataset versions not counted for the pipeline metrics: %s", error)
    seconds: dict[str, float] = {}
    for challenger in (evaluation or {}).get("challengers", []):
        if "training_seconds" in challenger:
            kind = str(challenger["model_type"])
            seconds[kind] = seconds.get(kind, 0.0) + float(challenger["training_seconds"])
    version, metrics = _promoted(promotion)
    return push(
        RunMetrics(
            dag_id=dag_id,
            succeeded=succeeded,
            versions_processed=processed,
            versions_failed=failed,
            training_seconds=seconds,
            promoted_version=version,
            promoted_metrics=metrics,
        ),
        settings,
    )


def _promoted(promotion: Mapping[str, Any] | None) -> tuple[int | None, dict[str, float]]:
    """The version a promotion moved production to and its test metrics (none: not promoted)."""
    if not promotion or not promotion.get("promoted"):
        return None, {}
    comparison = promotion.get("comparison") or {}
    metrics = {
        name.removeprefix("test_"): float(value)
        for name, value in (comparison.get("candidate_metrics") or {}).items()
        if name.startswith("test_") and isinstance(value, int | float)
    }
    try:
        return int(promotion["version"]), metrics
    except (KeyError, TypeError, ValueError):
        return None, metrics


# --- batch prediction ----------------------------------------------------------------------


def ready_batches(settings: Settings | None = None) -> list[str]:
    """The batch sensor's poke: batches under ``inbox/`` settled and not scored yet."""
    settings = settings or task_settings()
    ready = batch.ready_batches(_store(settings), settle_seconds=settings.settle_seconds)
    log.info("batches ready to score: %s", ready or "none")
    _batch_dag_worked(settings)
    return ready


def predict_batch(name: str, settings: Settings | None = None) -> dict[str, Any]:
    """Score ``inbox/<name>/`` with the production model into ``predictions/<name>.jsonl``.

    A batch scored before is not scored again (and the model is not even loaded).
    """
    settings = settings or task_settings()
    store = _store(settings)
    report = batch.predict_batch(
        store,
        name,
        lambda: batch.load_model(settings),
        batch_size=settings.predict_batch_size,
        max_workers=settings.s3_max_workers,
        progress=False,
    )
    _batch_dag_worked(settings)
    if report is None:
        return {"batch": name, "scored_before": True}
    return {"batch": name, **report.summary()}


def _batch_dag_worked(settings: Settings) -> None:
    """Push the batch DAG's success time, so a failure before is known to be over."""
    if notify.in_airflow():
        record_run(True, dag_id=os.environ["AIRFLOW_CTX_DAG_ID"], count=False, settings=settings)


# --- monitoring ----------------------------------------------------------------------------


def monitor() -> dict[str, Any]:
    """The monitoring DAG's check: drift and live accuracy of the production version, Slack
    when a threshold is crossed, a rollback when TIRE_AUTO_ROLLBACK allows it.

    Inside Airflow a finished check pushes the DAG's success time, so the failure alert of an
    earlier run clears once monitoring works again.
    """
    from tirelib import monitoring

    settings = task_settings()
    summary = monitoring.check(settings).summary()
    if notify.in_airflow():
        record_run(True, dag_id=os.environ["AIRFLOW_CTX_DAG_ID"], count=False, settings=settings)
    return summary


# --- failures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskFailure:
    """A task that failed for good, in plain values: what the failure callback knows."""

    dag_id: str
    task_id: str
    error: BaseException | None
    run_id: str | None = None
    try_number: int = 1
    max_tries: int = 0
    log_url: str | None = None
    version: str | None = None  # the dataset version the run worked on, when known

    @classmethod
    def here(cls, task_id: str, error: BaseException, *, version: str | None) -> TaskFailure:
        """A failure noticed inside a running task (the sensor's ingestion of one version)."""
        return cls(
            dag_id=os.environ.get("AIRFLOW_CTX_DAG_ID", "tirelib"),
            task_id=task_id,
            error=error,
            run_id=os.environ.get("AIRFLOW_CTX_DAG_RUN_ID"),
            version=version,
        )

    @property
    def kind(self) -> str:
        """``bad_input`` (never retried), ``infrastructure`` (a service stayed unreachable)
        or ``error`` (anything else, retried like an outage)."""
        if isinstance(self.error, (ConfigurationError, DataError)):
            return "bad_input"
        if self.error is not None and is_retryable(self.error):
            return "infrastructure"
        return "error"

    @property
    def service(self) -> str | None:
        """The unreachable service (``S3``, ``MLflow``, ...) behind an infrastructure error."""
        current = self.error
        while current is not None:
            if isinstance(current, ServiceUnavailableError):
                return current.service
            current = current.__cause__
        return None

    def outcome(self) -> str:
        """How the task ended, in words that match what the retry policy did."""
        n = self.try_number
        if self.kind == "bad_input":
            if n <= 1:
                return "failed at once: bad input, a retry cannot help"
            return f"failed on try {n}: bad input, not retried"
        if n <= self.max_tries:  # tries were left: something ended it without a retry
            return "failed at once, not retried" if n <= 1 else f"failed on try {n}, not retried"
        tries = f"{n} {'try' if n == 1 else 'tries'}"
        if self.service:
            return f"failed for good after {tries}: {self.service} stayed unreachable"
        return f"failed for good after {tries}"

    @property
    def reason(self) -> str:
        if self.error is None:
            return "no error was given"
        # Written to the failed marker and sent to Slack: no credential may ride along.
        return mask_credentials(f"{type(self.error).__name__}: {self.error}")

    def marker(self) -> dict[str, Any]:
        """The content of ``state/failed/<version>.json`` (the time is added when written)."""
        error = type(self.error) if self.error is not None else None
        return {
            "reason": self.reason[:2000],
            "kind": self.kind,
            "error": f"{error.__module__}.{error.__qualname__}" if error else None,
            "service": self.service,
            "outcome": self.outcome(),
            "dag_id": self.dag_id,
            "task": self.task_id,
            "run_id": self.run_id,
            "run_url": self.log_url,
            "tries": self.try_number,
        }


def version_failed(failure: TaskFailure, settings: Settings | None = None) -> dict[str, Any] | None:
    """Mark the version of a failed run and tell Slack, once; returns the failed marker.

    Newer versions go ahead: the sensor and asset-triggered runs skip a version marked failed
    until ``tirelib data retry`` clears the mark. Bad parameters of a run
    (:class:`ConfigurationError`) do not mark its version, whose data was not judged, and a
    version the lake does not hold (a misspelled name) is not marked either. When S3 itself is
    what failed, the mark cannot be written, and Slack still hears. Never raises.
    """
    settings = settings or task_settings()
    version = failure.version if failure.version and data.NAME_RE.match(failure.version) else None
    marker = None
    if version is not None:
        try:
            store = _store(settings)
            if not data.version_exists(store, version):
                version = None
            elif isinstance(failure.error, ConfigurationError):
                if failure.run_id:
                    data.release_version(store, version, failure.run_id)
                version = None
            else:
                earlier = data.read_failure(store, version)
                if earlier and failure.run_id and earlier.get("run_id") == failure.run_id:
                    log.info("version %s is marked failed by this run already", version)
                    return earlier  # Slack heard of it when the mark was written
                marker = data.mark_failed(store, version, failure.marker())
        except TirelibError as error:
            log.warning("could not mark dataset version %s failed: %s", version, error)
    lines = [f":red_circle: {failure.dag_id}.{failure.task_id} {failure.outcome()}"]
    lines[0] += f": {failure.reason[:800]}"
    if marker is not None:
        lines.append(
            f"dataset version `{version}` is marked failed; newer versions go ahead. "
            f"Fix it, then `tirelib data retry {version}`"
        )
    if failure.log_url:
        lines.append(f"log: {failure.log_url}")
    notify.send("\n".join(lines), settings)
    return marker

"""What the DAG files share: the data asset, the new-version sensor, the failure callback, the
retry policy.

Imported at DAG-parse time, so it imports Airflow's SDK and tirelib's settings only.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from airflow.sdk import (
    Asset,
    BaseSensorOperator,
    Context,
    ExceptionRetryPolicy,
    PokeReturnValue,
    RetryAction,
    RetryRule,
)

from tirelib.errors import FAIL_FAST_ERRORS, RETRYABLE_ERRORS
from tirelib.settings import Settings

RESOLVE_TASK = "resolve_version"  # the pipeline's first task; its XCom names the run's version


def raw_data_asset(settings: Settings) -> Asset:
    """The asset the sensor emits and the training pipeline is scheduled on."""
    return Asset(uri=f"s3://{settings.data_bucket}/raw", name="tire_raw_data")


class NewVersionSensor(BaseSensorOperator):
    """Waits for a dataset version ready for the pipeline; its XCom lists them, oldest first.

    Each poke is :func:`tirelib.pipeline.poke_new_versions`, which decides from S3 alone
    (markers, and LastModified for the settle period of uploads without a manifest), so it
    keeps nothing between pokes and works in reschedule mode, holding no worker slot while it
    waits. The amazon provider's ``S3KeysUnchangedSensor`` keeps its "unchanged since" state in
    memory, which reschedule mode loses at every poke, so it cannot serve here.
    """

    def poke(self, context: Context) -> PokeReturnValue:
        from tirelib.pipeline import poke_new_versions

        ready = poke_new_versions()
        return PokeReturnValue(is_done=bool(ready), xcom_value=ready)


class NewBatchSensor(BaseSensorOperator):
    """Waits for image batches under ``inbox/`` to score; its XCom lists them, oldest first.

    Each poke is :func:`tirelib.pipeline.ready_batches`: a batch without
    ``predictions/<batch>.jsonl`` whose objects have not changed for ``TIRE_SETTLE_SECONDS``.
    Decided from S3 alone, like :class:`NewVersionSensor`, so it works in reschedule mode.
    """

    def poke(self, context: Context) -> PokeReturnValue:
        from tirelib.pipeline import ready_batches

        ready = ready_batches()
        return PokeReturnValue(is_done=bool(ready), xcom_value=ready)


def failure_notifier() -> Callable[[Context], None]:
    """The ``on_failure_callback`` of every task: :func:`on_task_failure`."""
    return on_task_failure


def on_task_failure(context: Context) -> None:
    """A task failed for good: bad input at once, or an outage or error after its retries.

    Runs in the task's own process (Airflow 3), after the retry policy decided. Marks the run's
    dataset version failed (``state/failed/<version>.json``: reason, task, run link, time) so
    the sensor skips it and newer versions go ahead, and posts to Slack once, saying whether the
    error was failed at once or after how many tries. Without a ``slack_webhook`` connection
    that is one quiet log line; a Slack that cannot be reached never fails anything. Then the
    failure's time goes to the Pushgateway (``TIRE_PUSHGATEWAY_URL``), which alerts on it.
    """
    from tirelib.pipeline import TaskFailure, record_run, version_failed

    ti = context["ti"]
    error = context.get("exception")
    mapped = ti.map_index is not None and ti.map_index >= 0
    failure = TaskFailure(
        dag_id=ti.dag_id,
        task_id=f"{ti.task_id}[{ti.map_index}]" if mapped else ti.task_id,
        error=error if isinstance(error, BaseException) else None,
        run_id=ti.run_id,
        try_number=ti.try_number,
        max_tries=ti.max_tries,
        log_url=ti.log_url,
        version=_run_version(context),
    )
    version_failed(failure)
    record_run(False, dag_id=ti.dag_id)


def _run_version(context: Context) -> str | None:
    """The dataset version of the failed task's run: what ``resolve_version`` chose, else the
    version the run was started with (params, or the asset event's extra)."""
    from tirelib.pipeline import version_of

    ti = context["ti"]
    if ti.task_id != RESOLVE_TASK and RESOLVE_TASK in context["dag"].task_ids:
        jobs = ti.xcom_pull(task_ids=RESOLVE_TASK)
        if jobs:
            return version_of(jobs)
    named = (context.get("params") or {}).get("dataset_version")
    if named:
        return str(named)
    for events in (context.get("triggering_asset_events") or {}).values():
        for event in events:
            if (event.extra or {}).get("version"):
                return str(event.extra["version"])
    return None


# Rules match subclasses (isinstance) and the first match wins. An unreachable S3, MLflow or
# PostgreSQL is retried with the task's backoff; bad data or a bad parameter fails at once, and
# so does a promotion refused on stale evidence (a retry would judge the same evaluate result);
# anything else (a bug, an error nobody classified) gets the task's ordinary retries.
RETRY_POLICY = ExceptionRetryPolicy(
    rules=[
        RetryRule(
            exception=list(RETRYABLE_ERRORS),
            action=RetryAction.RETRY,
            reason="a service could not be reached: retrying with backoff",
        ),
        RetryRule(
            exception=list(FAIL_FAST_ERRORS),
            action=RetryAction.FAIL,
            reason="bad data or parameters: a retry cannot help",
        ),
        RetryRule(
            exception="tirelib.errors.PromotionConflictError",
            action=RetryAction.FAIL,
            reason="production moved after evaluate compared: evaluate again, then promote",
        ),
    ]
)


def io_retries(retries: int = 3) -> dict[str, Any]:
    """Retries with exponential backoff (20 s, 40 s, ... at most 5 min) and :data:`RETRY_POLICY`.

    For tasks that talk to S3, MLflow, PostgreSQL or Slack and are safe to run again
    (idempotent): an outage is retried, bad input fails at once.
    """
    return {
        "retries": retries,
        "retry_delay": timedelta(seconds=20),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=5),
        "retry_policy": RETRY_POLICY,
    }

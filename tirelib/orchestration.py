"""What the two DAG files share: the data asset, the Slack failure notifier, retry policy.

Imported at DAG-parse time, so it imports Airflow's SDK and tirelib's settings only.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier
from airflow.sdk import Asset, ExceptionRetryPolicy, RetryAction, RetryRule

from tirelib.errors import FAIL_FAST_ERRORS, RETRYABLE_ERRORS
from tirelib.notify import SLACK_CONN_ID
from tirelib.settings import Settings


def raw_data_asset(settings: Settings) -> Asset:
    """The asset the sensor emits and the training pipeline is scheduled on."""
    return Asset(uri=f"s3://{settings.data_bucket}/raw", name="tire_raw_data")


def failure_notifier() -> SlackWebhookNotifier:
    """Slack on failure: DAG, task, try, error and a link to the log (connection slack_webhook).

    A notifier that cannot reach Slack is logged by Airflow and never fails the task.
    """
    return SlackWebhookNotifier(
        slack_webhook_conn_id=SLACK_CONN_ID,
        text=(
            ":red_circle: {{ dag.dag_id }}.{{ ti.task_id }} failed "
            "(try {{ ti.try_number }} of {{ ti.max_tries + 1 }}): {{ exception }}\n"
            "log: {{ ti.log_url }}"
        ),
    )


# Rules match subclasses (isinstance) and the first match wins. An unreachable S3, MLflow or
# PostgreSQL is retried with the task's backoff; bad data or a bad parameter fails at once;
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

"""Slack messages: failures, metric drops, promotions. Slack being down never fails the caller.

Inside Airflow the webhook is the ``slack_webhook`` connection, sent through the Slack provider's
hook; elsewhere it is ``TIRE_SLACK_WEBHOOK_URL``, sent with slack-sdk. Both retry briefly.
"""

from __future__ import annotations

import logging
import os

from tirelib.settings import Settings
from tirelib.urls import mask_credentials

log = logging.getLogger(__name__)

SLACK_CONN_ID = "slack_webhook"
TIMEOUT_S = 10


def in_airflow() -> bool:
    """True inside an Airflow task process (Airflow exports its context to the environment)."""
    return "AIRFLOW_CTX_DAG_ID" in os.environ


def send(text: str, settings: Settings, *, conn_id: str = SLACK_CONN_ID) -> bool:
    """Post ``text`` to Slack; True when Slack accepted it. Errors are logged, never raised.

    Credentials in ``text`` (an error's URL, a secret setting) are masked before it leaves.
    """
    text = mask_credentials(text)
    try:
        if in_airflow():
            return _send_with_airflow(text, conn_id)
        return _send_with_sdk(text, settings)
    # A notification must never break the work it reports on, whatever went wrong.
    except Exception as error:
        detail = mask_credentials(str(error))
        log.warning("Slack message not sent (%s: %s): %s", type(error).__name__, detail, text[:200])
        return False


def _send_with_sdk(text: str, settings: Settings) -> bool:
    if settings.slack_webhook_url is None:
        log.info("no TIRE_SLACK_WEBHOOK_URL set; Slack message not sent: %s", text[:200])
        return False
    return post_webhook(settings.slack_webhook_url.get_secret_value(), text)


def post_webhook(url: str, text: str, *, timeout: float = TIMEOUT_S) -> bool:
    """Post ``{"text": text}`` to an incoming webhook with slack-sdk; True when it was taken.

    Never raises: a message that cannot be sent is logged and the caller carries on. The text
    is masked (:func:`~tirelib.urls.mask_credentials`) before it is sent.
    """
    from slack_sdk.http_retry.builtin_handlers import ConnectionErrorRetryHandler
    from slack_sdk.webhook import WebhookClient

    client = WebhookClient(
        url,
        timeout=int(max(1, timeout)),
        retry_handlers=[ConnectionErrorRetryHandler(max_retry_count=2)],
    )
    try:
        response = client.send(text=mask_credentials(text))
    except (OSError, ValueError) as error:  # URLError and timeouts are OSErrors
        log.warning("could not post to Slack: %s", mask_credentials(str(error)))
        return False
    if response.status_code != 200:
        log.warning("Slack answered %d %s", response.status_code, str(response.body)[:200])
        return False
    return True


def _send_with_airflow(text: str, conn_id: str) -> bool:
    from airflow.providers.slack.hooks.slack_webhook import SlackWebhookHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        hook = SlackWebhookHook(slack_webhook_conn_id=conn_id, timeout=TIMEOUT_S)
        hook.send(text=text)
    except AirflowNotFoundException:
        log.info("no Airflow connection %r; Slack message not sent: %s", conn_id, text[:200])
        return False
    return True

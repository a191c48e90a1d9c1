"""Credentials never leave the process: every answer, message, log line, Slack text and MLflow tag
masks the password of any URL, secret query parameters, Slack webhook paths and the literal
values of the secret settings (AWS secret key, webhook URL, database passwords)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from botocore.exceptions import EndpointConnectionError

from tirelib.errors import ConfigurationError, DatabaseUnavailableError, StorageUnavailableError
from tirelib.logs import RedactingFilter
from tirelib.pipeline import TaskFailure
from tirelib.serve.client import ServingClient, ServingError
from tirelib.serve.config import load_serve_config
from tirelib.serve.model import ModelHolder, ModelLoadError
from tirelib.settings import load_settings, secret_values
from tirelib.storage import classify
from tirelib.urls import Redactor, mask_credentials, masked_url

pytestmark = pytest.mark.unit

SECRET = "Hunter2-s3cr3t"


# --- the masking rules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://alice:pw-1234@mlflow:5000/api", "http://alice:***@mlflow:5000/api"),
        ("postgresql+psycopg2://u:pw-1234@db/x", "postgresql+psycopg2://u:***@db/x"),
        ("see https://:tok-1234@h/x and s3://k:pw-5678@h", "see https://:***@h/x and s3://k:***@h"),
        ("https://b.s3.amazonaws.com/k?X-Amz-Signature=abc123&X-Amz-Date=1",
         "https://b.s3.amazonaws.com/k?X-Amz-Signature=***&X-Amz-Date=1"),
        ("dsn: host=db user=u password='pw-1234' dbname=x",
         "dsn: host=db user=u password='***' dbname=x"),
        ("POST https://hooks.slack.com/services/T01/B02/abcdef failed",
         "POST https://hooks.slack.com/services/*** failed"),
        ("http://alice@h/x (no password)", "http://alice@h/x (no password)"),
        ("next_page_token=abc stays", "next_page_token=abc stays"),
    ],
)  # fmt: skip
def test_structural_credentials_are_masked(text: str, expected: str) -> None:
    assert Redactor()(text) == expected


def test_known_secret_values_are_masked_wherever_they_appear() -> None:
    redact = Redactor(["p@ss/word!", "abc", None, ""])
    # A password with '@' and '/' defeats the URL pattern; its literal value does not.
    assert redact("http://u:p@ss/word!@host/x") == "http://u:***@host/x"
    assert redact("password p%40ss%2Fword%21 percent-encoded") == "password *** percent-encoded"
    assert redact("abc is too short to be matched literally") == (
        "abc is too short to be matched literally"
    )
    assert redact.secrets >= {"p@ss/word!", "p%40ss%2Fword%21"}


def test_a_longer_secret_is_masked_whole_when_it_contains_a_shorter_one() -> None:
    redact = Redactor(["abcd", "xxabcdyy"])
    assert redact("xxabcdyy abcd") == "*** ***"


def test_masked_url_keeps_the_user_and_the_host() -> None:
    assert masked_url("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert masked_url("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


# --- the settings know their secrets --------------------------------------------------------


@pytest.fixture
def credential_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {
        "MLFLOW_TRACKING_URI": f"http://alice:{SECRET}-mlflow@127.0.0.1:5000",
        "TIRE_S3_ENDPOINT_URL": f"http://key:{SECRET}-s3@127.0.0.1:8333",
        "TIRE_DATABASE_URL": f"postgresql://u:{SECRET}-db@127.0.0.1:5432/mlflow",
        "TIRE_AIRFLOW_DATABASE_URL": f"postgresql://u:{SECRET}-airflow@127.0.0.1:5432/airflow",
        "TIRE_SLACK_WEBHOOK_URL": f"https://hooks.example.com/services/T1/B2/{SECRET}-slack",
        "AWS_SECRET_ACCESS_KEY": f"{SECRET}-aws",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def test_loading_the_settings_makes_every_secret_known(credential_env: dict[str, str]) -> None:
    settings = load_settings()
    values = set(secret_values(settings))
    for suffix in ("mlflow", "s3", "db", "airflow", "aws", "slack"):
        assert any(value.endswith(f"{SECRET}-{suffix}") for value in values), suffix
    # Bare values, as a driver or a debug line would print them, are masked from now on.
    for suffix in ("db", "aws"):
        assert SECRET not in mask_credentials(f"auth failed with {SECRET}-{suffix}")
    assert mask_credentials(credential_env["TIRE_SLACK_WEBHOOK_URL"]) == "***"


def test_a_bad_setting_is_named_without_its_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIRE_DATABASE_URL", f"postgres-ish://u:{SECRET}@h/db")
    monkeypatch.setenv("TIRE_S3_ENDPOINT_URL", f"ftp://k:{SECRET}@h")
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "TIRE_DATABASE_URL" in str(caught.value)
    assert "TIRE_S3_ENDPOINT_URL" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_a_bad_serve_setting_is_named_without_its_credentials() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_serve_config(port=f"http://u:{SECRET}@h:8501")
    assert "TIRE_SERVE_PORT" in str(caught.value)
    assert SECRET not in str(caught.value)


# --- errors that carry a URL -------------------------------------------------------------------


def test_an_s3_error_is_masked() -> None:
    endpoint = f"http://key:{SECRET}@127.0.0.1:9"
    error = EndpointConnectionError(endpoint_url=f"{endpoint}/bucket/key")
    classified = classify(error, "read", "s3://bucket/key", endpoint)
    assert isinstance(classified, StorageUnavailableError)
    assert SECRET not in str(classified)
    assert "key:***@127.0.0.1:9" in str(classified)


def test_a_model_server_client_error_is_masked() -> None:
    with (
        ServingClient(f"http://alice:{SECRET}@127.0.0.1:9", timeout=2) as client,
        pytest.raises(ServingError) as caught,
    ):
        client.metadata()
    assert SECRET not in str(caught.value)
    assert "alice:***@" in str(caught.value)


def test_a_failed_task_reason_is_masked() -> None:
    error = RuntimeError(f"API request to http://alice:{SECRET}@h/api failed")
    failure = TaskFailure.here("train", error, version="v1")
    assert SECRET not in failure.reason
    assert SECRET not in str(failure.marker())


class _Unreachable:
    """A model source whose registry is behind a credential URL that cannot be reached."""

    uri = "models:/m@production"
    watches = True
    alias = "production"

    def __init__(self, *, resolve_fails: bool) -> None:
        self.resolve_fails = resolve_fails

    def resolve(self) -> str:
        if self.resolve_fails:
            raise ModelLoadError(f"cannot resolve: API request to http://a:{SECRET}@h/api failed")
        return "3"

    def version_uri(self, version: str) -> str:
        return f"models:/m/{version}"

    def load(self, version: str) -> object:
        raise OSError(f"download from http://a:{SECRET}@h/artifacts failed")


def test_the_model_holder_keeps_only_masked_errors() -> None:
    sent: list[str] = []
    holder = ModelHolder(_Unreachable(resolve_fails=True), notify=sent.append)
    holder.poll_once()
    assert holder.problem is not None
    assert "a:***@h" in holder.problem and SECRET not in holder.problem

    holder = ModelHolder(_Unreachable(resolve_fails=False), notify=sent.append)
    holder.poll_once()
    [state] = holder.status()
    assert state.state == "UNAVAILABLE"
    assert "a:***@h" in state.error_message and SECRET not in state.error_message
    assert sent and all(SECRET not in text for text in sent)


# --- logging ----------------------------------------------------------------------------------


def test_the_filter_masks_message_arguments_and_traceback() -> None:
    logger = logging.getLogger("tirelib.test_redaction")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("reaching %s", f"http://u:{SECRET}@h")
        try:
            raise ConnectionError(f"refused: http://u:{SECRET}@h/api")
        except ConnectionError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    formatted = [logging.Formatter().format(record) for record in records]
    assert len(formatted) == 2
    assert "http://u:***@h" in formatted[0]
    assert "ConnectionError: refused: http://u:***@h/api" in formatted[1]
    assert all(SECRET not in text for text in formatted)


# A fresh interpreter: the record factory is process-wide. The handler is added after the
# redaction is installed (as uvicorn or Airflow add theirs), and MLflow's own handler writes too.
PROBE = """
import logging, sys
from tirelib.logs import install_redaction
from tirelib.urls import add_secrets
install_redaction()
install_redaction()
add_secrets(sys.argv[1] + "-aws")
logging.basicConfig(stream=sys.stdout, level=logging.DEBUG, format="%(name)s %(message)s")
log = logging.getLogger("any.library")
log.info("tracking at %s", "http://alice:" + sys.argv[1] + "@h:5000")
log.debug("signing with key %s", sys.argv[1] + "-aws")
try:
    raise OSError("connect to postgresql://u:" + sys.argv[1] + "@db/x refused")
except OSError:
    log.exception("database down")
print("done")
"""


def test_every_log_record_of_the_process_is_masked() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, SECRET],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("TIRE_")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "tracking at http://alice:***@h:5000" in output
    assert "signing with key ***" in output
    assert "OSError: connect to postgresql://u:***@db/x refused" in output
    assert SECRET not in output


# --- Slack --------------------------------------------------------------------------------------


def test_slack_text_is_masked_before_it_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    from tirelib import notify

    posted: list[str] = []

    def fake_send(self: object, *, text: str) -> httpx.Response:
        posted.append(text)
        raise OSError("no network in unit tests")

    monkeypatch.setattr("slack_sdk.webhook.WebhookClient.send", fake_send)
    notify.post_webhook("http://127.0.0.1:9/hook", f"failed: http://u:{SECRET}@h/api")
    assert posted == ["failed: http://u:***@h/api"]


# --- MLflow tags ---------------------------------------------------------------------------------


def test_mlflow_tags_that_hold_a_credential_are_given_masked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tirelib import tracking

    inferred = {
        "mlflow.source.git.repoURL": f"https://bot:{SECRET}@git.example.com/tires.git",
        "mlflow.source.name": "train.py",
    }
    monkeypatch.setattr(tracking, "resolve_tags", lambda: dict(inferred))
    tags = tracking.lineage_tags()
    assert tags["mlflow.source.git.repoURL"] == "https://bot:***@git.example.com/tires.git"
    assert "mlflow.source.name" not in tags  # nothing to mask: MLflow's own value stands


# --- PostgreSQL and Airflow -----------------------------------------------------------------------


def test_a_database_that_cannot_be_reached_is_named_without_its_password(tmp_path: Path) -> None:
    from tirelib.registry.locks import model_lock
    from tirelib.stack import free_port

    settings = load_settings(
        home=tmp_path, database_url=f"postgresql://tire:{SECRET}@127.0.0.1:{free_port()}/mlflow"
    )
    with pytest.raises(DatabaseUnavailableError) as caught, model_lock(settings, timeout=5):
        pass
    assert "tire:***@127.0.0.1" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_a_task_hands_its_secrets_to_airflows_masker_too() -> None:
    from airflow.sdk.log import redact

    from tirelib.pipeline import _mask_everywhere

    _mask_everywhere([f"{SECRET}-airflow", ""])
    assert SECRET not in str(redact(f"connection with {SECRET}-airflow failed"))
    assert SECRET not in mask_credentials(f"connection with {SECRET}-airflow failed")

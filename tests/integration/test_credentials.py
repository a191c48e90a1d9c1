"""Credentials in every URL setting never reach the command line's output or a Slack message.

The settings hold a credential each (:class:`~tests.integration.credentials.Secrets`); the
commands then fail in the ways that put a URL into an exception's text (MLflow refused or
unreachable, S3 unreachable, PostgreSQL refused), and everything they said is searched for the
credentials. The model server's answers are in the hostile-input suite
(``test_hostile_input.py``), which counts credentials seen in answers.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import _FOREIGN_ENV, SlackReceiver
from tests.integration.credentials import RefusingTracker, Secrets, clean_env
from tirelib.stack import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def secret() -> Secrets:
    return Secrets(f"S3cr3t{secrets.token_hex(6)}")


# --- the command line ------------------------------------------------------------------------


def tirelib(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tirelib", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["registry", "info"],
        ["-v", "registry", "info"],
        ["registry", "produce", "--metric", "f1"],
        ["data", "list"],
        ["train", "--dataset-version", "v1", "--epochs", "1"],
    ],
    ids=" ".join,
)
def test_the_command_line_never_prints_a_credential(
    args: list[str], secret: Secrets, slack_receiver: SlackReceiver, tmp_path: Path
) -> None:
    """MLflow, S3 and PostgreSQL all unreachable: each command fails, naming masked URLs."""
    env = clean_env(
        tmp_path,
        secret.env(
            tracking_uri=f"http://127.0.0.1:{free_port()}",
            s3_port=free_port(),
            slack_url=slack_receiver.url,
        ),
    )
    done = tirelib(env, *args)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-2000:]
    assert secret.leaks(output) == [], output[-3000:]
    assert "***@127.0.0.1" in output, output[-3000:]


def test_the_command_line_masks_what_a_refusing_tracker_said(
    secret: Secrets, slack_receiver: SlackReceiver, tmp_path: Path
) -> None:
    refusing = RefusingTracker()
    try:
        env = clean_env(
            tmp_path,
            secret.env(
                tracking_uri=refusing.url, s3_port=free_port(), slack_url=slack_receiver.url
            ),
        )
        done = tirelib(env, "registry", "info")
    finally:
        refusing.close()
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-2000:]
    assert secret.leaks(output) == [], output[-3000:]


def test_a_real_tracking_server_behind_a_credential_url(
    mlflow_server: str, secret: Secrets, slack_receiver: SlackReceiver, tmp_path: Path
) -> None:
    """MLflow sends the URL's user and password as basic auth; the answer shows neither."""
    env = clean_env(
        tmp_path,
        secret.env(tracking_uri=mlflow_server, s3_port=free_port(), slack_url=slack_receiver.url),
    )
    env["TIRE_MODEL_NAME"] = f"tire-credentials-{secrets.token_hex(4)}"
    done = tirelib(env, "registry", "info")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "alice:***@127.0.0.1" in done.stdout
    assert secret.leaks(output) == [], output[-3000:]


# --- Slack ------------------------------------------------------------------------------------


def test_a_slack_message_about_an_error_arrives_masked(
    secret: Secrets, slack_receiver: SlackReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tirelib.pipeline import TaskFailure, version_failed
    from tirelib.settings import load_settings

    env = secret.env(
        tracking_uri="http://127.0.0.1:9", s3_port=free_port(), slack_url=slack_receiver.url
    )
    for name in _FOREIGN_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    error = ConnectionError(
        f"API request to {env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/runs/create failed; "
        f"S3 at {env['TIRE_S3_ENDPOINT_URL']} with key {secret.values['aws']}; "
        f"webhook {env['TIRE_SLACK_WEBHOOK_URL']}"
    )
    failure = TaskFailure("tire_training_pipeline", "train", error, run_id="manual__1")
    version_failed(failure, settings)
    [message] = slack_receiver.wait_for(1)
    text = json.dumps(message)
    assert secret.leaks(text) == [], text
    assert "alice:***@127.0.0.1:9" in text

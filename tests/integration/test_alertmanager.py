"""Alertmanager with the deployment's own configuration, sending to a local Slack stand-in.

A real Alertmanager (Debian's ``prometheus-alertmanager``) runs on a free loopback port with a
rendered copy of ``docker/alertmanager/alertmanager.yml``: the same route, receiver, templates and
inhibition, with two changes only. The webhook file holds the ``slack_receiver`` URL, and
``group_wait``/``group_interval`` are shortened to 1 s and 2 s, so a message arrives in seconds
rather than the production 30 s and 5 min. Alerts are posted to the v2 API as Prometheus posts
them (labels, annotations, startsAt, endsAt; endsAt in the past resolves one).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import SlackReceiver
from tirelib.stack import HttpCheck, ManagedProcess, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "docker" / "alertmanager" / "alertmanager.yml"
ALERTMANAGER = (
    shutil.which("alertmanager")
    or shutil.which("prometheus-alertmanager")
    or "/usr/bin/prometheus-alertmanager"
)
DEADLINE = 30.0  # seconds for any one message; the rendered group_wait is 1 s


def render_config(tmp_path: Path, webhook_url: str) -> Path:
    """The deployment's configuration with the test's webhook file and short group timers."""
    config = yaml.safe_load(CONFIG.read_text())
    webhook = tmp_path / "slack-webhook-url"
    webhook.write_text(webhook_url + "\n")
    for receiver in config["receivers"]:
        for slack in receiver.get("slack_configs", []):
            assert "api_url" not in slack, "the webhook URL belongs in a file, not the config"
            slack["api_url_file"] = str(webhook)
    config["templates"] = [str(CONFIG.parent / t) for t in config["templates"]]
    config["route"].update(group_wait="1s", group_interval="2s")
    rendered = tmp_path / "alertmanager.yml"
    rendered.write_text(yaml.safe_dump(config, sort_keys=False))
    return rendered


@pytest.fixture
def alertmanager(tmp_path: Path, slack_receiver: SlackReceiver) -> Iterator[str]:
    """A running Alertmanager sending to ``slack_receiver``; returns its base URL."""
    if not Path(ALERTMANAGER).is_file():
        pytest.skip(
            "Alertmanager is not installed (Debian: apt-get install prometheus-alertmanager)"
        )
    config = render_config(tmp_path, slack_receiver.url)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = ManagedProcess(
        "alertmanager",
        [
            ALERTMANAGER,
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # one instance: no gossip port
        ],
        state_dir=tmp_path,
        ready=HttpCheck(f"{url}/-/ready"),
        url=url,
        ports=(port,),
    )
    process.start()
    try:
        process.wait_ready(30)
        yield url
    finally:
        process.stop()  # by the pid it recorded, its own process group only


def alert(
    name: str,
    summary: str,
    *,
    service: str = "tire-server",
    severity: str = "warning",
    labels: dict[str, str] | None = None,
    resolved: bool = False,
    starts_at: datetime | None = None,
) -> dict[str, Any]:
    now = datetime.now(UTC)
    body: dict[str, Any] = {
        "labels": {"alertname": name, "service": service, "severity": severity, **(labels or {})},
        # As docker/prometheus/rules write them: the value is part of summary and description.
        "annotations": {
            "summary": summary,
            "description": f"{name} for the test",
            "runbook": f"What to do about {name}",
        },
        "startsAt": (starts_at or now - timedelta(minutes=10)).isoformat(),
        "generatorURL": "http://prometheus:9090/graph",
    }
    # Prometheus re-sends a firing alert with endsAt minutes ahead; a resolved one in the past.
    ends = now - timedelta(seconds=1) if resolved else now + timedelta(minutes=5)
    body["endsAt"] = ends.isoformat()
    return body


def post(url: str, *alerts: dict[str, Any]) -> None:
    answer = httpx.post(f"{url}/api/v2/alerts", json=list(alerts), timeout=10)
    assert answer.status_code == 200, answer.text


def attachments(receiver: SlackReceiver) -> list[dict[str, Any]]:
    """Every attachment of every message (Alertmanager's Slack message is its attachments)."""
    found = []
    for message in list(receiver.messages):
        found.extend(message.get("attachments", []) if isinstance(message, dict) else [])
    return found


def wait_for_attachment(
    receiver: SlackReceiver, matches: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        for attachment in attachments(receiver):
            if matches(attachment):
                return attachment
        time.sleep(0.1)
    raise AssertionError(f"no Slack message {what} within {DEADLINE:.0f} s: {receiver.messages}")


def api_alerts(url: str, name: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{url}/api/v2/alerts", params={"filter": f'alertname="{name}"'}, timeout=10)
    answer.raise_for_status()
    return list(answer.json())


def test_a_firing_alert_reaches_slack_with_its_summary_and_runbook(
    alertmanager: str, slack_receiver: SlackReceiver
) -> None:
    summary = "Live accuracy of model version 7 is 62%"
    post(alertmanager, alert("TireLiveAccuracyDrop", summary, labels={"version": "7"}))
    message = wait_for_attachment(
        slack_receiver, lambda a: "TireLiveAccuracyDrop" in a.get("title", ""), "for the alert"
    )
    assert message["title"].startswith("[FIRING:1] TireLiveAccuracyDrop (tire-server)")
    assert summary in message["text"]
    assert "Model version: 7" in message["text"]
    assert "Runbook: What to do about TireLiveAccuracyDrop" in message["text"]
    assert message["color"] == "warning"


def test_symptoms_of_a_server_that_is_down_are_inhibited(
    alertmanager: str, slack_receiver: SlackReceiver
) -> None:
    post(alertmanager, alert("TireServerDown", "No replica answers", severity="critical"))
    wait_for_attachment(
        slack_receiver, lambda a: "TireServerDown" in a.get("title", ""), "for the server down"
    )
    # The same symptom on the server that is down, and on another service (not inhibited: the
    # inhibition holds within one service). The second one's message shows the first had time.
    post(
        alertmanager,
        alert("TireServer5xxRatioHigh", "5xx on the down server", severity="critical"),
        alert(
            "TireServer5xxRatioHigh", "5xx elsewhere", service="tire-canary", severity="critical"
        ),
    )
    wait_for_attachment(
        slack_receiver, lambda a: "5xx elsewhere" in a.get("text", ""), "for the other service"
    )

    def states() -> dict[str, dict[str, Any]]:
        return {
            a["labels"]["service"]: a["status"]
            for a in api_alerts(alertmanager, "TireServer5xxRatioHigh")
        }

    deadline = time.monotonic() + DEADLINE
    while states().get("tire-server", {}).get("state") != "suppressed":
        assert time.monotonic() < deadline, states()
        time.sleep(0.1)
    status = states()
    assert status["tire-server"]["inhibitedBy"], status
    assert status["tire-canary"]["state"] == "active"
    assert not any(
        "5xx on the down server" in a.get("text", "") for a in attachments(slack_receiver)
    )


def test_a_resolved_alert_sends_a_resolved_message(
    alertmanager: str, slack_receiver: SlackReceiver
) -> None:
    started = datetime.now(UTC) - timedelta(minutes=20)
    summary = "Mean top-class confidence fell to 0.58 (baseline 0.91)"
    post(alertmanager, alert("TireConfidenceDrop", summary, starts_at=started))
    wait_for_attachment(
        slack_receiver,
        lambda a: a.get("title", "").startswith("[FIRING:1] TireConfidenceDrop"),
        "firing",
    )
    post(alertmanager, alert("TireConfidenceDrop", summary, starts_at=started, resolved=True))
    message = wait_for_attachment(
        slack_receiver,
        lambda a: a.get("title", "").startswith("[RESOLVED] TireConfidenceDrop"),
        "resolved",
    )
    assert summary in message["text"] and "resolved" in message["text"]
    assert message["color"] == "good"

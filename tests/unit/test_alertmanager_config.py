"""docker/alertmanager/: checked with Alertmanager's own amtool, each check also on a broken copy.

- ``amtool check-config``: the configuration and its templates load.
- ``amtool config routes test``: every alert of docker/prometheus/rules reaches the Slack receiver.
- The inhibition names every symptom alert of the server, and the webhook URL is read from a
  file, never written in the configuration.
The messages themselves, the inhibition and resolved messages are exercised against a running
Alertmanager in tests/integration/test_alertmanager.py.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
ALERTMANAGER = ROOT / "docker" / "alertmanager"
CONFIG = ALERTMANAGER / "alertmanager.yml"
RULES = ROOT / "docker" / "prometheus" / "rules" / "alerts.yml"
SERVER_DOWN = "TireServerDown"
SERVER_ALERTS = {
    "TireServerDown",
    "TireServerReplicaDown",
    "TireServer5xxRatioHigh",
    "TireServerLatencyP99High",
    "TireModelNotLoaded",
    "TireModelReloadFailing",
    "TirePredictionMixDrift",
    "TireConfidenceDrop",
    "TireLiveAccuracyDrop",
}
PIPELINE_ALERTS = {"TirePipelineFailed", "TireNoSuccessfulRun"}


def amtool() -> str:
    found = shutil.which("amtool")
    if found is None:
        pytest.fail("amtool is not installed: run `make system-deps` (prometheus-alertmanager)")
    return found


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=60, check=False
    )


def config() -> dict[str, Any]:
    return dict(yaml.safe_load(CONFIG.read_text()))


def copy_with(tmp_path: Path, edit: Any) -> Path:
    """The configuration and its templates copied to ``tmp_path``, the YAML changed by ``edit``."""
    shutil.copytree(ALERTMANAGER / "templates", tmp_path / "templates")
    changed = config()
    edit(changed)
    assert changed != config(), "the edit meant to break the configuration changed nothing"
    target = tmp_path / "alertmanager.yml"
    target.write_text(yaml.safe_dump(changed, sort_keys=False))
    return target


def routes_to(path: Path, alertname: str, service: str) -> subprocess.CompletedProcess[str]:
    return run(
        amtool(),
        "config",
        "routes",
        "test",
        f"--config.file={path}",
        "--verify.receivers=slack",
        f"alertname={alertname}",
        f"service={service}",
        "severity=critical",
    )


def test_amtool_accepts_the_configuration_and_its_templates() -> None:
    done = run(amtool(), "check-config", CONFIG)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 templates" in done.stdout  # templates/*.tmpl found relative to the file


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c["route"].update(receiver="slak"),  # a receiver that does not exist
        lambda c: c["inhibit_rules"][0].update(target_matchers=['alertname =~ "TireServer(5xx"']),
        lambda c: c["route"].update(group_wait="half a minute"),
    ],
    ids=["unknown-receiver", "bad-regex", "bad-duration"],
)
def test_amtool_refuses_a_broken_configuration(tmp_path: Path, edit: Any) -> None:
    done = run(amtool(), "check-config", copy_with(tmp_path, edit))
    assert done.returncode != 0, done.stdout


def test_amtool_refuses_a_broken_template(tmp_path: Path) -> None:
    broken = copy_with(tmp_path, lambda c: c.update(templates=["templates/*.tmpl", "x.tmpl"]))
    (tmp_path / "x.tmpl").write_text('{{ define "tire.slack.title" }}{{ .Nope }\n')
    done = run(amtool(), "check-config", broken)
    assert done.returncode != 0, done.stdout


@pytest.mark.parametrize(
    ("alertname", "service"),
    [(name, "tire-server") for name in sorted(SERVER_ALERTS)]
    + [(name, "tire-pipeline") for name in sorted(PIPELINE_ALERTS)],
)
def test_every_alert_is_routed_to_slack(alertname: str, service: str) -> None:
    done = routes_to(CONFIG, alertname, service)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "slack"


def test_the_route_check_finds_an_alert_sent_elsewhere(tmp_path: Path) -> None:
    def silence_accuracy(c: dict[str, Any]) -> None:
        c["receivers"].append({"name": "nowhere"})
        c["route"]["routes"] = [
            {"receiver": "nowhere", "matchers": ["alertname = TireLiveAccuracyDrop"]}
        ]

    broken = copy_with(tmp_path, silence_accuracy)
    assert routes_to(broken, "TireLiveAccuracyDrop", "tire-server").returncode != 0
    assert routes_to(broken, "TireServerDown", "tire-server").returncode == 0


def test_slack_messages_are_grouped_resolved_and_the_webhook_read_from_a_file() -> None:
    loaded = config()
    assert loaded["route"]["group_by"] == ["alertname", "service"]
    assert "slack_api_url" not in loaded.get("global", {})
    (receiver,) = loaded["receivers"]
    (slack,) = receiver["slack_configs"]
    assert "api_url" not in slack and slack["api_url_file"].startswith("/run/")
    assert slack["send_resolved"] is True


def inhibited_by_server_down(loaded: dict[str, Any]) -> set[str]:
    """The alert names held back while TireServerDown fires for the same service."""
    names: set[str] = set()
    for rule in loaded.get("inhibit_rules", []):
        if f"alertname = {SERVER_DOWN}" in rule.get("source_matchers", []) and rule.get(
            "equal"
        ) == ["service"]:
            for matcher in rule.get("target_matchers", []):
                if matcher.startswith("alertname =~"):
                    names |= set(matcher.split("=~", 1)[1].strip().strip('"').split("|"))
    return names


def test_server_down_holds_back_every_symptom_of_the_server() -> None:
    assert inhibited_by_server_down(config()) == SERVER_ALERTS - {SERVER_DOWN}


def test_the_inhibition_check_finds_a_symptom_left_out() -> None:
    broken = config()
    matchers = broken["inhibit_rules"][0]["target_matchers"]
    matchers[0] = matchers[0].replace("|TireLiveAccuracyDrop", "")
    assert inhibited_by_server_down(broken) != SERVER_ALERTS - {SERVER_DOWN}


def test_the_alert_names_are_those_of_the_prometheus_rules() -> None:
    if not RULES.exists():
        pytest.skip(f"{RULES.relative_to(ROOT)} is not written yet")
    rules = yaml.safe_load(RULES.read_text())
    by_service: dict[str, set[str]] = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                service = rule["labels"]["service"]
                by_service.setdefault(service, set()).add(rule["alert"])
    assert by_service == {"tire-server": SERVER_ALERTS, "tire-pipeline": PIPELINE_ALERTS}

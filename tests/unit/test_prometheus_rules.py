"""Prometheus' configuration and rules, checked with promtool (Debian's ``prometheus`` package).

- ``promtool check config`` on ``docker/prometheus/prometheus.yml`` (which checks the rule files it
  names), ``promtool check rules`` on each rule file;
- ``promtool test rules`` on ``docker/prometheus/tests/*.yml``: every alert has a case where it
  fires, with its labels and annotations, and one where it stays quiet;
- every metric the rules read is one the server exports (its registry, read here) or one listed in
  ``docker/prometheus/README.md``'s contract, so the rules and the code cannot drift apart.
Each check is also fed a broken copy (a rule file that does not parse, a mutated threshold, a
misspelt metric) to show it can fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tirelib.jobmetrics import METRIC_NAMES
from tirelib.serve.metrics import ServeMetrics

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "docker" / "prometheus"
CONFIG = PROMETHEUS / "prometheus.yml"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
CONTRACT = PROMETHEUS / "README.md"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        reason = "promtool is not installed (Debian's prometheus package; `make system-deps`)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def run_promtool(*argv: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *(str(a) for a in argv)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def copy_of_the_folder(tmp_path: Path) -> Path:
    """docker/prometheus copied whole, so relative paths (rule files, tests) resolve as they do."""
    target = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS, target)
    return target


def edit(path: Path, change: Callable[[str], str]) -> None:
    text = path.read_text()
    changed = change(text)
    assert changed != text, "the edit meant to break the file changed nothing"
    path.write_text(changed)


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "rules" / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def all_rules() -> list[dict[str, Any]]:
    rules = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.extend(group["rules"])
    return rules


def test_without_promtool_ci_fails_and_elsewhere_the_tests_skip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="promtool is not installed"):
        promtool()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="promtool is not installed"):
        promtool()


# ---------------------------------------------------------------------------- promtool check


def test_promtool_checks_the_config_and_the_rule_files_it_names() -> None:
    done = run_promtool("check", "config", CONFIG)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in done.stdout + done.stderr


def test_promtool_check_config_fails_on_a_broken_rule_file(tmp_path: Path) -> None:
    folder = copy_of_the_folder(tmp_path)
    edit(folder / "rules" / "alerts.yml", lambda t: t.replace("for: 5m", "for: five minutes", 1))
    done = run_promtool("check", "config", folder / "prometheus.yml")
    assert done.returncode != 0
    assert "alerts.yml" in done.stdout + done.stderr


def test_the_config_scrapes_the_server_and_pushgateway_and_names_alertmanager() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"model-server", "pushgateway", "prometheus"} <= set(jobs)
    assert jobs["pushgateway"].get("honor_labels") is True  # the pushed job and dag_id stay
    assert jobs["model-server"].get("honor_labels", False) is False
    assert sorted(PROMETHEUS / f for f in config["rule_files"]) == RULE_FILES
    targets = [
        target
        for manager in config["alerting"]["alertmanagers"]
        for static in manager["static_configs"]
        for target in static["targets"]
    ]
    assert targets == ["alertmanager:9093"]


@pytest.mark.parametrize("rules", RULE_FILES, ids=lambda p: p.name)
def test_promtool_checks_each_rule_file(rules: Path) -> None:
    done = run_promtool("check", "rules", rules)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("name", "old", "new"),
    [
        # PromQL that does not parse
        ("recording.yml", "sum by (job) (rate(", "sum by (job) (rate(("),
        # a label value templated with a function Prometheus does not have
        ("alerts.yml", "$value | humanizePercentage", "$value | humanizePercentag"),
    ],
)
def test_promtool_check_rules_fails_on_a_broken_rule_file(
    tmp_path: Path, name: str, old: str, new: str
) -> None:
    folder = copy_of_the_folder(tmp_path)
    edit(folder / "rules" / name, lambda t: t.replace(old, new, 1))
    done = run_promtool("check", "rules", folder / "rules" / name)
    assert done.returncode != 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------- promtool test


@pytest.mark.parametrize("tests", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_rule_tests_pass(tests: Path) -> None:
    done = run_promtool("test", "rules", tests.name, cwd=tests.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_case_where_it_fires_and_one_where_it_stays_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert len(alerts) >= 10
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"
    assert (firing | quiet) - alerts == set(), "tests of alerts that do not exist"


# A threshold changed in a copy of alerts.yml: the test file's firing or quiet case must notice.
MUTATIONS = [
    ("TireServerDown", "server.yml", '"model-server"}) == 0', '"model-server"}) == 2'),
    ("TireServerReplicaDown", "server.yml", 'expr: up{job="model-server"} == 0', "expr: up == 2"),
    ("TireServer5xxRatioHigh", "server.yml", "ratio_rate5m > 0.05", "ratio_rate5m > 0.5"),
    ("TireServerLatencyP99High", "server.yml", "p99_5m > 0.5", "p99_5m > 1"),
    ("TireModelNotLoaded", "server.yml", 'tire_model_info{version!=""}', "tire_model_info"),
    ("TireModelReloadFailing", "server.yml", 'result="failure"}[15m]', 'result="success"}[15m]'),
    ("TirePredictionMixDrift", "quality.yml", "increase1h >= 100", "increase1h >= 10"),
    ("TireConfidenceDrop", "quality.yml", "_mean:avg - 0.1", "_mean:avg - 0.01"),
    ("TireLiveAccuracyDrop", "quality.yml", "labels:increase1h >= 50", "labels:increase1h >= 20"),
    ("TireLiveAccuracyDrop", "quality.yml", "ratio_rate1h < 0.8", "ratio_rate1h < 0.4"),
    ("TirePipelineFailed", "pipeline.yml", "* 0\n", "* 2\n"),
    ("TireNoSuccessfulRun", "pipeline.yml", "> 7 * 86400", "> 9 * 86400"),
]


@pytest.mark.parametrize(
    ("alert", "tests", "old", "new"),
    MUTATIONS,
    ids=[f"{m[0]}:{m[3]}" for m in MUTATIONS],
)
def test_promtool_rule_tests_fail_when_a_threshold_moves(
    tmp_path: Path, alert: str, tests: str, old: str, new: str
) -> None:
    folder = copy_of_the_folder(tmp_path)
    edit(folder / "rules" / "alerts.yml", lambda t: t.replace(old, new, 1))
    assert run_promtool("check", "rules", folder / "rules" / "alerts.yml").returncode == 0
    done = run_promtool("test", "rules", tests, cwd=folder / "tests")
    assert done.returncode != 0, done.stdout
    assert f"alertname: {alert}," in done.stdout + done.stderr


def test_every_alert_is_labelled_for_routing_and_annotated() -> None:
    for rule in alert_rules():
        labels, annotations = rule["labels"], rule["annotations"]
        assert labels["severity"] in {"critical", "warning"}, rule["alert"]
        assert labels["service"] in {"tire-server", "tire-pipeline"}, rule["alert"]
        assert {"summary", "description", "runbook"} <= set(annotations), rule["alert"]
        assert rule["alert"].startswith("Tire")
    down = next(rule for rule in alert_rules() if rule["alert"] == "TireServerDown")
    assert down["labels"] == {"service": "tire-server", "severity": "critical"}


# ---------------------------------------------------------------------------- metric names

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_METRIC = re.compile(r"(?<![\w:])(tire_[a-z0-9_]+)(?![\w:])")
_RECORDED = re.compile(r"(?<![\w:])([a-z_]+:[a-z0-9_:]+)(?![\w:])")


def used_metrics(rules: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
    """The raw metric names and the recorded names the rules' expressions read."""
    raw: set[str] = set()
    recorded: set[str] = set()
    for rule in rules:
        expr = _STRING.sub('""', rule["expr"])  # label values (dag_id="tire_...") are no metrics
        raw.update(_METRIC.findall(expr))
        recorded.update(_RECORDED.findall(expr))
    return raw, recorded


def exported_metrics() -> set[str]:
    """The names the server's registry exposes, by the exposition format's suffixes."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "info": ("_info",),
        "gauge": ("",),
    }
    names = set()
    for family in ServeMetrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def contract_metrics() -> dict[str, str]:
    """The README's table of metrics the server and the pipeline are to export: name -> type."""
    rows = re.findall(r"^\| `(tire_[a-z0-9_]+)` \| (\w+) \|", CONTRACT.read_text(), re.M)
    return dict(rows)


def unknown_metrics(rules: list[dict[str, Any]]) -> set[str]:
    raw, recorded = used_metrics(rules)
    defined = {rule["record"] for rule in rules if "record" in rule}
    return (raw - exported_metrics() - set(contract_metrics())) | (recorded - defined)


def test_every_metric_the_rules_read_is_exported_or_in_the_contract() -> None:
    raw, _ = used_metrics(all_rules())
    assert "tire_http_requests_total" in raw and "tire_model_info" in raw
    assert unknown_metrics(all_rules()) == set()


def test_a_misspelt_metric_in_a_rule_is_found() -> None:
    rules = all_rules()
    text = yaml.safe_dump(rules).replace("tire_http_requests_total", "tire_http_request_total")
    text = text.replace("on (job) job:tire_predictions:", "on (job) job:tire_prediction:")
    assert unknown_metrics(yaml.safe_load(text)) == {
        "tire_http_request_total",
        "job:tire_prediction:increase1h",
    }


def test_the_contract_follows_prometheus_conventions_and_is_read_by_the_rules() -> None:
    contract = contract_metrics()
    assert "tire_feedback_labels_total" in contract
    assert "tire_pipeline_last_success_timestamp_seconds" in contract
    raw, _ = used_metrics(all_rules())
    # The pipeline's batch-job metrics are for dashboards too (tests/unit/test_jobmetrics.py
    # ties them to the code that pushes them); every other name is there for a rule.
    assert set(contract) <= raw | set(METRIC_NAMES), "contract names no rule reads"
    for name, kind in contract.items():
        assert kind in {"counter", "gauge"}, name
        assert name.endswith("_total") == (kind == "counter"), name
        if "timestamp" in name:
            assert name.endswith("_timestamp_seconds"), name


_SELECTOR = re.compile(r"(?<![\w:])(tire_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_TARGET_LABELS = {"job", "instance"}


def metric_labels() -> dict[str, set[str]]:
    """Label names of every metric, exported (the server's registry) or in the contract."""
    from prometheus_client.metrics import MetricWrapperBase

    metrics = ServeMetrics()
    metrics.model_loaded(version="1", model_type="resnet18", name="tire")  # the Info's labels
    labels: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for name in exported_metrics():
                if name.startswith(metric._name):  # counters with no child yet have no samples
                    labels.setdefault(name, set()).update(metric._labelnames)
    for name, _, names in re.findall(
        r"^\| `(tire_[a-z0-9_]+)` \| (\w+) \| ([^|]*) \|", CONTRACT.read_text(), re.M
    ):
        labels[name] = set(re.findall(r"`(\w+)`", names))
    return labels


def unknown_labels(rules: list[dict[str, Any]]) -> set[str]:
    known = metric_labels()
    found = set()
    for rule in rules:
        for name, body in _SELECTOR.findall(rule["expr"]):
            for label in _MATCHER.findall(body):
                if label not in known.get(name, set()) | _TARGET_LABELS:
                    found.add(f"{name}{{{label}}}")
    return found


def test_every_label_a_rule_selects_on_is_one_the_metric_has() -> None:
    assert metric_labels()["tire_http_requests_total"] >= {"endpoint", "status"}
    assert unknown_labels(all_rules()) == set()
    renamed = [
        {**rule, "expr": rule["expr"].replace('status=~"5.."', 'code=~"5.."')}
        for rule in all_rules()
    ]
    assert unknown_labels(renamed) == {"tire_http_requests_total{code}"}

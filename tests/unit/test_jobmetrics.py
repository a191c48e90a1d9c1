"""The pipeline's batch-job metrics and the local stack's monitoring servers, without servers.

- What one push holds (a success never carries a failure time, fields left out are not sent),
  and that the names the alert rules read are the names pushed, each in the metrics contract.
- Pushing never fails the caller: no URL, or a Pushgateway that does not answer, is logged.
- The stack's Prometheus and Alertmanager configurations, checked with promtool and amtool; the
  stack's order, a missing binary skipped with one line, Airflow's tasks pointed at the
  stack's Pushgateway.
The pushes themselves, a real Pushgateway, Prometheus and Alertmanager are in
tests/integration/test_pipeline_metrics.py.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from tirelib import jobmetrics
from tirelib.jobmetrics import METRIC_NAMES, RunMetrics, push
from tirelib.serve.config import ServeConfig
from tirelib.settings import load_settings
from tirelib.stack import Stack, free_port, render_alertmanager_config, render_prometheus_config
from tirelib.stack import monitoring as monitoring_module

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "docker" / "prometheus" / "rules" / "alerts.yml"
CONTRACT = ROOT / "docker" / "prometheus" / "README.md"


def exposition(metrics: RunMetrics) -> str:
    return generate_latest(metrics.registry()).decode()


def sample_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


def test_a_success_and_a_failure_push_only_their_own_time() -> None:
    success = exposition(RunMetrics("tire_training_pipeline", succeeded=True, at=1000.0))
    assert sample_names(success) == {jobmetrics.LAST_SUCCESS}
    assert f"{jobmetrics.LAST_SUCCESS} 1000.0" in success
    failure = exposition(RunMetrics("tire_training_pipeline", succeeded=False, at=2000.0))
    assert sample_names(failure) == {jobmetrics.LAST_FAILURE}


def test_a_training_run_pushes_counts_durations_and_what_it_promoted() -> None:
    text = exposition(
        RunMetrics(
            "tire_training_pipeline",
            succeeded=True,
            versions_processed=3,
            versions_failed=1,
            training_seconds={"cnn": 12.5, "resnet18": 40.0},
            promoted_version=7,
            promoted_metrics={"accuracy": 0.93, "f1": 0.91},
        )
    )
    assert sample_names(text) == set(METRIC_NAMES) - {jobmetrics.LAST_FAILURE}
    assert f"{jobmetrics.VERSIONS_PROCESSED} 3.0" in text
    assert f'{jobmetrics.TRAINING_DURATION}{{model_type="resnet18"}} 40.0' in text
    assert f'{jobmetrics.PROMOTED_TEST_METRIC}{{metric="accuracy"}} 0.93' in text
    assert f"{jobmetrics.PROMOTED_VERSION} 7.0" in text


def test_the_alert_rules_read_the_names_pushed_and_the_contract_lists_them() -> None:
    read = set(re.findall(r"tire_pipeline_[a-z_]+", ALERTS.read_text()))
    assert read == {jobmetrics.LAST_SUCCESS, jobmetrics.LAST_FAILURE}
    contract = dict(
        re.findall(r"^\| `(tire_pipeline_[a-z_]+)` \| (\w+) \|", CONTRACT.read_text(), re.M)
    )
    assert contract == dict.fromkeys(METRIC_NAMES, "gauge")  # pushed values are gauges
    text = exposition(
        RunMetrics("d", True, training_seconds={"cnn": 1.0}, promoted_metrics={"f1": 1.0})
    )
    for name, labels in re.findall(
        r"^\| `(tire_pipeline_[a-z_]+)` \| \w+ \| ([^|]*) \|", CONTRACT.read_text(), re.M
    ):
        documented = set(re.findall(r"`(\w+)`", labels)) - {"dag_id"}  # the grouping key's
        pushed = [line for line in text.splitlines() if line.startswith(name + "{")]
        for line in pushed:
            assert set(re.findall(r"(\w+)=", line)) == documented, line


def test_without_a_url_nothing_is_pushed() -> None:
    assert push(RunMetrics("d", succeeded=True), load_settings(pushgateway_url=None)) is False


def test_a_pushgateway_that_does_not_answer_is_a_warning_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = load_settings(pushgateway_url=f"http://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING, logger="tirelib.jobmetrics"):
        assert push(RunMetrics("tire_training_pipeline", succeeded=False), settings) is False
    assert "tire_training_pipeline not pushed to http://127.0.0.1:" in caplog.text


def test_the_pushgateway_url_must_be_http() -> None:
    from tirelib.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="TIRE_PUSHGATEWAY_URL"):
        load_settings(pushgateway_url="pushgateway:9091")
    assert load_settings(pushgateway_url="").pushgateway_url is None


def test_the_stack_serves_on_the_port_tirelib_serve_defaults_to() -> None:
    assert load_settings().serve_port == ServeConfig.model_fields["port"].default


# --- the local stack's monitoring servers ---------------------------------------------------


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (`make system-deps`)")
    return found


def test_the_stack_s_prometheus_config_loads_the_rules_and_scrapes_by_the_rules_job(
    tmp_path: Path,
) -> None:
    settings = load_settings(home=tmp_path, serve_port=8600, pushgateway_port=9700)
    path = render_prometheus_config(settings, interval="2s")
    done = subprocess.run(
        [tool("promtool"), "check", "config", str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rules = len(list((ROOT / "docker" / "prometheus" / "rules").glob("*.yml")))
    assert f"SUCCESS: {rules} rule files found" in done.stdout + done.stderr
    config = yaml.safe_load(path.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["model-server"]["static_configs"] == [{"targets": ["127.0.0.1:8600"]}]
    assert jobs["pushgateway"]["honor_labels"] is True
    assert jobs["pushgateway"]["static_configs"] == [{"targets": ["127.0.0.1:9700"]}]
    assert config["global"]["evaluation_interval"] == "2s"
    alone = yaml.safe_load(
        render_prometheus_config(settings, pushgateway=False, alertmanager=False).read_text()
    )
    assert "alerting" not in alone
    assert "pushgateway" not in {job["job_name"] for job in alone["scrape_configs"]}


def test_the_stack_s_alertmanager_config_sends_to_the_webhook_from_a_private_file(
    tmp_path: Path,
) -> None:
    webhook = "https://hooks.slack.com/services/T0/B0/secretpart"
    settings = load_settings(home=tmp_path, slack_webhook_url=webhook)
    path = render_alertmanager_config(settings)
    done = subprocess.run(
        [tool("amtool"), "check-config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "secretpart" not in path.read_text()
    (receiver,) = yaml.safe_load(path.read_text())["receivers"]
    url_file = Path(receiver["slack_configs"][0]["api_url_file"])
    assert url_file.read_text().strip() == webhook
    assert url_file.stat().st_mode & 0o077 == 0

    quiet = render_alertmanager_config(load_settings(home=tmp_path))
    (receiver,) = yaml.safe_load(quiet.read_text())["receivers"]
    assert "slack_configs" not in receiver and not url_file.exists()
    done = subprocess.run(
        [tool("amtool"), "check-config", str(quiet)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_stack_runs_monitoring_then_the_server_then_airflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(home=tmp_path, pushgateway_url=None)
    monkeypatch.setattr(monitoring_module, "monitoring_binary", lambda names: Path("/bin/true"))
    stack = Stack(settings)
    assert [c.name for c in stack] == [
        "seaweedfs",
        "mlflow",
        "pushgateway",
        "alertmanager",
        "prometheus",
        "serve",
        "airflow",
    ]
    airflow_env = stack.components[-1].process.env or {}
    assert airflow_env["TIRE_PUSHGATEWAY_URL"] == "http://127.0.0.1:9091"
    serve = stack.components[-2].process
    assert serve.url == "http://127.0.0.1:8501" and "--port" in serve.argv
    off = load_settings(home=tmp_path, stack_with_monitoring=False, stack_with_server=False)
    assert [c.name for c in Stack(off)] == ["seaweedfs", "mlflow", "airflow"]


def test_a_monitoring_server_not_installed_is_skipped_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = monitoring_module.monitoring_binary

    def without_pushgateway(names: tuple[str, ...]) -> Path | None:
        return None if "prometheus-pushgateway" in names else real(names) or Path("/bin/true")

    monkeypatch.setattr(monitoring_module, "monitoring_binary", without_pushgateway)
    settings = load_settings(home=tmp_path, stack_with_airflow=False, stack_with_server=False)
    with caplog.at_level(logging.INFO, logger="tirelib.stack.monitoring"):
        names = [c.name for c in Stack(settings)]
    assert names == ["seaweedfs", "mlflow", "alertmanager", "prometheus"]
    lines = [r.getMessage() for r in caplog.records if "not installed" in r.getMessage()]
    assert lines == [
        "pushgateway is not installed (apt-get install prometheus-pushgateway): "
        "the stack runs without it"
    ]

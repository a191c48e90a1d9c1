"""The pipeline's batch-job metrics through the local stack's real monitoring servers.

One stack for the module: the Pushgateway, Alertmanager and Prometheus as ``tirelib stack up``
starts them (Debian's binaries, free ports, the generated configurations), with scrapes and rule
evaluation every second and Alertmanager's group wait cut to 1 s, sending to the local Slack
stand-in. The pipeline pushes (a run's end, the failure callback), Prometheus reads what was
pushed with the project's own rules, and the pipeline alerts reach Slack.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SlackReceiver
from tirelib import data, pipeline
from tirelib.errors import DataError
from tirelib.jobmetrics import LAST_FAILURE, LAST_SUCCESS, RunMetrics, push
from tirelib.settings import Settings, load_settings, reset_settings
from tirelib.stack import Stack, free_port, monitoring_components
from tirelib.storage import ObjectStore

pytestmark = pytest.mark.integration

DEADLINE = 45.0
EIGHT_DAYS = 8 * 86400


@dataclass(frozen=True)
class Monitoring:
    settings: Settings
    pushgateway: str
    prometheus: str


@pytest.fixture(scope="module")
def monitoring(
    tmp_path_factory: pytest.TempPathFactory, _slack_server: SlackReceiver
) -> Iterator[Monitoring]:
    settings = load_settings(
        home=tmp_path_factory.mktemp("monitoring"),
        pushgateway_port=free_port(),
        alertmanager_port=free_port(),
        prometheus_port=free_port(),
        serve_port=free_port(),  # nothing serves there: the server's alerts wait their `for`
        slack_webhook_url=_slack_server.url,
        stack_with_airflow=False,
    )
    components = monitoring_components(settings, interval="1s", group_wait="1s")
    names = [component.name for component in components]
    if names != ["pushgateway", "alertmanager", "prometheus"]:
        pytest.skip(f"the monitoring servers are not all installed (found {names}); "
                    "`make system-deps` installs them")  # fmt: skip
    stack = Stack(settings, components)
    try:
        statuses = stack.up()
        assert all(status.up for status in statuses), statuses
        urls = {status.name: status.url for status in statuses}
        yield Monitoring(
            settings.model_copy(update={"pushgateway_url": urls["pushgateway"]}),
            urls["pushgateway"],
            urls["prometheus"],
        )
    finally:
        stack.down()


def wait_for(condition: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {DEADLINE:.0f} s")


def pushed(gateway: str, dag_id: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The Pushgateway's samples of the group ``tire-pipeline``/``dag_id``: name -> labels -> value
    (the grouping key's labels and the empty ``instance`` left out)."""
    text = httpx.get(f"{gateway}/metrics", timeout=10).text
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if labels.pop("job", None) != "tire-pipeline" or labels.pop("dag_id", None) != dag_id:
                continue
            labels.pop("instance", None)  # the Pushgateway adds an empty one
            samples.setdefault(sample.name, {})[tuple(sorted(labels.items()))] = sample.value
    return samples


def test_a_training_run_s_end_reaches_the_pushgateway_and_keeps_the_group_s_other_values(
    monitoring: Monitoring, tire_env: Settings
) -> None:
    settings = tire_env.model_copy(update={"pushgateway_url": monitoring.pushgateway})
    store = ObjectStore.for_data(settings)
    for version in ("v1", "v2"):
        data.mark_processed(store, version, {})
    data.mark_failed(store, "v3", {"reason": "test"})
    dag = "test_training"
    evaluation = {
        "challengers": [
            {"run_id": "a", "model_type": "cnn", "metrics": {}, "training_seconds": 2.0},
            {"run_id": "b", "model_type": "cnn", "metrics": {}, "training_seconds": 3.5},
            {"run_id": "c", "model_type": "resnet18", "metrics": {}},  # reused: no time
        ]
    }
    promotion = {
        "promoted": True,
        "version": "4",
        "comparison": {
            "candidate_metrics": {
                "test_accuracy": 0.9,
                "test_f1": 0.8,
                "inference_ms_per_image": 3.0,
            }
        },
    }
    assert pipeline.record_run(
        True, dag_id=dag, evaluation=evaluation, promotion=promotion, settings=settings
    )
    group = pushed(monitoring.pushgateway, dag)
    assert group["tire_pipeline_versions_processed"] == {(): 2.0}
    assert group["tire_pipeline_versions_failed"] == {(): 1.0}
    assert group["tire_pipeline_training_duration_seconds"] == {(("model_type", "cnn"),): 5.5}
    assert group["tire_pipeline_promoted_test_metric"] == {
        (("metric", "accuracy"),): 0.9,
        (("metric", "f1"),): 0.8,
    }
    assert group["tire_pipeline_promoted_model_version"] == {(): 4.0}
    success = group[LAST_SUCCESS][()]
    assert abs(success - time.time()) < 60
    assert LAST_FAILURE not in group

    # A failure keeps the success time; a later run that promoted nothing keeps what was promoted.
    assert pipeline.record_run(False, dag_id=dag, settings=settings)
    group = pushed(monitoring.pushgateway, dag)
    assert group[LAST_SUCCESS] == {(): success}
    assert group[LAST_FAILURE][()] >= success
    assert pipeline.record_run(True, dag_id=dag, promotion={}, settings=settings)
    group = pushed(monitoring.pushgateway, dag)
    assert group["tire_pipeline_promoted_model_version"] == {(): 4.0}
    assert group[LAST_SUCCESS][()] >= group[LAST_FAILURE][()]


class _TaskInstance:
    dag_id = "test_failing_dag"
    task_id = "validate_data"
    map_index = -1
    run_id = "manual__1"
    try_number = 1
    max_tries = 0
    log_url = "http://airflow.example/log"

    def xcom_pull(self, task_ids: str) -> None:
        return None


class _Dag:
    task_ids = ("validate_data",)


def test_the_failure_callback_pushes_the_failure(
    monitoring: Monitoring, tire_env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tirelib.orchestration import on_task_failure

    monkeypatch.setenv("TIRE_PUSHGATEWAY_URL", monitoring.pushgateway)
    reset_settings()
    before = time.time()
    context = {"ti": _TaskInstance(), "dag": _Dag(), "exception": DataError("no"), "params": {}}
    on_task_failure(context)  # type: ignore[arg-type]
    group = pushed(monitoring.pushgateway, "test_failing_dag")
    assert group[LAST_FAILURE][()] >= before - 1
    assert group["tire_pipeline_versions_failed"] == {(): 0.0}  # the version was not named
    assert LAST_SUCCESS not in group


def test_the_pipeline_alerts_fire_in_prometheus_and_reach_slack(
    monitoring: Monitoring, slack_receiver: SlackReceiver
) -> None:
    now = time.time()
    dag = "tire_training_pipeline"
    assert push(RunMetrics(dag, succeeded=True, at=now - EIGHT_DAYS), monitoring.settings)
    assert push(RunMetrics(dag, succeeded=False, at=now), monitoring.settings)

    def firing() -> set[str]:
        answer = httpx.get(f"{monitoring.prometheus}/api/v1/alerts", timeout=10).json()
        return {
            alert["labels"]["alertname"]
            for alert in answer["data"]["alerts"]
            if alert["state"] == "firing" and alert["labels"].get("dag_id") == dag
        }

    wait_for(
        lambda: firing() >= {"TirePipelineFailed", "TireNoSuccessfulRun"},
        "pipeline alerts firing in Prometheus",
    )

    def slack(alert: str) -> dict[str, Any] | None:
        for message in list(slack_receiver.messages):
            for attachment in message.get("attachments", []):
                title, text = attachment.get("title", ""), attachment.get("text", "")
                if title.startswith("[FIRING") and alert in title and f"DAG: {dag}" in text:
                    return dict(attachment)
        return None

    failed = wait_for(lambda: slack("TirePipelineFailed"), "Slack message of TirePipelineFailed")
    assert "(tire-pipeline) warning" in failed["title"]
    assert f"The last run of {dag} failed" in failed["text"]
    stale = wait_for(lambda: slack("TireNoSuccessfulRun"), "Slack message of TireNoSuccessfulRun")
    assert f"{dag} has not succeeded for 8d " in stale["text"]

    targets = httpx.get(f"{monitoring.prometheus}/api/v1/targets", timeout=10).json()
    jobs = {t["labels"]["job"]: t["health"] for t in targets["data"]["activeTargets"]}
    assert jobs["pushgateway"] == "up"
    assert "model-server" in jobs  # the job name the server's rules select on


def test_stack_status_shows_the_monitoring_servers(monitoring: Monitoring) -> None:
    statuses = Stack(monitoring.settings, monitoring_components(monitoring.settings)).status()
    assert [(s.title, s.url, s.up) for s in statuses] == [
        ("Pushgateway", monitoring.pushgateway, True),
        ("Alertmanager", f"http://127.0.0.1:{monitoring.settings.alertmanager_port}", True),
        ("Prometheus", monitoring.prometheus, True),
    ]

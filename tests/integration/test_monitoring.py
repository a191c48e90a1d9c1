"""Monitoring against a real Prometheus, a real MLflow registry and the Slack stand-in.

A tiny exporter (prometheus_client, in this process) serves the model server's own metrics
registry with values the test sets; Debian's ``prometheus`` scrapes it every second. Two
registered versions of hand-made models carry baselines whose numbers the test chose, so it
knows which live traffic is shifted and which is not. The monitoring window starts
at the production version's promotion, so each phase of a test is judged on its own traffic:
the test waits for a scrape after each promotion before sending more.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient
from prometheus_client import start_http_server
from torch import nn

from tests.conftest import SlackReceiver
from tirelib import drift, registry, tracking
from tirelib.evaluate import MODEL_URI_TAG
from tirelib.models import get_model, get_spec
from tirelib.monitoring import Prometheus, check
from tirelib.preprocessing import Preprocessing
from tirelib.registry import PRODUCTION, Thresholds
from tirelib.serve.metrics import ServeMetrics
from tirelib.settings import Settings, load_settings
from tirelib.stack import HttpCheck, ManagedProcess, free_port

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
CLASSES = ["good", "defective"]
DEADLINE = 30.0

# The baseline both versions were "trained" with: a 50/50 mix, confident, mid-grey images.
BASELINE = drift.Baseline(
    classes=CLASSES,
    images=100,
    class_share={"good": 0.5, "defective": 0.5},
    label_share={"good": 0.5, "defective": 0.5},
    confidence_mean=0.9,
    test_accuracy=0.95,
    confidence_counts=[0, 0, 5, 10, 20, 25, 30, 10, 0],
    brightness_counts=[0, 0, 0, 10, 40, 40, 10, 0, 0, 0, 0],
    contrast_counts=[0, 0, 10, 40, 40, 10, 0, 0, 0, 0],
)


def bucket_values(edges: tuple[float, ...], counts: list[int]) -> list[float]:
    """One value inside each bucket ``(previous edge, edge]``, repeated ``count`` times."""
    values: list[float] = []
    lower = 0.0
    for edge, count in zip(edges, counts, strict=False):  # the overflow bucket is left empty
        values += [(lower + edge) / 2] * count
        lower = edge
    return values


class Exporter:
    """The model server's own metrics (its :class:`ServeMetrics` registry), values set by the
    test: the names, labels and buckets monitoring reads are the server's."""

    def __init__(self) -> None:
        self.metrics = ServeMetrics()
        for name in CLASSES:  # every series exists at zero before the traffic starts
            self.metrics.predictions.labels(name)
            for version in ("1", "2"):
                self.metrics.feedback_correct.labels(version, name)
                for predicted in CLASSES:
                    self.metrics.feedback_labels.labels(version, name, predicted)
        self.port = free_port()
        self.server, self.thread = start_http_server(
            self.port, "127.0.0.1", registry=self.metrics.registry
        )

    def traffic(self, *, brightness: list[float], good_share: float = 0.5, times: int = 2) -> int:
        """``times`` x the baseline's images: its confidence and contrast, this brightness."""
        images = BASELINE.images * times
        good = round(images * good_share)
        self.metrics.predictions.labels("good").inc(good)
        self.metrics.predictions.labels("defective").inc(images - good)
        for value in bucket_values(drift.CONFIDENCE_BUCKETS, BASELINE.confidence_counts) * times:
            self.metrics.confidence.observe(value)
        contrast = bucket_values(drift.CONTRAST_BUCKETS, BASELINE.contrast_counts) * times
        self.metrics.observe_inputs(brightness, contrast)
        return images

    def feedback(self, version: str, *, labels: int, correct: int) -> None:
        """``labels`` true labels for ``version``'s predictions, ``correct`` of them right."""
        right = [("defective", "defective")] * correct
        self.metrics.observe_feedback(version, right + [("defective", "good")] * (labels - correct))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Stack:
    exporter: Exporter
    prometheus: Prometheus

    def value(self, promql: str) -> float:
        rows = self.prometheus.query(promql)
        return rows[0][1] if rows else float("nan")

    def wait(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.2)
        raise AssertionError(f"Prometheus never showed {what} within {DEADLINE} s")

    def wait_scraped(self, predictions: float, brightness: float, labels: float) -> None:
        """Until Prometheus holds the exporter's current totals."""
        self.wait(
            lambda: (
                self.value("sum(tire_predictions_total)") == predictions
                and self.value("sum(tire_input_brightness_count)") == brightness
                and self.value("sum(tire_feedback_labels_total)") == labels
            ),
            f"{predictions} predictions, {brightness} images, {labels} labels",
        )

    def wait_scrape_after(self, moment: float) -> None:
        """Until Prometheus scraped the exporter at least once after ``moment`` (Unix time)."""
        self.wait(
            lambda: self.value('max(timestamp(up{job="model-server"}))') > moment + 1.0,
            "a scrape after the promotion",
        )


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """The exporter and a Prometheus scraping it every second (job ``model-server``)."""
    if not Path(PROMETHEUS).is_file():
        pytest.skip("Prometheus is not installed (Debian: apt-get install prometheus)")
    exporter = Exporter()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "model-server",
                        "static_configs": [{"targets": [f"127.0.0.1:{exporter.port}"]}],
                    }
                ],
            }
        )
    )
    url = f"http://127.0.0.1:{port}"
    process = ManagedProcess(
        "prometheus",
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        state_dir=tmp_path,
        ready=HttpCheck(f"{url}/-/ready"),
        url=url,
        ports=(port,),
    )
    process.start()
    try:
        process.wait_ready(30)
        stack = Stack(exporter, Prometheus(url))
        stack.wait_scraped(0, 0, 0)
        yield stack
    finally:
        process.stop()  # by the pid it recorded
        exporter.close()


def constant_network(favour: str) -> nn.Module:
    network = get_model("cnn", num_classes=len(CLASSES))
    head = [m for m in network.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[CLASSES.index(favour)] = 3.0
    return network.eval()


@pytest.fixture(scope="module")
def runs(mlflow_server: str) -> list[str]:
    """Two runs with a logged model and the baseline, as training makes them."""
    settings = load_settings(
        mlflow_tracking_uri=mlflow_server, experiment=f"tire-monitoring-{time.time_ns()}"
    )
    tracking.configure(settings)
    spec = get_spec("cnn")
    made = []
    for favour in ("defective", "good"):
        with mlflow.start_run(tags={"dataset_version": "mon-1", "model_type": "cnn"}) as run:
            mlflow.log_dict(BASELINE.model_dump(mode="json"), drift.BASELINE_FILE)
            uri = tracking.log_model(
                constant_network(favour),
                model_type="cnn",
                classes=CLASSES,
                prep=Preprocessing(32, spec.mean, spec.std),
                baseline=BASELINE,
            )
            mlflow.set_tag(MODEL_URI_TAG, uri)
            mlflow.log_metrics({"test_accuracy": BASELINE.test_accuracy, "test_f1": 0.9})
        made.append(run.info.run_id)
    return made


def promote(settings: Settings, run_id: str) -> tuple[str, float]:
    """Register the run and force it into production; its version and the Unix time."""
    version = registry.register_run(settings, run_id, thresholds=Thresholds.off()).version
    assert version is not None
    assert registry.produce(settings, force=True, version=version).promoted
    return version, time.time()


def production(settings: Settings) -> str:
    model = MlflowClient(settings.mlflow_tracking_uri).get_registered_model(settings.model_name)
    return str(model.aliases[PRODUCTION])


def monitoring_settings(stack: Stack, slack: SlackReceiver, *, auto_rollback: bool) -> Settings:
    return load_settings(
        prometheus_url=stack.prometheus.url,
        slack_webhook_url=slack.url,
        auto_rollback=auto_rollback,
        monitor_min_observations=100,
        monitor_min_labels=50,
    )


def test_shifted_traffic_is_drift_unshifted_is_quiet_and_nothing_rolls_back_when_off(
    tracked_env: Settings, runs: list[str], stack: Stack, slack_receiver: SlackReceiver
) -> None:
    settings = monitoring_settings(stack, slack_receiver, auto_rollback=False)
    first, promoted_at = promote(settings, runs[0])
    # the counters at zero inside the judged window (it starts at the promotion): increase()
    # needs a sample before the traffic
    stack.wait_scrape_after(promoted_at)
    mid_grey = bucket_values(drift.BRIGHTNESS_BUCKETS, BASELINE.brightness_counts) * 2
    images = stack.exporter.traffic(brightness=mid_grey)
    stack.exporter.feedback(first, labels=60, correct=58)
    stack.wait_scraped(images, images, 60)

    quiet = check(settings)
    assert quiet.version == first
    judged = {c.statistic: c for c in quiet.drift}
    assert set(judged) == {"prediction_mix", "confidence", "brightness", "contrast"}
    for statistic, result in judged.items():
        assert result.psi is not None and result.psi < 0.01, (statistic, result)
    assert quiet.accuracy is not None and quiet.accuracy.judged
    assert quiet.accuracy.live == pytest.approx(58 / 60, abs=0.01)
    assert not quiet.alert and not quiet.notified
    assert slack_receiver.messages == []  # Slack hears only when a threshold is crossed

    # Version 2 serves much darker images, mostly called good, and is mostly wrong.
    second, promoted_at = promote(settings, runs[1])
    stack.wait_scrape_after(promoted_at)
    dark = [0.05] * images
    stack.exporter.traffic(brightness=dark, good_share=0.9)
    stack.exporter.feedback(second, labels=60, correct=20)
    stack.wait_scraped(2 * images, 2 * images, 120)

    loud = check(settings)
    assert loud.version == second
    judged = {c.statistic: c for c in loud.drift}
    assert judged["brightness"].drifted and judged["prediction_mix"].drifted
    assert not judged["contrast"].drifted and not judged["confidence"].drifted
    assert judged["brightness"].observations >= images  # this version's traffic only
    assert loud.accuracy is not None and loud.accuracy.below_floor and loud.accuracy.dropped
    assert loud.accuracy.live == pytest.approx(20 / 60, abs=0.01)
    assert loud.alert and loud.notified
    (text,) = slack_receiver.texts()
    assert f"version {second} in production" in text
    assert "brightness: PSI" in text and "DRIFTED" in text
    assert f"live accuracy of version {second}: 0.33" in text
    assert "auto-rollback is off (TIRE_AUTO_ROLLBACK)" in text
    assert loud.rolled_back is None and production(settings) == second


def test_auto_rollback_moves_production_back_once(
    tracked_env: Settings, runs: list[str], stack: Stack, slack_receiver: SlackReceiver
) -> None:
    settings = monitoring_settings(stack, slack_receiver, auto_rollback=True)
    first, _ = promote(settings, runs[0])
    second, promoted_at = promote(settings, runs[1])
    stack.wait_scrape_after(promoted_at)
    stack.exporter.feedback(second, labels=60, correct=21)
    stack.wait_scraped(0, 0, 60)

    result = check(settings)
    assert result.accuracy is not None and result.accuracy.below_floor
    assert result.rolled_back is not None and result.rolled_back["version"] == first
    assert production(settings) == first
    (text,) = slack_receiver.texts()
    assert f"auto-rollback: production of {settings.model_name} rolled back to version" in text

    # The labels were about version 2: judged again, version 1 is not rolled back for them.
    slack_receiver.clear()
    again = check(settings)
    assert again.version == first
    assert again.accuracy is not None and not again.accuracy.judged
    assert again.rolled_back is None and again.rollback_refused is None
    assert production(settings) == first and slack_receiver.messages == []

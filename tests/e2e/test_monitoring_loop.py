"""The monitoring loop end to end, on real servers: feedback that turns bad fires the
live-accuracy alert through Prometheus and Alertmanager into Slack, monitoring rolls production
back and the running model server follows; much darker images are drift, unshifted ones are not.

One world for the module: a dataset version of synthetic tires, two tiny models trained on it for
one epoch (each run stores its drift baseline, as training does), registered as versions 1 and 2,
and version 2 promoted over version 1, which it records as the previous production version.
``tirelib serve`` serves ``@production`` (checking the alias every half second); Debian's
Prometheus scrapes it every second with the project's rules (a copy with shorter durations, see
:func:`shortened_rules`) and sends alerts to Debian's Alertmanager, configured from
docker/alertmanager as the local stack configures it, whose Slack webhook is the local stand-in.

Live traffic is the test split's own images, sent as PNG: a model's baseline was computed on
exactly these, so unshifted traffic matches it bucket for bucket and any drift found is the one
the test made (fresh images against a baseline of a dozen would differ by chance).
"""

from __future__ import annotations

import base64
import io
import re
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from tests.conftest import _FOREIGN_ENV, S3Server, SlackReceiver, lake_env
from tests.integration.model_server import running_server
from tests.integration.test_alertmanager import attachments, wait_for_attachment
from tirelib import registry
from tirelib.data import read_split, upload_version
from tirelib.monitoring import Prometheus, check
from tirelib.registry import PRODUCTION, Thresholds
from tirelib.settings import Settings, get_settings, load_settings, reset_settings
from tirelib.stack import HttpCheck, ManagedProcess, create_buckets, free_port, wait_serving
from tirelib.stack.monitoring import (
    ALERTMANAGER_BINARIES,
    PROMETHEUS_BINARIES,
    alertmanager_component,
    alertmanager_url,
    monitoring_binary,
    render_prometheus_config,
)
from tirelib.storage import ObjectStore
from tirelib.synth import generate
from tirelib.train import make_config, train

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "docker" / "prometheus" / "rules"
VERSION = "monitoring-loop"
DEADLINE = 60.0
ACCURACY_ALERT = "TireLiveAccuracyDrop"
QUIET_ALERTS = ("TirePredictionMixDrift", "TireConfidenceDrop")
# The group of alerts this test watches; its alerts get a short `for:` (see shortened_rules).
WATCHED_GROUP = "tire-model-quality"
LONGEST_WINDOW_S = 120
SHORT_FOR = "2s"
_RANGE = re.compile(r"\[(\d+)([smhd])\]")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def shortened_rules(folder: Path) -> Path:
    """A copy of docker/prometheus/rules in ``folder`` with the durations a test can wait for.

    A copy, because the deployment's alerts wait 15 and 30 minutes (`for:`) over hour-long
    windows, longer than any test may take, and the files themselves must stay as deployed.
    Every expression, threshold and label is the real one; only two kinds of duration change:

    - a range selector longer than 2 minutes reads the last 2 minutes (``[1h]`` becomes
      ``[120s]``): they hold the whole traffic of this test, as the hour holds production's;
    - the alerts of the model-quality group wait 2 s rather than their `for:`. The server's
      alerts keep theirs: Prometheus scrapes its targets first some seconds after it starts,
      and until then TireServerDown's ``absent(up)`` holds, which with a short `for:` would
      fire and hold every other alert of the server back in Alertmanager.
    """

    def window(match: re.Match[str]) -> str:
        seconds = int(match.group(1)) * _SECONDS[match.group(2)]
        return f"[{LONGEST_WINDOW_S}s]" if seconds > LONGEST_WINDOW_S else match.group(0)

    folder.mkdir(parents=True, exist_ok=True)
    for source in sorted(RULES.glob("*.yml")):
        document = yaml.safe_load(source.read_text())
        for group in document["groups"]:
            for rule in group["rules"]:
                rule["expr"] = _RANGE.sub(window, rule["expr"])
                if "alert" in rule and "for" in rule and group["name"] == WATCHED_GROUP:
                    rule["for"] = SHORT_FOR
        (folder / source.name).write_text(yaml.safe_dump(document, sort_keys=False))
    return folder


# --- the world -----------------------------------------------------------------------------


@dataclass
class World:
    settings: Settings  # monitoring's: the registry, Prometheus, Slack, TIRE_AUTO_ROLLBACK on
    server: str
    prometheus: Prometheus
    first: str
    second: str
    unshifted: list[bytes]  # the test split's images

    def value(self, promql: str) -> float:
        """The sum of what ``promql`` gives now (NaN when it gives nothing)."""
        rows = self.prometheus.query(promql)
        return sum(value for _, value in rows) if rows else float("nan")

    def rules(self) -> list[dict[str, Any]]:
        """Prometheus's alerting rules, each with the last evaluation of its group."""
        answer = httpx.get(
            f"{self.prometheus.url}/api/v1/rules", params={"type": "alert"}, timeout=10
        )
        answer.raise_for_status()
        return [
            {**rule, "evaluated": _unix(group["lastEvaluation"])}
            for group in answer.json()["data"]["groups"]
            for rule in group["rules"]
        ]

    def rule(self, name: str) -> dict[str, Any]:
        (found,) = [rule for rule in self.rules() if rule["name"] == name]
        return found

    def scraped(self, brightness: float) -> None:
        """Until Prometheus holds ``brightness`` images in the server's input histogram."""
        wait_for(
            lambda: self.value("sum(tire_input_brightness_count)") == brightness,
            f"{brightness:.0f} images scraped",
        )


def wait_for(condition: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout:.0f} s")


def _unix(timestamp: str) -> float:
    """Unix time of Prometheus's RFC 3339 timestamps (nanoseconds cut to microseconds)."""
    trimmed = re.sub(r"(\.\d{6})\d+", r"\1", timestamp).replace("Z", "+00:00")
    return datetime.fromisoformat(trimmed).timestamp()


def _binary(names: Sequence[str], package: str) -> Path:
    found = monitoring_binary(names)
    if found is None:
        pytest.skip(f"{package} is not installed (`make system-deps` installs it)")
    return found


def _prometheus(root: Path, settings: Settings) -> ManagedProcess:
    """Prometheus as the local stack renders it (job model-server, the local Alertmanager,
    scrapes and evaluations every second), reading the shortened copy of the rules."""
    binary = _binary(PROMETHEUS_BINARIES, "prometheus")
    config = yaml.safe_load(
        render_prometheus_config(settings, pushgateway=False, interval="1s").read_text()
    )
    config["rule_files"] = [str(shortened_rules(root / "rules") / "*.yml")]
    path = root / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    url = f"http://127.0.0.1:{settings.prometheus_port}"
    return ManagedProcess(
        "prometheus",
        [
            str(binary),
            f"--config.file={path}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{settings.prometheus_port}",
        ],
        state_dir=root,
        ready=HttpCheck(f"{url}/-/ready"),
        url=url,
        ports=(settings.prometheus_port,),
    )


def _train_and_promote(settings: Settings, seed: int) -> str:
    """A tiny model trained one epoch (its run stores the baseline), forced into production."""
    config = make_config(
        dataset_version=VERSION,
        model_type="tinyvgg",
        epochs=1,
        batch_size=16,
        image_size=32,
        seed=seed,
    )
    run_id = train(config, settings, progress=False).run_id
    assert run_id is not None
    version = registry.register_run(settings, run_id, thresholds=Thresholds.off()).version
    assert version is not None
    assert registry.produce(settings, force=True, version=version).promoted
    return version


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    s3_server: S3Server,
    mlflow_server: str,
    _slack_server: SlackReceiver,
) -> Iterator[World]:
    root = tmp_path_factory.mktemp("monitoring-loop")
    suffix = secrets.token_hex(4)
    env = {
        **lake_env(root / "home", s3_server, suffix),
        "MLFLOW_TRACKING_URI": mlflow_server,
        "TIRE_EXPERIMENT": f"tire-monitoring-loop-{suffix}",
        "TIRE_MODEL_NAME": f"tire-monitoring-loop-{suffix}",
    }
    with pytest.MonkeyPatch.context() as patch, ExitStack() as stack:
        for name in _FOREIGN_ENV:
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        reset_settings()
        stack.callback(reset_settings)
        settings = get_settings()
        create_buckets(settings, [settings.data_bucket, settings.artifact_bucket])
        store = ObjectStore.for_data(settings)
        generate(root / "tires", 80, seed=11, size=32)
        upload_version(store, root / "tires", VERSION, progress=False)
        first = _train_and_promote(settings, seed=1)
        second = _train_and_promote(settings, seed=2)  # records the first as its previous
        unshifted = [store.get_bytes(r.key) for r in read_split(store, VERSION, "test").records]

        server = stack.enter_context(
            running_server(
                root / "server",
                env={"TIRE_SERVE_POLL_INTERVAL_S": "0.5", "TIRE_SERVE_NUM_THREADS": "1"},
            )
        ).url
        monitoring = load_settings(
            home=root / "stack",
            serve_port=urlsplit(server).port,
            prometheus_port=free_port(),
            alertmanager_port=free_port(),
            slack_webhook_url=_slack_server.url,
        )
        alertmanager = alertmanager_component(
            monitoring, _binary(ALERTMANAGER_BINARIES, "prometheus-alertmanager"), group_wait="1s"
        )
        assert alertmanager.up(), f"Alertmanager did not start at {alertmanager_url(monitoring)}"
        stack.callback(alertmanager.down)
        prometheus = _prometheus(root / "prometheus", monitoring)
        prometheus.start()
        stack.callback(prometheus.stop)  # by the pid it recorded
        prometheus.wait_ready(60)

        found = World(
            load_settings(
                prometheus_url=prometheus.url,
                slack_webhook_url=_slack_server.url,
                auto_rollback=True,
            ),
            server,
            Prometheus(prometheus.url),
            first,
            second,
            unshifted,
        )
        wait_for(
            lambda: found.value(f'tire_model_info{{job="model-server", version="{second}"}}') == 1,
            f"scrape of the server serving version {second}",
        )
        yield found


# --- traffic -------------------------------------------------------------------------------


def predict(server: str, images: Sequence[bytes]) -> tuple[str, list[str], list[str]]:
    """Classify ``images`` (PNG); the request id, the predicted labels and the classes."""
    body = {"instances": [{"b64": base64.b64encode(image).decode()} for image in images]}
    answer = httpx.post(
        f"{server}/v1/models/tire:predict", params={"labels": "true"}, json=body, timeout=60
    )
    assert answer.status_code == 200, answer.text
    payload = answer.json()
    return answer.headers["X-Request-ID"], payload["labels"], payload["classes"]


def send_feedback(server: str, request_id: str, labels: Sequence[str]) -> dict[str, Any]:
    body = {"request_id": request_id, "labels": list(labels)}
    answer = httpx.post(f"{server}/v1/models/tire:feedback", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def labelled_traffic(world: World, requests: int, *, right: int) -> int:
    """``requests`` requests of the test images, each labelled back with its first ``right``
    predictions confirmed and the rest called the other class; the labels sent."""
    sent = 0
    for _ in range(requests):
        request_id, predicted, classes = predict(world.server, world.unshifted)
        labels = [
            label if index < right else next(c for c in classes if c != label)
            for index, label in enumerate(predicted)
        ]
        answer = send_feedback(world.server, request_id, labels)
        assert answer["model_version"] == world.second
        assert answer["correct"] == min(right, len(labels))
        sent += len(labels)
    return sent


def darker(image: bytes, factor: float = 0.3) -> bytes:
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=np.float32)
    out = io.BytesIO()
    Image.fromarray((pixels * factor).round().astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def notifications(receiver: SlackReceiver) -> list[str]:
    """Monitoring's own Slack messages (Alertmanager's are attachments)."""
    return [
        str(m.get("text", ""))
        for m in list(receiver.messages)
        if isinstance(m, dict) and "attachments" not in m
    ]


def production(settings: Settings) -> tuple[str, float]:
    """The production version and when it was promoted (Unix time)."""
    client = MlflowClient(settings.mlflow_tracking_uri)
    version = client.get_registered_model(settings.model_name).aliases[PRODUCTION]
    tags = client.get_model_version(settings.model_name, version).tags
    return str(version), datetime.fromisoformat(tags["promoted_at"]).timestamp()


# --- the tests -----------------------------------------------------------------------------


def test_feedback_turning_bad_alerts_slack_and_rolls_production_back(
    world: World, slack_receiver: SlackReceiver
) -> None:
    second, labels_of = world.second, f'{{job="model-server", version="{world.second}"}}'
    per_request = len(world.unshifted)
    assert per_request >= 5, "the test split is too small to label"

    # Confirmed predictions, past the rule's minimum of 50 labels: the alert stays quiet.
    good = labelled_traffic(world, -(-50 // per_request), right=per_request)
    wait_for(
        lambda: world.value(f"job_version:tire_feedback_labels:increase1h{labels_of}") >= good,
        f"{good} labels in the recorded series",
    )
    seen = time.time()
    rule = wait_for(
        lambda: (r := world.rule(ACCURACY_ALERT))["evaluated"] > seen + 0.1 and r,
        "evaluation of the alert after the labels",
    )
    assert rule["state"] == "inactive", rule

    # Then the labels say the model is mostly wrong: one right per request.
    bad = labelled_traffic(world, 2 * -(-50 // per_request), right=1)
    message = wait_for_attachment(
        slack_receiver,
        lambda a: a.get("title", "").startswith(f"[FIRING:1] {ACCURACY_ALERT}"),
        "for the live-accuracy alert",
    )
    assert f"Model version: {second}" in message["text"]
    assert f"Live accuracy of model version {second} is" in message["text"]
    # Judged on the same traffic, past its own minimum of 100 predictions, the prediction mix
    # and confidence alerts stay quiet: the images are the ones the baseline was made of.
    assert world.value("job:tire_predictions:increase1h") >= 100
    for name in QUIET_ALERTS:
        assert world.rule(name)["state"] == "inactive", world.rule(name)
    titles = [a.get("title", "") for a in attachments(slack_receiver)]
    assert all(ACCURACY_ALERT in title for title in titles), titles

    # Monitoring with TIRE_AUTO_ROLLBACK judges the same numbers and rolls back. It looks from
    # the last scrape, which holds every label: increase() then extrapolates nothing, so the
    # count is exact, the first label of each series included (the series start at zero).
    labels, right = good + bad, good + bad // per_request
    wait_for(
        lambda: world.value(f"sum(tire_feedback_labels_total{labels_of})") == labels,
        f"{labels} labels scraped",
    )
    last_scrape = world.value(f"max(timestamp(tire_feedback_labels_total{labels_of}))")
    report = check(world.settings, now=last_scrape)
    assert report.version == second
    accuracy = report.accuracy
    assert accuracy is not None and accuracy.below_floor
    assert (accuracy.labels, accuracy.correct) == (labels, right)
    assert report.rolled_back is not None and report.rolled_back["version"] == world.first
    assert production(world.settings)[0] == world.first
    assert report.notified
    (text,) = notifications(slack_receiver)
    assert f"live accuracy of version {second}: {accuracy.live:.3f}" in text
    assert f"rolled back to version {world.first}" in text

    # The running server follows the alias, and says so to Prometheus.
    wait_serving(world.server, world.first, timeout=DEADLINE, interval=0.2)
    status = httpx.get(f"{world.server}/v1/models/tire", timeout=10).json()
    assert [(v["version"], v["state"]) for v in status["model_version_status"]] == [
        (world.first, "AVAILABLE")
    ]
    wait_for(
        lambda: world.value(f'tire_model_info{{job="model-server", version="{world.first}"}}') == 1,
        f"tire_model_info of version {world.first}",
    )


def test_darker_images_drift_in_brightness_while_unshifted_ones_stay_quiet(
    world: World, slack_receiver: SlackReceiver
) -> None:
    version, promoted_at = production(world.settings)
    wait_serving(world.server, version, timeout=DEADLINE, interval=0.2)
    # The window starts at the promotion: a scrape inside it must precede the traffic.
    wait_for(
        lambda: world.value('max(timestamp(up{job="model-server"}))') > promoted_at + 1,
        "a scrape after the promotion",
    )
    minimum = world.settings.monitor_min_observations
    repeats = -(-minimum // len(world.unshifted))
    images = world.value("sum(tire_input_brightness_count)")

    for _ in range(repeats):
        predict(world.server, world.unshifted)
    images += repeats * len(world.unshifted)
    world.scraped(images)
    quiet = check(world.settings)
    assert quiet.version == version
    judged = {c.statistic: c for c in quiet.drift}
    assert judged["brightness"].psi is not None and judged["brightness"].psi < 0.05, judged
    assert judged["brightness"].observations >= minimum
    assert not quiet.drifted and not quiet.alert and not quiet.notified
    assert notifications(slack_receiver) == []  # Slack hears only of a crossed threshold

    dark = [darker(image) for image in world.unshifted]
    for _ in range(2 * repeats):
        predict(world.server, dark)
    images += 2 * repeats * len(dark)
    world.scraped(images)
    loud = check(world.settings)
    judged = {c.statistic: c for c in loud.drift}
    assert judged["brightness"].drifted, judged
    assert judged["brightness"].observations >= 3 * repeats * len(dark)
    assert loud.notified and loud.rolled_back is None
    (text,) = notifications(slack_receiver)
    assert f"version {version} in production" in text
    assert re.search(r"brightness: PSI \d+\.\d+ \(DRIFTED", text), text

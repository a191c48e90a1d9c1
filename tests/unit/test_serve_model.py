"""The model holder: load, warm up, swap, keep the working version when a new one fails (one
that the backend asked for cannot serve included); the registry URIs it follows or pins;
folding batch norm; Slack alerts; the server's settings."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from tests.conftest import SlackReceiver
from tirelib.errors import ConfigurationError
from tirelib.models import IMAGENET_MEAN, IMAGENET_STD, get_model
from tirelib.preprocessing import Preprocessing
from tirelib.pyfunc import TireClassifier
from tirelib.runtime import TestSample, export_onnx
from tirelib.serve.config import load_serve_config
from tirelib.serve.metrics import ServeMetrics
from tirelib.serve.model import (
    ModelHolder,
    ModelLoadError,
    RegistrySource,
    ServedModel,
    notify_slack,
    optimize_network,
)
from tirelib.settings import load_settings

pytestmark = pytest.mark.unit


def classifier(model_type: str = "cnn", seed: int = 0, size: int = 32) -> TireClassifier:
    torch.manual_seed(seed)
    model = TireClassifier()
    model.classes = ["good", "defective"]
    model.model_type = model_type
    model.prep = Preprocessing(size, IMAGENET_MEAN, IMAGENET_STD)
    model.network = get_model(model_type, num_classes=2).eval()
    return model


class FakeRegistry:
    """A source whose wanted version the test moves; versions in ``broken`` fail to load."""

    def __init__(self, version: str = "1", *, watches: bool = True) -> None:
        self.version = version
        self.broken: set[str] = set()
        self.loads: list[str] = []
        self._watches = watches

    @property
    def uri(self) -> str:
        return "models:/fake@production"

    @property
    def watches(self) -> bool:
        return self._watches

    @property
    def alias(self) -> str | None:
        return "production"

    def resolve(self) -> str:
        if self.version == "missing":
            raise ModelLoadError("alias production is not set")
        return self.version

    def version_uri(self, version: str) -> str:
        return f"models:/fake/{version}"

    def load(self, version: str) -> TireClassifier:
        self.loads.append(version)
        if version in self.broken:
            raise OSError(f"artifacts of version {version} are corrupt")
        return classifier(seed=int(version))


def metric(metrics: ServeMetrics, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels}")


def test_a_new_version_is_swapped_in_and_the_old_object_stays_usable() -> None:
    source, metrics = FakeRegistry("1"), ServeMetrics()
    holder = ModelHolder(source, metrics=metrics)
    assert holder.current is None
    assert holder.poll_once()
    first = holder.current
    assert first is not None and first.version == "1"
    assert not holder.poll_once()  # nothing changed, nothing loaded
    assert source.loads == ["1"]

    source.version = "2"
    assert holder.poll_once()
    second = holder.current
    assert second is not None and second.version == "2"
    assert [(s.version, s.state) for s in holder.status()] == [("2", "AVAILABLE")]
    # A request that started on version 1 still holds a working model.
    batch = torch.rand(3, 3, 32, 32)
    assert first.predict_proba(batch).shape == (3, 2)
    assert not np.allclose(first.predict_proba(batch), second.predict_proba(batch))
    assert metric(metrics, "tire_model_reloads_total", result="success") == 2
    assert metric(metrics, "tire_model_info", version="2", model_type="cnn") == 1


def test_a_broken_version_never_replaces_the_working_one() -> None:
    source, metrics, alerts = FakeRegistry("1"), ServeMetrics(), []
    holder = ModelHolder(source, metrics=metrics, notify=alerts.append, poll_interval_s=60)
    holder.poll_once()
    source.version = "2"
    source.broken.add("2")
    assert not holder.poll_once()
    current = holder.current
    assert current is not None and current.version == "1"
    states = {s.version: s for s in holder.status()}
    assert states["1"].state == "AVAILABLE"
    assert states["2"].state == "UNAVAILABLE"
    assert states["2"].error_code == "UNKNOWN"
    assert "artifacts of version 2 are corrupt" in states["2"].error_message
    assert metric(metrics, "tire_model_reloads_total", result="failure") == 1
    assert len(alerts) == 1
    assert "version 2" in alerts[0] and "still serving version 1" in alerts[0]

    # Not retried on every poll (backoff), and Slack hears about it once.
    assert not holder.poll_once()
    assert source.loads == ["1", "2"]
    assert len(alerts) == 1

    # The alias moves on to a good version: it is loaded, the failure is forgotten.
    source.version = "3"
    assert holder.poll_once()
    assert [(s.version, s.state) for s in holder.status()] == [
        ("3", "AVAILABLE"),
        ("2", "UNAVAILABLE"),
    ]


def test_no_version_yet_is_a_problem_not_a_crash() -> None:
    source = FakeRegistry("missing")
    holder = ModelHolder(source)
    assert not holder.poll_once()
    assert holder.current is None
    assert holder.problem == "alias production is not set"
    source.version = "1"
    assert holder.poll_once()
    assert holder.problem is None


def wait_for_version(holder: ModelHolder, version: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = holder.current
        if current is not None and current.version == version:
            return True
        time.sleep(0.02)
    return False


def test_the_watcher_thread_follows_the_alias_and_stops() -> None:
    source = FakeRegistry("1")
    holder = ModelHolder(source, poll_interval_s=0.05)
    holder.start()
    try:
        assert holder.wait_first_attempt(30)
        source.version = "2"
        assert wait_for_version(holder, "2")
    finally:
        holder.stop()


def test_a_pinned_source_is_loaded_once() -> None:
    source = FakeRegistry("4", watches=False)
    holder = ModelHolder(source, poll_interval_s=0.01)
    holder.start()
    try:
        assert holder.wait_first_attempt(30)
        time.sleep(0.1)  # many poll intervals: a watching holder would have looked again
    finally:
        holder.stop()
    assert source.loads == ["4"]


@pytest.mark.parametrize(
    ("uri", "watches", "alias", "version_uri"),
    [
        ("models:/tires@production", True, "production", "models:/tires/7"),
        ("models:/tires@staging", True, "staging", "models:/tires/7"),
        ("models:/tires/3", False, None, "models:/tires/7"),
        ("runs:/abc123/model", False, None, "runs:/abc123/model"),
    ],
)
def test_registry_uris_are_followed_or_pinned(
    uri: str, watches: bool, alias: str | None, version_uri: str
) -> None:
    source = RegistrySource(uri)
    assert source.watches is watches
    assert source.alias == alias
    assert source.version_uri("7") == version_uri
    if uri.endswith("/3"):
        assert source.resolve() == "3"


@pytest.mark.parametrize("model_type", ["cnn", "tinyvgg", "resnet18"])
def test_the_network_rewritten_for_inference_keeps_the_predictions(model_type: str) -> None:
    network = classifier(model_type).network
    example = torch.rand(4, 3, 32, 32)
    rewritten = optimize_network(network, example)
    assert rewritten is not network
    assert not any(isinstance(m, nn.BatchNorm2d) for m in rewritten.modules())
    other = torch.rand(1, 3, 32, 32)  # another batch size (the image size is the model's)
    with torch.inference_mode():
        for images in (example, other):
            want = torch.softmax(network(images), 1)
            assert torch.allclose(want, torch.softmax(rewritten(images), 1), atol=1e-5)


def test_a_network_that_cannot_be_traced_is_served_as_it_is() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: no symbolic trace
                return x.mean(dim=(2, 3))[:, :2]
            return -x.mean(dim=(2, 3))[:, :2]

    network = Branchy()
    assert optimize_network(network, torch.rand(2, 3, 8, 8)) is network


def test_a_network_that_does_not_fit_its_classes_is_refused() -> None:
    model = classifier("tinyvgg")
    model.classes = ["good", "defective", "unknown"]
    with pytest.raises(ModelLoadError, match="3 classes"):
        ServedModel.build(model, version="1", uri="memory:/x")


def test_slack_alerts_never_raise(slack_receiver: SlackReceiver) -> None:
    assert notify_slack(slack_receiver.url, "version 3 failed to load")
    assert slack_receiver.wait_for(1)[0] == {"text": "version 3 failed to load"}
    slack_receiver.status = 500
    assert not notify_slack(slack_receiver.url, "again")
    slack_receiver.stop()
    assert not notify_slack(slack_receiver.url, "Slack is down")
    assert not notify_slack(None, "no webhook configured")


def test_server_settings_come_from_the_environment_and_name_bad_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TIRE_SERVE_PORT", "9001")
    monkeypatch.setenv("TIRE_SERVE_MAX_BATCH_SIZE", "8")
    config = load_serve_config(max_batch_size=16, host=None)
    assert (config.port, config.max_batch_size, config.host) == (9001, 16, "127.0.0.1")
    settings = load_settings(model_name="tires")
    assert config.resolved_model_uri(settings) == "models:/tires@production"
    with pytest.raises(ConfigurationError, match="TIRE_SERVE_MAX_WAIT_MS=-1"):
        load_serve_config(max_wait_ms=-1)
    with pytest.raises(ConfigurationError, match="TIRE_SERVE_NAME"):
        load_serve_config(name="bad/name")


def with_onnx(model: TireClassifier, folder: Path) -> TireClassifier:
    """``model`` with its ONNX export and a test sample, as a logged model carries them."""
    assert export_onnx(model.network, model.prep.image_size, folder / "model.onnx")
    model.onnx_model = (folder / "model.onnx").read_bytes()
    pixels = np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    model.test_sample = TestSample(pixels, np.zeros(8, dtype=np.int64))
    return model


def test_a_version_onnxruntime_cannot_serve_never_replaces_the_working_one(
    tmp_path: Path,
) -> None:
    source, metrics, alerts = FakeRegistry("1"), ServeMetrics(), list[str]()
    exported = with_onnx(classifier(seed=1), tmp_path)
    source.load = lambda version: exported if version == "1" else classifier(seed=2)  # type: ignore[method-assign]
    holder = ModelHolder(
        source, metrics=metrics, notify=alerts.append, backend="onnxruntime", poll_interval_s=60
    )
    assert holder.poll_once()
    current = holder.current
    assert current is not None and (current.version, current.backend) == ("1", "onnxruntime")

    source.version = "2"  # logged without an ONNX export
    assert not holder.poll_once()
    assert holder.current is current
    states = {s.version: s for s in holder.status()}
    assert states["2"].state == "UNAVAILABLE"
    assert "backend onnxruntime was asked for, but the version has no ONNX export" in (
        states["2"].error_message
    )
    assert len(alerts) == 1 and "still serving version 1" in alerts[0]

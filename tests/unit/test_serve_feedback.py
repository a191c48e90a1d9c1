"""The server's feedback loop in-process: request ids, the feedback route and its counters, the
bounded store of recent predictions, baseline gauges, input statistics, and the sink's queue.

Writing to S3 is proven against a real store in tests/integration/test_serve_capture.py.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from torch.nn import functional

from tests.unit.test_serve_api import b64, classifier, floats, png
from tirelib.drift import (
    BRIGHTNESS_BUCKETS,
    CONFIDENCE_BUCKETS,
    CONTRAST_BUCKETS,
    Baseline,
    image_statistics,
)
from tirelib.pyfunc import TireClassifier
from tirelib.serve import create_app, load_serve_config
from tirelib.serve.deps import input_statistics
from tirelib.serve.feedback import FeedbackStore, Prediction
from tirelib.serve.metrics import ServeMetrics
from tirelib.serve.model import ModelHolder, StaticSource
from tirelib.serve.sink import Sink, capture_object_key, float_png, start_sink
from tirelib.settings import load_settings
from tirelib.storage import ObjectStore, parse_capture_name, s3_client

pytestmark = pytest.mark.unit

PREDICT = "/v1/models/tire:predict"
FEEDBACK = "/v1/models/tire:feedback"
VERSION = "7"


@pytest.fixture(scope="module")
def model() -> TireClassifier:
    return classifier()


@pytest.fixture(scope="module")
def client(model: TireClassifier) -> Iterator[TestClient]:
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("AWS_ACCESS_KEY_ID", raising=False)  # no S3 settings: the sink is off
        settings = load_settings()
    config = load_serve_config(max_wait_ms=1, capture_rate=1.0)
    app = create_app(config, settings, source=StaticSource(model, version=VERSION))
    with TestClient(app) as test_client:
        yield test_client


def samples(client: TestClient) -> list[Any]:
    text = client.get("/metrics").text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(client: TestClient, name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples(client)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def predict(client: TestClient, instances: list[Any], request_id: str | None = None) -> str:
    headers = {"X-Request-ID": request_id} if request_id else {}
    response = client.post(PREDICT, json={"instances": instances}, headers=headers)
    assert response.status_code == 200, response.text
    return response.headers["X-Request-ID"]


# --- request ids ----------------------------------------------------------------------------

V2_BODY = {"inputs": [{"name": "x", "shape": [1, 4, 4, 3], "datatype": "FP32", "data": [0.5] * 48}]}
ROUTES = [
    ("predict", PREDICT, {"json": {"instances": [floats()]}}),
    ("version", f"/v1/models/tire/versions/{VERSION}:predict", {"json": {"inputs": [floats()]}}),
    ("classify", "/v1/models/tire:classify", {"json": {"examples": [{"image": b64(png())}]}}),
    ("upload", "/v1/models/tire:upload", {"files": {"file": ("a.png", png())}}),
    ("v2", "/v2/models/tire/infer", {"json": V2_BODY}),
    ("v2 version", f"/v2/models/tire/versions/{VERSION}/infer", {"json": V2_BODY}),
]


@pytest.mark.parametrize(("route", "kwargs"), [r[1:] for r in ROUTES], ids=[r[0] for r in ROUTES])
def test_every_prediction_answers_with_a_request_id(
    client: TestClient, route: str, kwargs: dict[str, Any]
) -> None:
    fresh = [client.post(route, **kwargs) for _ in range(2)]
    assert [r.status_code for r in fresh] == [200, 200], fresh[0].text
    ids = [r.headers["X-Request-ID"] for r in fresh]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids) and ids[0] != ids[1]
    own = client.post(route, headers={"X-Request-ID": "order 66/a~b"}, **kwargs)
    assert own.status_code == 200
    assert own.headers["X-Request-ID"] == "order 66/a~b"
    # Each answered request (one image each here) can be given its label.
    answer = client.post(FEEDBACK, json={"request_id": ids[0], "labels": ["good"]})
    assert answer.status_code == 200, answer.text


def test_refusals_carry_the_request_id_too(client: TestClient) -> None:
    bad = client.post(PREDICT, content=b"{", headers={"X-Request-ID": "broken-1"})
    assert bad.status_code == 400 and bad.headers["X-Request-ID"] == "broken-1"
    missing = client.post("/v1/models/tire/versions/99:predict", json={"instances": [floats()]})
    assert missing.status_code == 404 and len(missing.headers["X-Request-ID"]) == 32


@pytest.mark.parametrize(
    "header",
    [b"x" * 129, "caf\u00e9".encode(), b"tab\there"],
    ids=["129 characters", "not ASCII", "a control character"],
)
def test_a_bad_request_id_is_a_400_naming_the_rule(client: TestClient, header: bytes) -> None:
    before = value(client, "tire_predictions_total")
    response = client.post(
        PREDICT, json={"instances": [floats()]}, headers=[(b"X-Request-ID", header)]
    )
    assert response.status_code == 400
    assert "at most 128 printable ASCII characters" in response.json()["error"]
    assert len(response.headers["X-Request-ID"]) == 32  # a fresh one: it could not echo
    assert value(client, "tire_predictions_total") == before


def test_two_request_ids_are_a_400(client: TestClient) -> None:
    headers = [(b"X-Request-ID", b"a"), (b"X-Request-ID", b"b")]
    response = client.post(PREDICT, json={"instances": [floats()]}, headers=headers)
    assert response.status_code == 400
    assert "one X-Request-ID" in response.json()["error"]


# --- the feedback route ---------------------------------------------------------------------


def test_feedback_is_counted_once_by_the_version_that_answered(
    client: TestClient, model: TireClassifier
) -> None:
    instances = [floats(seed=11), b64(png(seed=12)), floats(seed=13)]
    response = client.post(
        PREDICT, json={"instances": instances}, params={"labels": "true"},
        headers={"X-Request-ID": "batch-42"},
    )  # fmt: skip
    predicted = response.json()["labels"]
    truth = ["defective", None, "good"]
    labelled = [(t, p) for t, p in zip(truth, predicted, strict=True) if t is not None]
    correct = sum(t == p for t, p in labelled)
    counters = {
        (t, p): value(
            client, "tire_feedback_labels_total", version=VERSION, **{"class": t}, predicted_class=p
        )
        for t, p in labelled
    }
    hits = {
        t: value(client, "tire_feedback_correct_total", version=VERSION, **{"class": t})
        for t, _ in labelled
    }

    answer = client.post(FEEDBACK, json={"request_id": "batch-42", "labels": truth})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "request_id": "batch-42", "labelled": 2, "correct": correct, "model_version": VERSION,
    }  # fmt: skip
    for (t, p), before in counters.items():
        labels = {"class": t, "predicted_class": p}
        after = value(client, "tire_feedback_labels_total", version=VERSION, **labels)
        assert after == before + 1
    for t, before in hits.items():
        after = value(client, "tire_feedback_correct_total", version=VERSION, **{"class": t})
        assert after == before + sum(tt == t and pp == t for tt, pp in labelled)

    again = client.post(FEEDBACK, json={"request_id": "batch-42", "labels": truth})
    assert again.status_code == 409
    assert "given already" in again.json()["error"]


def test_feedback_twice_changes_no_counter(client: TestClient) -> None:
    request_id = predict(client, [floats()])
    assert client.post(FEEDBACK, json={"request_id": request_id, "labels": ["good"]}).is_success
    total = value(client, "tire_feedback_labels_total")
    repeated = client.post(FEEDBACK, json={"request_id": request_id, "labels": ["defective"]})
    assert repeated.status_code == 409
    assert value(client, "tire_feedback_labels_total") == total


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"request_id": "never-seen", "labels": ["good"]}, 404, "no prediction with request id"),
        ({"request_id": "{id}", "labels": ["good"]}, 400, "expected 2"),
        ({"request_id": "{id}", "labels": ["good", "flat"]}, 400, "['good', 'defective']"),
        ({"request_id": "{id}", "labels": "good"}, 400, "labels"),
        ({"request_id": "{id}", "labels": [1, "good"]}, 400, "labels.0"),
        ({"request_id": "{id}", "labels": []}, 400, "labels"),
        ({"request_id": 5, "labels": ["good", "good"]}, 400, "request_id"),
        ({"request_id": "caf\u00e9", "labels": ["good", "good"]}, 400, "printable ASCII"),
        ({"request_id": "{id}", "labels": ["good", "good"], "extra": 1}, 400, "extra"),
        ({"labels": ["good", "good"]}, 400, "request_id"),
    ],
    ids=[
        "unknown id", "wrong count", "unknown label", "labels not a list", "a label not text",
        "no labels", "id not text", "id not ASCII", "unknown field", "no id",
    ],
)  # fmt: skip
def test_bad_feedback_is_a_4xx_that_leaves_the_prediction_open(
    client: TestClient, body: dict[str, Any], status: int, message: str
) -> None:
    request_id = predict(client, [floats(), floats(seed=2)])
    if body.get("request_id") == "{id}":
        body = {**body, "request_id": request_id}
    response = client.post(FEEDBACK, json=body)
    assert response.status_code == status
    assert message in response.json()["error"]
    valid = client.post(FEEDBACK, json={"request_id": request_id, "labels": ["good", None]})
    assert valid.status_code == 200 and valid.json()["labelled"] == 1


def test_the_store_forgets_the_oldest_and_the_expired() -> None:
    now = [0.0]
    store = FeedbackStore(3, ttl_s=10.0, clock=lambda: now[0])
    for i in range(4):
        store.remember(f"r{i}", Prediction.of("1", ["good", "defective"], [i % 2]))
        now[0] += 1.0
    assert store.get("r0") is None  # the window holds three
    assert [store.get(f"r{i}") is not None for i in (1, 2, 3)] == [True, True, True]
    now[0] = 11.5  # r1 was remembered at 1.0 (10.5 s ago), r2 at 2.0, r3 at 3.0
    assert store.get("r1") is None and store.get("r2") is not None
    store.remember("r2", Prediction.of("2", ["good", "defective"], [1, 1]))  # the id reused
    again = store.get("r2")
    assert again is not None and again.version == "2" and len(again.predicted) == 2
    now[0] = 20.0
    assert store.get("r3") is None and store.get("r2") is not None and len(store) == 1


# --- baseline gauges and input statistics ---------------------------------------------------


def _baseline(defective_share: float) -> Baseline:
    return Baseline(
        classes=["good", "defective"],
        images=10,
        class_share={"good": 1 - defective_share, "defective": defective_share},
        label_share={"good": 0.5, "defective": 0.5},
        confidence_mean=0.87,
        test_accuracy=0.9,
        confidence_counts=[0] * (len(CONFIDENCE_BUCKETS) + 1),
        brightness_counts=[0] * (len(BRIGHTNESS_BUCKETS) + 1),
        contrast_counts=[0] * (len(CONTRAST_BUCKETS) + 1),
    )


class Versions:
    """A registry stand-in whose wanted version the test moves; each version's baseline is set."""

    def __init__(self, baselines: dict[str, Any]) -> None:
        self.baselines = baselines
        self.version = "1"
        uri, watches, alias = "models:/fake@production", True, "production"
        self.uri, self.watches, self.alias = uri, watches, alias

    def resolve(self) -> str:
        return self.version

    def version_uri(self, version: str) -> str:
        return f"models:/fake/{version}"

    def load(self, version: str) -> TireClassifier:
        model = classifier()
        if self.baselines[version] is not None:
            model.baseline = self.baselines[version]  # type: ignore[attr-defined]
        return model


def gauges(metrics: ServeMetrics) -> dict[str, float]:
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name.startswith("tire_model_baseline"):
                found[s.name + s.labels.get("class", "")] = s.value
    return found


def test_baseline_gauges_follow_the_served_model() -> None:
    source = Versions(
        {"1": _baseline(0.3), "2": None, "3": _baseline(0.6).model_dump(), "4": {"bad": 1}}
    )
    metrics = ServeMetrics()
    holder = ModelHolder(source, metrics=metrics, optimize=False)  # type: ignore[arg-type]
    assert gauges(metrics) == {}
    assert holder.poll_once()
    assert gauges(metrics) == pytest.approx(
        {
            "tire_model_baseline_class_sharegood": 0.7,
            "tire_model_baseline_class_sharedefective": 0.3,
            "tire_model_baseline_confidence_mean": 0.87,
        }
    )
    source.version = "2"  # a model logged before baselines: the gauges go
    assert holder.poll_once() and gauges(metrics) == {}
    source.version = "3"  # a baseline given as plain data
    assert holder.poll_once()
    assert gauges(metrics)["tire_model_baseline_class_sharedefective"] == pytest.approx(0.6)
    source.version = "4"  # an unreadable one is served without a baseline
    assert holder.poll_once() and gauges(metrics) == {}


COUNTERS = {"tire_predictions_total", "tire_feedback_labels_total", "tire_feedback_correct_total"}


def test_each_loaded_version_s_counters_start_at_zero() -> None:
    """increase() counts from a series' first sample: the first label of a class must count."""
    metrics = ServeMetrics()
    source = Versions({"1": None, "2": None})
    holder = ModelHolder(source, metrics=metrics, optimize=False)  # type: ignore[arg-type]

    def series() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = metrics.render().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name in COUNTERS
        }

    assert series() == {}
    for version in ("1", "2"):
        source.version = version
        assert holder.poll_once()
        found = series()
        for true in ("good", "defective"):
            assert found[("tire_predictions_total", (("class", true),))] == 0
            assert (
                found[("tire_feedback_correct_total", (("class", true), ("version", version)))] == 0
            )
            for predicted in ("good", "defective"):
                labels = (("class", true), ("predicted_class", predicted), ("version", version))
                assert found[("tire_feedback_labels_total", labels)] == 0
    assert len(series()) == 2 + 2 * (2 + 4)  # both versions' series stay: counters only grow


def test_input_statistics_are_those_of_the_resized_pixels_before_normalisation(
    model: TireClassifier,
) -> None:
    prep = model.prep
    rng = np.random.default_rng(3)
    images = [rng.random((40, 50, 3)).astype(np.float32) * s for s in (0.2, 0.6, 1.0)]
    batch = prep.batch([prep.from_array(image) for image in images])
    brightness, contrast = input_statistics(prep, batch)
    resized = functional.interpolate(
        torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2),
        size=(prep.image_size, prep.image_size), mode="bilinear", antialias=True,
        align_corners=False,
    )  # fmt: skip
    want_b, want_c = image_statistics(resized.numpy())
    assert np.allclose(brightness, want_b, atol=1e-5)
    assert np.allclose(contrast, want_c, atol=1e-5)
    assert brightness[0] < brightness[1] < brightness[2]


def bucket_counts(client: TestClient, name: str) -> dict[float, float]:
    return {float(s.labels["le"]): s.value for s in samples(client) if s.name == f"{name}_bucket"}


def test_live_traffic_fills_the_drift_histograms(client: TestClient) -> None:
    gray = np.full((24, 24, 3), 0.25).tolist()  # brightness 0.25, contrast 0
    before_b = bucket_counts(client, "tire_input_brightness")
    before_c = bucket_counts(client, "tire_input_contrast")
    predict(client, [gray, gray])
    after_b = bucket_counts(client, "tire_input_brightness")
    after_c = bucket_counts(client, "tire_input_contrast")
    assert [e for e in after_b if e != float("inf")] == list(BRIGHTNESS_BUCKETS)
    assert [e for e in after_c if e != float("inf")] == list(CONTRAST_BUCKETS)
    gained_b = {e: after_b[e] - before_b.get(e, 0) for e in after_b}
    assert gained_b[0.2] == 0 and gained_b[0.3] == 2  # cumulative: in (0.2, 0.3]
    assert after_c[0.02] - before_c.get(0.02, 0) == 2
    confidence = bucket_counts(client, "tire_prediction_confidence")
    assert [e for e in confidence if e != float("inf")] == list(CONFIDENCE_BUCKETS)


# --- the sink's queue and its keys ------------------------------------------------------------


def test_the_sink_drops_and_counts_rather_than_wait() -> None:
    metrics = ServeMetrics()
    settings = load_settings(s3_endpoint_url="http://127.0.0.1:9")  # never called: not started
    store = ObjectStore(s3_client(settings), "tire-data")
    sink = Sink(store, metrics, flush_s=60, queue_items=2, queue_bytes=1000)
    image = png()  # a few kilobytes: over the byte bound alone
    assert not sink.capture([("captures/d/a-0.png", image)])
    assert sink.capture([("captures/d/a-0.png", b"x" * 600)])
    assert not sink.capture([("captures/d/b-0.png", b"x" * 600)])  # 1,200 bytes would wait
    assert sink.feedback([{"time": "2026-01-01T00:00:00+00:00"}])
    assert not sink.feedback([{"time": "2026-01-01T00:00:00+00:00"}] * 3)  # two jobs queued

    def dropped(kind: str) -> float:
        return sum(
            s.value
            for f in text_string_to_metric_families(metrics.render().decode())
            for s in f.samples
            if s.name == "tire_capture_dropped_total"
            and s.labels == {"kind": kind, "reason": "queue_full"}
        )

    assert dropped("capture") == 2 and dropped("feedback") == 3


def test_capture_keys_survive_any_request_id_and_float_images_become_png() -> None:
    key = capture_object_key("2026-11-30", "a/b c%", 3, "jpg")
    assert key == "captures/2026-11-30/a%2Fb%20c%25-3.jpg"
    parsed = parse_capture_name(key.rpartition("/")[2])
    assert parsed is not None and (unquote(parsed[0]), parsed[1]) == ("a/b c%", 3)
    hex_id = "0123456789abcdef0123456789abcdef"
    assert capture_object_key("2026-11-30", hex_id, 0, "png").endswith(f"/{hex_id}-0.png")

    pixels = np.random.default_rng(0).random((5, 7, 3))
    with Image.open(io.BytesIO(float_png(pixels.tolist()))) as image:
        assert image.format == "PNG" and image.size == (7, 5)
        assert np.abs(np.asarray(image) / 255.0 - pixels).max() <= 0.5 / 255 + 1e-9
    with Image.open(io.BytesIO(float_png(np.full((4, 4, 1), 0.5)))) as image:
        assert image.mode == "L"


def test_without_s3_settings_the_sink_is_off_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    config = load_serve_config(capture_rate=0.5)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("AWS_ACCESS_KEY_ID", raising=False)
        plain = load_settings()
    with caplog.at_level("INFO", logger="tirelib.serve.sink"):
        assert start_sink(config, plain, ServeMetrics()) is None
    assert "not written to S3" in caplog.text and "capture_rate is ignored" in caplog.text

    named = load_settings(s3_endpoint_url="http://127.0.0.1:9", data_bucket="tire-data-x")
    sink = start_sink(config, named, ServeMetrics())
    assert sink is not None and sink.where == "s3://tire-data-x/"
    sink.close(timeout=10)  # nothing queued: nothing to write, the writer ends
    assert not sink.capture([("captures/d/a-0.png", b"x")])  # closed: refused, counted

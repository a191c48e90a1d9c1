"""The server's HTTP API over a tiny in-memory model (FastAPI's TestClient, no sockets).

TF Serving's shapes (status, metadata, predict in row and columnar form, classify), the upload
endpoint, the Open Inference Protocol, health and metrics; every bad input is a 4xx with
``{"error": ...}`` saying what was wrong; predictions equal the model's own.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from tirelib.cli import app as cli
from tirelib.models import IMAGENET_MEAN, IMAGENET_STD, get_model
from tirelib.preprocessing import Preprocessing
from tirelib.pyfunc import TireClassifier
from tirelib.serve import create_app, load_serve_config
from tirelib.serve.model import ModelLoadError, StaticSource
from tirelib.settings import load_settings

pytestmark = pytest.mark.unit

SIZE = 32
MAX_BODY = 2**20


def classifier(seed: int = 0) -> TireClassifier:
    torch.manual_seed(seed)
    model = TireClassifier()
    model.classes = ["good", "defective"]
    model.model_type = "cnn"
    model.prep = Preprocessing(SIZE, IMAGENET_MEAN, IMAGENET_STD)
    model.network = get_model("cnn", num_classes=2).eval()
    return model


def png(height: int = 40, width: int = 50, seed: int = 0, kind: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=kind)
    return buffer.getvalue()


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


def floats(height: int = 20, width: int = 30, seed: int = 1) -> list[Any]:
    return np.random.default_rng(seed).random((height, width, 3)).round(4).tolist()


@pytest.fixture(scope="module")
def model() -> TireClassifier:
    return classifier()


@pytest.fixture(scope="module")
def client(model: TireClassifier) -> Iterator[TestClient]:
    config = load_serve_config(
        max_instances=128, max_image_side=1000, max_body_bytes=MAX_BODY, max_wait_ms=1
    )
    app = create_app(config, load_settings(), source=StaticSource(model, version="7"))
    with TestClient(app) as test_client:
        yield test_client


def expected(model: TireClassifier, images: list[torch.Tensor]) -> np.ndarray:
    return model.predict_proba(model.prep.batch(images))


# --- TF Serving's shapes -------------------------------------------------------------------


def test_status_lists_the_available_version(client: TestClient) -> None:
    answer = {
        "model_version_status": [
            {
                "version": "7",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    assert client.get("/v1/models/tire").json() == answer
    assert client.get("/v1/models/tire/versions/7").json() == answer
    missing = client.get("/v1/models/tire/versions/8")
    assert missing.status_code == 404
    assert "Specific(tire, 8)" in missing.json()["error"]


def test_metadata_gives_the_signature_classes_and_input_size(client: TestClient) -> None:
    for path in ("/v1/models/tire/metadata", "/v1/models/tire/versions/7/metadata"):
        body = client.get(path).json()
        assert body["model_spec"] == {"name": "tire", "signature_name": "", "version": "7"}
        signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
        assert set(signature["inputs"]) == {"images", "image_bytes"}
        assert signature["outputs"]["probabilities"]["dtype"] == "DT_FLOAT"
        tire = body["metadata"]["tire"]
        assert tire["classes"] == ["good", "defective"]
        assert tire["input_size"] == [SIZE, SIZE]
        assert tire["model_type"] == "cnn"


def test_row_form_answers_predictions_equal_to_the_models_own(
    client: TestClient, model: TireClassifier
) -> None:
    image, encoded = floats(), png()
    response = client.post(
        "/v1/models/tire:predict", json={"instances": [image, b64(encoded), {"images": image}]}
    )
    assert response.status_code == 200
    predictions = np.array(response.json()["predictions"])
    tensors = [model.prep.from_array(image), model.prep.from_bytes(encoded)]
    want = expected(model, tensors)
    assert np.allclose(predictions[:2], want, atol=1e-5)
    assert np.allclose(predictions[2], want[0], atol=1e-5)
    assert np.allclose(predictions.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "inputs",
    [
        [floats(), floats(seed=2)],
        {"images": [floats(), floats(seed=2)]},
    ],
)
def test_columnar_form_answers_outputs(
    client: TestClient, model: TireClassifier, inputs: Any
) -> None:
    response = client.post("/v1/models/tire:predict", json={"inputs": inputs})
    assert response.status_code == 200
    want = expected(model, [model.prep.from_array(floats()), model.prep.from_array(floats(seed=2))])
    assert np.allclose(response.json()["outputs"], want, atol=1e-5)
    assert set(response.json()) == {"outputs"}


def test_columnar_form_takes_a_single_encoded_image(client: TestClient) -> None:
    response = client.post("/v1/models/tire:predict", json={"inputs": {"image_bytes": b64(png())}})
    assert response.status_code == 200
    assert len(response.json()["outputs"]) == 1


def test_labels_option_adds_class_names(client: TestClient) -> None:
    body = {"signature_name": "serving_default", "instances": [b64(png()), b64(png(seed=3))]}
    answer = client.post("/v1/models/tire:predict?labels=true", json=body).json()
    assert answer["classes"] == ["good", "defective"]
    assert answer["labels"] == [
        answer["classes"][int(np.argmax(row))] for row in answer["predictions"]
    ]


def test_version_and_label_select_the_served_version(client: TestClient) -> None:
    body = {"instances": [b64(png())]}
    assert client.post("/v1/models/tire/versions/7:predict", json=body).status_code == 200
    unknown = client.post("/v1/models/tire/versions/6:predict", json=body)
    assert unknown.status_code == 404
    assert "serves version 7" in unknown.json()["error"]
    label = client.post("/v1/models/tire/labels/production:predict", json=body)
    assert label.status_code == 404
    assert "no version labels" in label.json()["error"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"content-type": "application/x-www-form-urlencoded"}, {"content-type": "text/plain"}],
)
def test_any_content_type_is_read_as_json_as_tf_serving_does(
    client: TestClient, headers: dict[str, str]
) -> None:
    raw = json.dumps({"instances": [b64(png())]}).encode()
    response = client.post("/v1/models/tire:predict", content=raw, headers=headers)
    assert response.status_code == 200, response.text


def test_a_hundred_instances_in_one_request(client: TestClient, model: TireClassifier) -> None:
    images = [png(seed=i) for i in range(100)]
    response = client.post("/v1/models/tire:predict", json={"instances": [b64(i) for i in images]})
    assert response.status_code == 200
    predictions = np.array(response.json()["predictions"])
    assert predictions.shape == (100, 2)
    assert np.allclose(
        predictions, expected(model, [model.prep.from_bytes(i) for i in images]), atol=1e-5
    )


def test_classify_answers_class_score_pairs(client: TestClient, model: TireClassifier) -> None:
    body = {"examples": [{"image": b64(png())}, {"image": floats()}], "context": {"id": 1}}
    response = client.post("/v1/models/tire:classify", json=body)
    assert response.status_code == 200
    results = response.json()["results"]
    want = expected(model, [model.prep.from_bytes(png()), model.prep.from_array(floats())])
    for result, row in zip(results, want, strict=True):
        assert [name for name, _ in result] == ["good", "defective"]
        assert np.allclose([score for _, score in result], row, atol=1e-5)
    version = client.post("/v1/models/tire/versions/7:classify", json=body)
    assert version.status_code == 200


def test_upload_takes_image_files(client: TestClient) -> None:
    files = [
        ("file", ("a.png", png(), "image/png")),
        ("file", ("b.jpg", png(kind="JPEG"), "image/jpeg")),
    ]
    response = client.post("/v1/models/tire:upload", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "7"
    assert [r["filename"] for r in body["results"]] == ["a.png", "b.jpg"]
    for result in body["results"]:
        assert result["label"] in ("good", "defective")
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    bad = client.post(
        "/v1/models/tire:upload", files=[("file", ("notes.txt", b"hello", "text/plain"))]
    )
    assert bad.status_code == 400
    assert "file 'notes.txt': not an image" in bad.json()["error"]
    assert client.post("/v1/models/tire:upload").status_code == 400


# --- the Open Inference Protocol -----------------------------------------------------------


def test_v2_health_and_metadata(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/tire/ready").json() == {"name": "tire", "ready": True}
    metadata = client.get("/v2/models/tire").json()
    assert metadata["versions"] == ["7"]
    assert {i["name"]: i["datatype"] for i in metadata["inputs"]} == {
        "images": "FP32",
        "image_bytes": "BYTES",
    }
    assert client.get("/v2/models/tire/versions/7").status_code == 200
    assert client.get("/v2/models/tire/versions/9").status_code == 404
    assert client.get("/v2").json()["name"] == "tirelib"


def test_v2_infer_with_fp32_and_bytes(client: TestClient, model: TireClassifier) -> None:
    batch = np.stack([np.array(floats()), np.array(floats(seed=2))]).astype(np.float32)
    body = {
        "id": "request-1",
        "inputs": [
            {
                "name": "images",
                "shape": list(batch.shape),
                "datatype": "FP32",
                "data": batch.ravel().tolist(),
            }
        ],
    }
    answer = client.post("/v2/models/tire/infer", json=body).json()
    assert answer["model_name"] == "tire" and answer["model_version"] == "7"
    assert answer["id"] == "request-1"
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["probabilities"]["shape"] == [2, 2]
    want = expected(model, [model.prep.from_array(image) for image in batch])
    assert np.allclose(np.reshape(outputs["probabilities"]["data"], (2, 2)), want, atol=1e-5)
    assert outputs["label"]["data"] == [model.classes[i] for i in want.argmax(axis=1)]

    encoded = base64.b64encode(png()).decode()
    body = {
        "inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [encoded]}],
        "outputs": [{"name": "probabilities"}],
    }
    answer = client.post("/v2/models/tire/versions/7/infer", json=body).json()
    assert [o["name"] for o in answer["outputs"]] == ["probabilities"]
    assert np.allclose(
        answer["outputs"][0]["data"], expected(model, [model.prep.from_bytes(png())])[0], atol=1e-5
    )


# --- bad input: always a 4xx with a message that says what was wrong -----------------------

NAN_BODY = b'{"instances": [[[[NaN, 0.1, 0.2]]]]}'
BAD_REQUESTS: list[tuple[str, str, Any, int, str]] = [
    ("malformed JSON", "/v1/models/tire:predict", b'{"instances": [', 400, "malformed JSON"),
    ("not an object", "/v1/models/tire:predict", b"[1, 2]", 400, "must be a JSON object"),
    ("empty body", "/v1/models/tire:predict", b"", 400, "body is empty"),
    ("no form", "/v1/models/tire:predict", {"signature_name": ""}, 400, "exactly one of"),
    (
        "both forms",
        "/v1/models/tire:predict",
        {"instances": [], "inputs": []},
        400,
        "exactly one of",
    ),
    ("typo", "/v1/models/tire:predict", {"instance": []}, 400, "instance: Extra inputs"),
    ("empty batch", "/v1/models/tire:predict", {"instances": []}, 400, "no images given"),
    ("empty columnar", "/v1/models/tire:predict", {"inputs": []}, 400, "no images given"),
    (
        "wrong shape",
        "/v1/models/tire:predict",
        {"instances": [[0.1, 0.2]]},
        400,
        "instances[0]: an image must have shape [height, width, 3]",
    ),
    (
        "two channels",
        "/v1/models/tire:predict",
        {"instances": [[[[0.1, 0.2]]]]},
        400,
        "got [1, 1, 2]",
    ),
    (
        "a batch as one instance",
        "/v1/models/tire:predict",
        {"instances": [[[[[0.1, 0.2, 0.3]]]]]},
        400,
        "list each image as its own instance",
    ),
    (
        "ragged",
        "/v1/models/tire:predict",
        {"instances": [[[[0.1, 0.2, 0.3]], [[0.1]]]]},
        400,
        "ragged or non-numeric",
    ),
    (
        "strings",
        "/v1/models/tire:predict",
        {"instances": [[[["a", "b", "c"]]]]},
        400,
        "instances[0]: pixel values must be numbers in [0, 1], got a string at [0][0][0]",
    ),
    ("a number", "/v1/models/tire:predict", {"instances": [3]}, 400, "instances[0]: got int"),
    (
        "out of range",
        "/v1/models/tire:predict",
        {"instances": [[[[0.1, 2.0, 255.0]]]]},
        400,
        "must lie in [0, 1]",
    ),
    ("NaN", "/v1/models/tire:predict", NAN_BODY, 400, "NaN"),
    (
        "not base64",
        "/v1/models/tire:predict",
        {"instances": [{"b64": "%%%"}]},
        400,
        "not valid base64",
    ),
    (
        "b64 not text",
        "/v1/models/tire:predict",
        {"instances": [{"b64": 12}]},
        400,
        "must be base64 text",
    ),
    (
        "not an image",
        "/v1/models/tire:predict",
        {"instances": [b64(b"plain text, no image")]},
        400,
        "instances[0]: not an image",
    ),
    ("empty image", "/v1/models/tire:predict", {"instances": [{"b64": ""}]}, 400, "empty image"),
    (
        "truncated image",
        "/v1/models/tire:predict",
        {"instances": [b64(png()[:60])]},
        400,
        "instances[0]",
    ),
    (
        "unknown name",
        "/v1/models/tire:predict",
        {"instances": [{"pixels": [[[0, 0, 0]]]}]},
        400,
        "unexpected keys ['pixels']",
    ),
    (
        "unknown input",
        "/v1/models/tire:predict",
        {"inputs": {"pixels": []}},
        400,
        "got the keys ['pixels']",
    ),
    (
        "too many",
        "/v1/models/tire:predict",
        {"instances": [{"b64": "AA=="}] * 129},
        400,
        "at most 128",
    ),
    (
        "too large",
        "/v1/models/tire:predict",
        {"instances": [b64(png(1001, 8))]},
        400,
        "at most 1000 pixels on a side",
    ),
    (
        "too wide",
        "/v1/models/tire:predict",
        {"instances": [[[[0.0, 0.0, 0.0]] * 1001]]},
        400,
        "too large",
    ),
    (
        "signature",
        "/v1/models/tire:predict",
        {"signature_name": "predict_images", "instances": [floats()]},
        400,
        "unknown signature_name",
    ),
    (
        "labels value",
        "/v1/models/tire:predict?labels=maybe",
        {"instances": [floats()]},
        400,
        "labels",
    ),
    (
        "unknown version",
        "/v1/models/tire/versions/99:predict",
        {"instances": [floats()]},
        404,
        "Specific(tire, 99)",
    ),
    ("no examples", "/v1/models/tire:classify", {"examples": []}, 400, "no images given"),
    (
        "example without image",
        "/v1/models/tire:classify",
        {"examples": [{"id": 1}]},
        400,
        "exactly one image feature",
    ),
    ("v2 no inputs", "/v2/models/tire/infer", {"inputs": []}, 400, "inputs"),
    (
        "v2 datatype",
        "/v2/models/tire/infer",
        {"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1]}]},
        400,
        "datatype: Input should be 'FP32'",
    ),
    (
        "v2 shape",
        "/v2/models/tire/infer",
        {
            "inputs": [
                {"name": "images", "shape": [1, 2, 2, 3], "datatype": "FP32", "data": [0.5] * 5}
            ]
        },
        400,
        "needs 12 values, the data holds 5",
    ),
    (
        "v2 rank",
        "/v2/models/tire/infer",
        {
            "inputs": [
                {"name": "images", "shape": [2, 2, 3], "datatype": "FP32", "data": [0.5] * 12}
            ]
        },
        400,
        "must have shape [N, H, W, 3]",
    ),
    (
        "v2 negative",
        "/v2/models/tire/infer",
        {"inputs": [{"name": "images", "shape": [1, -2, 2, 3], "datatype": "FP32", "data": [0.5]}]},
        400,
        "greater than or equal to 0",
    ),
    (
        "v2 bytes count",
        "/v2/models/tire/infer",
        {"inputs": [{"name": "image_bytes", "shape": [2], "datatype": "BYTES", "data": ["AA=="]}]},
        400,
        "needs a list of 2 items",
    ),
    (
        "v2 output",
        "/v2/models/tire/infer",
        {
            "inputs": [
                {"name": "images", "shape": [1, 1, 1, 3], "datatype": "FP32", "data": [0.5] * 3}
            ],
            "outputs": [{"name": "logits"}],
        },
        400,
        "unknown outputs ['logits']",
    ),
    (
        "v2 unknown version",
        "/v2/models/tire/versions/3/infer",
        {"inputs": []},
        404,
        "Specific(tire, 3)",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_input_is_a_4xx_that_says_what_was_wrong(
    client: TestClient, path: str, body: Any, status: int, message: str
) -> None:
    if isinstance(body, bytes):
        response = client.post(path, content=body)
    else:
        response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}
    assert message in response.json()["error"]


def test_a_body_over_the_limit_is_refused_with_413(client: TestClient) -> None:
    big = json.dumps({"instances": [{"b64": "A" * MAX_BODY}]}).encode()
    response = client.post("/v1/models/tire:predict", content=big)
    assert response.status_code == 413
    assert f"larger than {MAX_BODY} bytes" in response.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it is read
        for _ in range(3):
            yield b" " * (MAX_BODY // 2)

    response = client.post("/v1/models/tire:predict", content=chunks())
    assert response.status_code == 413


def test_unknown_paths_and_methods_answer_in_the_same_shape(client: TestClient) -> None:
    response = client.get("/v1/no/such/path")
    assert response.status_code == 404
    assert "no such endpoint" in response.json()["error"]
    # The model name is one path segment without ':', so the verb is never read as a name.
    for path in ["/v1/models/tire:predict", "/v1/models/tire/versions/7:predict"]:
        response = client.get(path)
        assert response.status_code == 405, path
        assert set(response.json()) == {"error"}


@pytest.mark.parametrize(
    ("method", "path", "message"),
    [
        ("GET", "/v1/models/other", "Could not find any versions of model other"),
        ("GET", "/v1/models/other/versions/7", "Could not find any versions of model other"),
        ("GET", "/v1/models/other/metadata", "Servable not found for request: Latest(other)"),
        ("POST", "/v1/models/other:predict", "Servable not found for request: Latest(other)"),
        (
            "POST",
            "/v1/models/other/versions/7:predict",
            "Servable not found for request: Specific(other, 7)",
        ),
        (
            "POST",
            "/v1/models/other/labels/production:predict",
            "Servable not found for request: Label(other, production)",
        ),
        ("POST", "/v1/models/other:classify", "Servable not found for request: Latest(other)"),
        ("POST", "/v1/models/other:feedback", "Could not find any versions of model other"),
        ("GET", "/v2/models/other", "Request for unknown model: 'other' is not found"),
        ("GET", "/v2/models/other/ready", "Request for unknown model: 'other' is not found"),
        ("POST", "/v2/models/other/infer", "Request for unknown model: 'other' is not found"),
        (
            "POST",
            "/v2/models/other/versions/7/infer",
            "Request for unknown model: 'other' is not found",
        ),
    ],
)
def test_a_model_name_not_served_is_a_404_in_the_apis_own_words(
    client: TestClient, method: str, path: str, message: str
) -> None:
    """TF Serving's words on /v1, Triton's on /v2; decided before the body is read."""
    response = client.request(method, path, content=b"{not even JSON")
    assert response.status_code == 404, response.text
    assert response.json() == {"error": message}


# --- health, metrics, OpenAPI --------------------------------------------------------------


def samples(client: TestClient) -> list[Any]:
    text = client.get("/metrics").text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def test_health_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "model_version": "7"}
    client.post("/v1/models/tire/versions/12345:predict", json={"instances": [floats()]})
    client.post("/v1/models/tire:predict", json={"instances": [floats(), floats(seed=5)]})
    found = samples(client)
    endpoints = {s.labels["endpoint"] for s in found if s.name == "tire_http_requests_total"}
    # The route's template, not the path: neither 12345 nor a name sent by a client
    assert "/v1/models/{model_name}/versions/{version}:predict" in endpoints
    assert not any("12345" in e for e in endpoints)
    predict = "/v1/models/{model_name}:predict"
    requests = [
        s for s in found
        if s.name == "tire_http_requests_total"
        and s.labels == {"endpoint": predict, "method": "POST", "status": "200"}
    ]  # fmt: skip
    assert requests and requests[0].value >= 1
    names = {s.name for s in found}
    for name in [
        "tire_http_request_duration_seconds_bucket",
        "tire_inference_batch_size_bucket",
        "tire_inference_duration_seconds_bucket",
        "tire_predictions_total",
        "tire_prediction_confidence_bucket",
        "tire_model_info",
        "tire_model_reloads_total",
    ]:
        assert name in names, name
    info = [s for s in found if s.name == "tire_model_info"]
    assert info[0].labels == {"version": "7", "model_type": "cnn", "name": "tire"}


def test_the_openapi_schema_documents_bodies_and_errors(client: TestClient) -> None:
    """FastAPI's own schema, unpatched: the bodies the routes read themselves are declared on
    them, every error has the {"error": ...} shape, and no 422 is promised (bad input is 400)."""
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    predict = paths["/v1/models/{model_name}:predict"]["post"]
    body = predict["requestBody"]["content"]["application/json"]["schema"]
    assert body["title"] == "PredictRequest"
    assert {"instances", "inputs", "signature_name"} <= set(body["properties"])
    name = [p for p in predict["parameters"] if p["name"] == "model_name"]
    assert name and name[0]["in"] == "path" and name[0]["required"]
    infer = paths["/v2/models/{model_name}/versions/{version}/infer"]["post"]
    tensor = infer["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert tensor["inputs"]["items"]["properties"]["datatype"]["enum"] == [
        "FP32", "FP16", "FP64", "BYTES", "UINT8",
    ]  # fmt: skip
    assert "$ref" not in json.dumps(infer["requestBody"])  # nested models written in place
    feedback = paths["/v1/models/{model_name}:feedback"]["post"]
    assert feedback["requestBody"]["content"]["application/json"]["schema"]["title"] == (
        "FeedbackRequest"
    )
    error = {"$ref": "#/components/schemas/ErrorBody"}
    for path, operations in paths.items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            for status, answer in responses.items():
                if status[0] == "4":
                    assert answer["content"]["application/json"]["schema"] == error
    assert not {"HTTPValidationError", "ValidationError"} & set(schema["components"]["schemas"])


# --- a server without a model ----------------------------------------------------------------


class NoModel:
    uri = "models:/nothing@production"
    watches = True
    alias = "production"

    def resolve(self) -> str:
        return "1"

    def version_uri(self, version: str) -> str:
        return f"models:/nothing/{version}"

    def load(self, version: str) -> TireClassifier:
        raise ModelLoadError("the weights file is corrupt")


def test_without_a_model_the_server_is_live_but_not_ready() -> None:
    config = load_serve_config(poll_interval_s=60, startup_timeout_s=30)
    with TestClient(create_app(config, load_settings(), source=NoModel())) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "the weights file is corrupt" in ready.json()["error"]
        assert client.get("/v2/health/ready").status_code == 503
        status = client.get("/v1/models/tire").json()["model_version_status"]
        assert status[0]["state"] == "UNAVAILABLE"
        assert status[0]["status"]["error_code"] == "UNKNOWN"
        predict = client.post("/v1/models/tire:predict", json={"instances": [floats()]})
        assert predict.status_code == 503
        assert "not loaded yet" in predict.json()["error"]


# --- the command line --------------------------------------------------------------------------


def test_serve_and_evaluate_commands_check_their_options() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    assert "--model-uri" in result.output and "--max-batch-size" in result.output
    result = runner.invoke(cli, ["evaluate", "--served", "http://127.0.0.1:9"])
    assert "--served needs --dataset-version" in str(result.exception)
    result = runner.invoke(cli, ["evaluate"])
    assert "give --run-id" in str(result.exception)

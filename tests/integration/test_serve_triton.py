"""NVIDIA's ``tritonclient.http`` against ``tirelib serve``, with the client's defaults.

One real server for the module (a small model folder, :mod:`tests.integration.model_server`).
The client sends inputs as binary tensor data and asks for binary outputs unless told otherwise;
every form (FP32, UINT8 and BYTES inputs, binary or JSON, outputs binary or JSON) answers the
probabilities TF Serving's route gives for the same images, and a bad request reaches the client
as an ``InferenceServerException`` carrying the server's 400 and message.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.integration.model_server import running_server, save_model_folder

pytestmark = pytest.mark.integration

MODEL = "tire"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("triton")
    model = save_model_folder(root / "model")
    args = ["--model-uri", str(model), "--max-wait-ms", "2"]
    with running_server(root / "process", args) as process:
        yield process.url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[httpclient.InferenceServerClient]:
    triton = httpclient.InferenceServerClient(urlsplit(server).netloc, network_timeout=60)
    yield triton
    triton.close()


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """Three 8-bit RGB images of 40 x 36 pixels (resized by the server to the model's 32)."""
    return np.random.default_rng(11).integers(0, 256, (3, 40, 36, 3), dtype=np.uint8)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tf_serving(server: str, pixels: np.ndarray) -> np.ndarray:
    """The TF Serving route's probabilities for the images as PNG files."""
    instances = [{"b64": base64.b64encode(png(image)).decode()} for image in pixels]
    answer = httpx.post(f"{server}/v1/models/{MODEL}:predict", json={"instances": instances})
    assert answer.status_code == 200, answer.text
    return np.asarray(answer.json()["predictions"], dtype=np.float32)


def test_the_client_sees_a_live_ready_model(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    metadata = client.get_model_metadata(MODEL)
    assert metadata["versions"] == ["1"]
    assert {o["name"] for o in metadata["outputs"]} == {"probabilities", "label"}


def test_binary_inputs_and_outputs_by_default(
    client: httpclient.InferenceServerClient, pixels: np.ndarray, tf_serving: np.ndarray
) -> None:
    labels = [b"good", b"defective"]
    want_labels = [labels[i] for i in tf_serving.argmax(axis=1)]

    # FP32 in [0, 1], the client's defaults: binary input, every output binary.
    images = httpclient.InferInput("images", list(pixels.shape), "FP32")
    images.set_data_from_numpy(pixels.astype(np.float32) / 255.0)
    result = client.infer(MODEL, [images], request_id="fp32-binary")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (3, 2)
    assert np.allclose(probabilities, tf_serving, atol=TOLERANCE)
    assert list(result.as_numpy("label")) == want_labels
    assert result.get_response()["id"] == "fp32-binary"
    assert result.get_output("probabilities")["parameters"]["binary_data_size"] == 24

    # 8-bit pixels as UINT8, one output requested (binary, the default), a pinned version.
    images = httpclient.InferInput("images", list(pixels.shape), "UINT8")
    images.set_data_from_numpy(pixels)
    wanted = [httpclient.InferRequestedOutput("probabilities")]
    result = client.infer(MODEL, [images], model_version="1", outputs=wanted)
    assert np.allclose(result.as_numpy("probabilities"), tf_serving, atol=TOLERANCE)
    assert result.as_numpy("label") is None

    # The PNG files themselves as a binary BYTES tensor.
    encoded = np.array([png(image) for image in pixels], dtype=np.object_)
    files = httpclient.InferInput("image_bytes", [3], "BYTES")
    files.set_data_from_numpy(encoded)
    result = client.infer(MODEL, [files])
    assert np.allclose(result.as_numpy("probabilities"), tf_serving, atol=TOLERANCE)
    assert list(result.as_numpy("label")) == want_labels


def test_json_inputs_and_outputs(
    client: httpclient.InferenceServerClient, pixels: np.ndarray, tf_serving: np.ndarray
) -> None:
    floats = httpclient.InferInput("images", list(pixels.shape), "FP32")
    floats.set_data_from_numpy(pixels.astype(np.float32) / 255.0, binary_data=False)
    wanted = [
        httpclient.InferRequestedOutput("probabilities", binary_data=False),
        httpclient.InferRequestedOutput("label", binary_data=False),
    ]
    result = client.infer(MODEL, [floats], outputs=wanted)
    output = result.get_output("probabilities")
    assert "data" in output and "parameters" not in output
    assert np.allclose(result.as_numpy("probabilities"), tf_serving, atol=TOLERANCE)

    # JSON UINT8 in, one output binary and one JSON out.
    eight_bit = httpclient.InferInput("images", list(pixels.shape), "UINT8")
    eight_bit.set_data_from_numpy(pixels, binary_data=False)
    wanted = [
        httpclient.InferRequestedOutput("probabilities"),
        httpclient.InferRequestedOutput("label", binary_data=False),
    ]
    result = client.infer(MODEL, [eight_bit], outputs=wanted)
    assert np.allclose(result.as_numpy("probabilities"), tf_serving, atol=TOLERANCE)
    assert result.get_output("label")["data"] == [
        ["good", "defective"][i] for i in tf_serving.argmax(axis=1)
    ]


def test_a_bad_request_reaches_the_client_as_the_servers_400(
    client: httpclient.InferenceServerClient, pixels: np.ndarray
) -> None:
    images = httpclient.InferInput("images", list(pixels.shape), "FP32")
    images.set_data_from_numpy(pixels.astype(np.float32) / 255.0)
    images.set_shape([3, 40, 40, 3])  # the data holds 3 x 40 x 36 x 3 values
    with pytest.raises(InferenceServerException) as raised:
        client.infer(MODEL, [images])
    assert raised.value.status() == "400"
    assert "needs 57,600 bytes" in raised.value.message()

    with pytest.raises(InferenceServerException) as raised:
        client.infer(MODEL, [images], outputs=[httpclient.InferRequestedOutput("logits")])
    assert raised.value.status() == "400"
    assert "unknown outputs ['logits']" in raised.value.message()

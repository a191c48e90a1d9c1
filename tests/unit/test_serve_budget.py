"""What one request may cost the server: pixel budgets per image and per request, decompression
bombs refused from their header, large JPEGs decoded at reduced size, 16-bit PNGs scaled rather
than clipped, and the gate that bounds the pixels decoded at once (FastAPI's TestClient)."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from tests.factories import header_bomb, png16
from tirelib.errors import DataError, ImageTooLargeError
from tirelib.models import IMAGENET_MEAN, IMAGENET_STD, get_model
from tirelib.preprocessing import MAX_IMAGE_PIXELS, Preprocessing, open_image
from tirelib.pyfunc import TireClassifier
from tirelib.serve import create_app, load_serve_config
from tirelib.serve.binary import images_of
from tirelib.serve.decoding import (
    SMALL_SHARE,
    DecodeGate,
    DecodeQueueFull,
    PixelLimits,
    admit,
)
from tirelib.serve.inputs import Limits, to_tensor
from tirelib.serve.model import StaticSource
from tirelib.settings import load_settings

pytestmark = pytest.mark.unit

SIZE = 32
IMAGE_BUDGET = 10_000  # 100 x 100 pixels per image
REQUEST_IMAGES = 2  # 20,000 pixels per request
BOMB = 50_000


def classifier() -> TireClassifier:
    torch.manual_seed(0)
    model = TireClassifier()
    model.classes = ["good", "defective"]
    model.model_type = "cnn"
    model.prep = Preprocessing(SIZE, IMAGENET_MEAN, IMAGENET_STD)
    model.network = get_model("cnn", num_classes=2).eval()
    return model


def encode(pixels: np.ndarray, kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=kind)
    return buffer.getvalue()


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colours (a photograph rather than noise, so JPEG scaling keeps its content)."""
    rows = np.linspace(0, 1, height)[:, None]
    columns = np.linspace(0, 1, width)[None, :]
    phase = np.random.default_rng(seed).random(3) * 6
    channels = [np.sin(3 * rows + 2 * columns + p) * 0.5 + 0.5 for p in phase]
    return (np.stack(channels, axis=2) * 255).astype(np.uint8)


def bomb(kind: str, width: int = BOMB, height: int = BOMB) -> bytes:
    """A small valid image whose header declares ``width`` x ``height`` pixels."""
    return header_bomb(encode(rgb(8, 8), kind), kind, width, height)


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


@pytest.fixture(scope="module")
def model() -> TireClassifier:
    return classifier()


@pytest.fixture(scope="module")
def client(model: TireClassifier) -> Iterator[TestClient]:
    """A server whose budget is 100 x 100 pixels per image and two such images per request."""
    config = load_serve_config(
        max_image_side=4096,
        min_image_budget=IMAGE_BUDGET,
        image_budget_factor=1,
        request_budget_images=REQUEST_IMAGES,
        max_wait_ms=1,
    )
    app = create_app(config, load_settings(), source=StaticSource(model, version="7"))
    with TestClient(app) as test_client:
        yield test_client


def send(client: TestClient, route: str, images: list[bytes]) -> Any:
    """``images`` as the route takes them (TF Serving row form, classify, upload, v2 BYTES)."""
    if route == ":predict":
        return client.post("/v1/models/tire:predict", json={"instances": [b64(i) for i in images]})
    if route == ":classify":
        body = {"examples": [{"image_bytes": b64(i)} for i in images]}
        return client.post("/v1/models/tire:classify", json=body)
    if route == ":upload":
        files = [("file", (f"tire{i}.img", data, "image/png")) for i, data in enumerate(images)]
        return client.post("/v1/models/tire:upload", files=files)
    text = [base64.b64encode(i).decode() for i in images]
    tensor = {"name": "image_bytes", "shape": [len(text)], "datatype": "BYTES", "data": text}
    return client.post("/v2/models/tire/infer", json={"inputs": [tensor]})


ROUTES = [":predict", ":classify", ":upload", "v2 BYTES"]


# --- decompression bombs -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "GIF"])
@pytest.mark.parametrize("route", ROUTES)
def test_a_decompression_bomb_is_a_413_naming_its_size_and_the_budget(
    client: TestClient, route: str, kind: str
) -> None:
    response = send(client, route, [encode(rgb(20, 20)), bomb(kind)])
    assert response.status_code == 413, response.text
    assert set(response.json()) == {"error"}
    error = response.json()["error"]
    assert f"{BOMB}x{BOMB} pixels" in error
    assert f"{IMAGE_BUDGET:,} pixels per image" in error
    assert "[1]" in error or "tire1.img" in error  # names the image


def test_a_bomb_is_refused_before_any_pixel_is_decoded() -> None:
    with pytest.raises(ImageTooLargeError, match=f"{BOMB}x{BOMB}") as caught:
        open_image(bomb("PNG"), max_pixels=IMAGE_BUDGET)
    assert isinstance(caught.value, DataError)  # a client's mistake, never retried
    image, declared = open_image(bomb("PNG", 3000, 2000))
    assert declared == (3000, 2000) and image.size == (3000, 2000)  # the header alone


def test_a_single_image_is_read_from_its_header_first_too() -> None:
    with pytest.raises(ImageTooLargeError, match=rf"instances\[0\]: .*{BOMB}x{BOMB}"):
        to_tensor(classifier().prep, bomb("GIF"), Limits(), "instances[0]")


# --- the pixel budget ----------------------------------------------------------------------


def test_the_budget_derives_from_the_models_input_size() -> None:
    config = load_serve_config()
    limits = PixelLimits.from_config(config)
    floor = config.min_image_budget
    assert limits.budget(64).image == floor  # a small model: the floor
    assert limits.budget(224).image == max(floor, round(config.image_budget_factor * 224**2))
    big = limits.budget(512)
    assert big.image == min(MAX_IMAGE_PIXELS, round(config.image_budget_factor * 512**2))
    assert big.request == big.image * config.request_budget_images
    narrow = PixelLimits.from_config(load_serve_config(max_image_side=1000))
    assert narrow.budget(512).image == 1000 * 1000  # never more than the side limit allows


def test_an_image_over_the_budget_is_a_413_before_decoding(client: TestClient) -> None:
    for route in ROUTES:
        response = send(client, route, [encode(rgb(101, 100))])
        assert response.status_code == 413, (route, response.text)
        error = response.json()["error"]
        assert "100x101 pixels (10,100)" in error
        assert f"{IMAGE_BUDGET:,} pixels per image" in error
    assert send(client, ":predict", [encode(rgb(100, 100))]).status_code == 200


def test_a_request_over_the_budget_is_a_413(client: TestClient) -> None:
    three = [encode(rgb(90, 90, seed=i)) for i in range(3)]
    for route in ROUTES:
        response = send(client, route, three)
        assert response.status_code == 413, (route, response.text)
        error = response.json()["error"]
        assert "3 images hold 24,300 pixels" in error
        assert f"{IMAGE_BUDGET * REQUEST_IMAGES:,} pixels per request" in error
    assert send(client, ":predict", three[:2]).status_code == 200


def test_float_images_count_against_the_same_budget(client: TestClient) -> None:
    large = np.full((101, 100, 3), 0.5).tolist()
    response = client.post("/v1/models/tire:predict", json={"instances": [large]})
    assert response.status_code == 413
    assert "a float image of 100x101 pixels" in response.json()["error"]

    batch = np.full((3, 90, 90, 3), 0.5, dtype=np.float32)
    tensor = {"name": "images", "shape": list(batch.shape), "datatype": "FP32",
              "data": batch.ravel().tolist()}  # fmt: skip
    response = client.post("/v2/models/tire/infer", json={"inputs": [tensor]})
    assert response.status_code == 413
    assert "per request" in response.json()["error"]
    fits = np.full((80, 80, 3), 0.5).tolist()
    assert client.post("/v1/models/tire:predict", json={"inputs": [fits]}).status_code == 200


# --- large JPEGs decode at reduced size ----------------------------------------------------


def test_a_large_jpeg_decodes_at_reduced_size_and_fits_the_budget(
    client: TestClient, model: TireClassifier
) -> None:
    pixels = rgb(800, 800)
    jpeg, png = encode(pixels, "JPEG"), encode(pixels, "PNG")
    image, declared = open_image(jpeg, draft=SIZE)
    assert declared == (800, 800)
    assert image.size == (100, 100)  # 1/8: the smallest scale that still covers 32 pixels
    image, _ = open_image(jpeg, draft=300)
    assert image.size == (400, 400)  # 1/2: 1/4 would be 200, under 300

    answer = send(client, ":predict", [jpeg])  # 10,000 pixels decoded: within budget
    assert answer.status_code == 200, answer.text
    assert send(client, ":predict", [png]).status_code == 413  # 640,000 pixels as a PNG

    # The logged model decodes the same way (same bytes, same prediction), and the reduced
    # decode predicts what the full one does.
    served = np.array(answer.json()["predictions"])
    own = model.predict_proba(model.prep.batch([model.prep.from_bytes(jpeg)]))
    assert np.allclose(served, own, atol=1e-5)
    with Image.open(io.BytesIO(jpeg)) as full:
        whole = model.predict_proba(model.prep.batch([model.prep.from_pil(full)]))
    assert np.allclose(served, whole, atol=0.02)


# --- 16-bit PNGs ---------------------------------------------------------------------------


def test_a_16_bit_png_predicts_what_its_8_bit_version_does(
    client: TestClient, model: TireClassifier
) -> None:
    gray8 = rgb(60, 70)[:, :, 0]
    colour8 = rgb(60, 70, seed=3)
    cases = [
        (encode(gray8), png16(gray8.astype(np.uint16) * 257)),  # Pillow mode I;16
        (encode(colour8), png16(colour8.astype(np.uint16) * 257)),  # 16-bit RGB
    ]
    with Image.open(io.BytesIO(cases[0][1])) as image:
        assert image.mode in ("I;16", "I")
    for eight, sixteen in cases:
        answer = send(client, ":predict", [eight, sixteen])
        assert answer.status_code == 200, answer.text
        low, high = np.array(answer.json()["predictions"])
        assert np.allclose(low, high, atol=1e-5)
        tensors = [model.prep.from_bytes(eight), model.prep.from_bytes(sixteen)]
        assert torch.allclose(tensors[0], tensors[1], atol=1e-5)


def test_16_bit_values_are_scaled_not_clipped() -> None:
    prep = Preprocessing(8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    dark = np.full((8, 8), 1000, dtype=np.uint16)  # clipping would read 1000 as 255/255
    tensor = prep.from_bytes(png16(dark))
    assert torch.allclose(tensor, torch.full_like(tensor, 1000 / 65535), atol=1e-6)


# --- the decode gate -----------------------------------------------------------------------


def test_the_gate_bounds_pixels_decoded_at_once_and_lets_small_requests_pass() -> None:
    async def scenario() -> None:
        gate = DecodeGate(capacity=2, queue=3)
        order: list[str] = []
        release = asyncio.Event()

        async def decode(name: str, share: float) -> None:
            async with gate.hold(share):
                order.append(name)
                await release.wait()

        first = asyncio.create_task(decode("a", 1))
        second = asyncio.create_task(decode("b", 1))
        waiting = asyncio.create_task(decode("c", 2))
        await asyncio.sleep(0)  # let them start: a and b run, c waits
        for _ in range(5):
            await asyncio.sleep(0)
        assert order == ["a", "b"] and gate.running == 2 and gate.waiting == 2
        async with gate.hold(SMALL_SHARE):  # a small request never waits
            order.append("small")
        with pytest.raises(DecodeQueueFull, match="retry in"):
            async with gate.hold(1.5):  # 2 + 1.5 shares would wait: over the queue of 3
                pass
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second, waiting), 5)
        assert order == ["a", "b", "small", "c"]
        assert gate.running == 0 and gate.waiting == 0

    asyncio.run(scenario())


def test_a_request_larger_than_the_gate_runs_alone() -> None:
    async def scenario() -> None:
        gate = DecodeGate(capacity=2, queue=8)
        async with gate.hold(5):
            assert gate.running == 5

    asyncio.run(scenario())


# --- batching a tensor's rows ----------------------------------------------------------------


@pytest.mark.parametrize(
    "order", [[0, 1, 2, 3], [2, 0, 3, 1], [1, 2]], ids=["whole", "shuffled", "part"]
)
def test_a_tensors_rows_are_batched_in_the_requests_order(order: list[int]) -> None:
    """A tensor sent whole is batched as the array it was read into (no copy); rows in another
    order, or only some of them, are copied in the request's order."""
    prep = classifier().prep
    tensor = np.random.default_rng(5).random((4, SIZE, SIZE, 3)).astype(np.float32)
    rows = images_of(tensor, "inputs[0]")
    located = [rows[i] for i in order]
    config = load_serve_config()
    budget = PixelLimits.from_config(config).budget(SIZE)
    admitted = admit(prep, located, budget, Limits())
    got = admitted.decode()
    want = prep.finish_hwc(tensor[order])
    assert torch.equal(got, want)

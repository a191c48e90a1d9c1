"""One decoder for the TF Serving and v2 routes: v2 bodies take the fast road of predict bodies.

An Open Inference Protocol float tensor whose ``data`` is in the JSON is decoded straight into an
array, and the JSON part of a body with binary tensor data is read by msgspec too
(:mod:`tirelib.serve.bodies`). Like the predict fast path, it must never answer differently
from the general reader, only sooner: every body, good or bad, gets the same status and the same
answer with it and without it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.unit.test_serve_api import classifier
from tirelib.errors import DataError
from tirelib.serve import bodies, create_app, load_serve_config
from tirelib.serve.binary import HEADER
from tirelib.serve.inputs import Limits
from tirelib.serve.model import StaticSource
from tirelib.settings import load_settings

pytestmark = pytest.mark.unit

INFER = "/v2/models/tire/infer"
LIMITS = Limits(max_instances=8, max_image_side=64)
BATCH = np.random.default_rng(3).random((2, 4, 5, 3)).round(4)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    config = load_serve_config(
        max_instances=LIMITS.max_instances,
        max_image_side=LIMITS.max_image_side,
        max_body_bytes=2**20,
        max_wait_ms=1,
    )
    app = create_app(config, load_settings(), source=StaticSource(classifier(), version="7"))
    with TestClient(app) as test_client:
        yield test_client


def tensor(data: Any, shape: list[Any] | None = None, datatype: str = "FP32") -> dict[str, Any]:
    return {
        "name": "images",
        "shape": shape or list(BATCH.shape),
        "datatype": datatype,
        "data": data,
    }


def infer(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def with_binary(array: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A body as tritonclient sends it by default: JSON, then the tensor's raw bytes."""
    data = array.astype("<f4").tobytes()
    head = infer(
        {"name": "images", "shape": list(array.shape), "datatype": "FP32",
         "parameters": {"binary_data_size": len(data)}},
    )  # fmt: skip
    return head + data, {HEADER: str(len(head))}


Body = tuple[bytes, dict[str, str]]
FLAT = BATCH.ravel().tolist()
# Bodies the fast road takes: flat and nested data, integers, FP16/FP64, the request's id and
# outputs, binary data after the JSON.
TAKEN: dict[str, Body] = {
    "flat": (infer(tensor(FLAT)), {}),
    "nested": (infer(tensor(BATCH.tolist())), {}),
    "integers": (infer(tensor([0, 1, 1] * 40)), {}),
    "fp64": (infer(tensor(FLAT, datatype="FP64")), {}),
    "fp16": (infer(tensor(FLAT, datatype="FP16")), {}),
    "id and outputs": (
        infer(tensor(FLAT), id="r-1", outputs=[{"name": "label"}, {"name": "probabilities"}]),
        {},
    ),
    "binary data": with_binary(BATCH),
    # read fast, refused as the general reader refuses them
    "out of range": (infer(tensor([2.0] * 120)), {}),
    "unknown output": (infer(tensor(FLAT), outputs=[{"name": "logits"}]), {}),
}
# Bodies the general reader decides: all bad but two (it reads these more leniently).
ACCEPTED = {"float shape", "uint8"}
LEFT: dict[str, Body] = {
    "ragged": (infer(tensor([BATCH[0].tolist(), BATCH[1].ravel().tolist()])), {}),
    "too few": (infer(tensor(FLAT[:-1])), {}),
    "strings": (infer(tensor(["0.5"] * 120)), {}),
    "booleans": (infer(tensor([True] * 120)), {}),
    "nulls in data": (infer(tensor([None] * 120)), {}),
    "NaN": (infer(tensor([0.123456, *FLAT[1:]])).replace(b"0.123456", b"NaN"), {}),
    "data null": (infer(tensor(None)), {}),
    "rank 3": (infer(tensor(FLAT[:60], [4, 5, 3])), {}),
    "two channels": (infer(tensor(FLAT[:80], [2, 4, 5, 2])), {}),
    "too many": (infer(tensor([0.5] * 27, [9, 1, 1, 3])), {}),
    "too wide": (infer(tensor([0.5] * 195, [1, 1, 65, 3])), {}),
    "float shape": (infer(tensor(FLAT, [2.0, 4, 5, 3])), {}),
    "unknown key": (infer({**tensor(FLAT), "dims": [1]}), {}),
    "two inputs": (infer(tensor(FLAT), tensor(FLAT)), {}),
    "uint8": (infer(tensor([1] * 120, datatype="UINT8")), {}),
    "bytes": (infer(tensor(["AA=="], [1], datatype="BYTES")), {}),
    "size without header": (with_binary(BATCH)[0], {}),
    "data and size": (
        infer({**tensor(FLAT), "parameters": {"binary_data_size": 4}}) + b"abcd",
        {HEADER: str(len(infer({**tensor(FLAT), "parameters": {"binary_data_size": 4}})))},
    ),
    "deep parameters": (
        b'{"parameters": {"a": ' + b"[" * 80 + b"]" * 80 + b"}, " + infer(tensor(FLAT))[1:],
        {},
    ),
    "unpaired surrogate": (infer(tensor(FLAT), id="\ud800"), {}),
}


@pytest.mark.parametrize("name", [*TAKEN, *LEFT])
def test_the_fast_road_answers_as_the_general_reader(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    content, headers = TAKEN.get(name) or LEFT[name]
    fast = client.post(INFER, content=content, headers=headers)
    monkeypatch.setattr(bodies, "_read_infer_fast", lambda split, limits: None)
    general = client.post(INFER, content=content, headers=headers)
    assert fast.status_code == general.status_code, (fast.text, general.text)
    bad = (name in LEFT and name not in ACCEPTED) or name in ("out of range", "unknown output")
    assert fast.status_code == (400 if bad else 200), fast.text
    if fast.status_code != 200:
        assert fast.json() == general.json()
        assert set(fast.json()) == {"error"}
        return
    answers = fast.json(), general.json()
    assert [o["name"] for o in answers[0]["outputs"]] == [o["name"] for o in answers[1]["outputs"]]
    for left, right in zip(answers[0]["outputs"], answers[1]["outputs"], strict=True):
        assert left["shape"] == right["shape"]
        if left["datatype"] == "FP32":
            assert np.allclose(left["data"], right["data"], atol=1e-6)
        else:
            assert left["data"] == right["data"]
    assert answers[0].get("id") == answers[1].get("id")


@pytest.mark.parametrize("name", list(TAKEN))
def test_the_common_bodies_take_the_fast_road(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    content, headers = TAKEN[name]

    def general(*args: Any) -> Any:
        raise AssertionError("the general reader was asked")

    monkeypatch.setattr(bodies, "parse_body", general)
    try:
        found = bodies.read_infer(content, headers.get(HEADER), LIMITS)
    except DataError as error:  # a bad output, said by the fast road itself
        assert name == "unknown output", error
        return
    assert [where for where, _ in found.images] == ["input 'images'[0]", "input 'images'[1]"]
    for (_, image), want in zip(found.images, BATCH, strict=True):
        assert isinstance(image, np.ndarray) and image.shape == (4, 5, 3)
        if name in ("flat", "nested", "binary data", "fp64", "id and outputs"):
            assert np.allclose(image, want, atol=1e-6)


def test_a_float_tensor_is_one_array_of_its_datatype() -> None:
    found = bodies.read_infer(TAKEN["fp16"][0], None, LIMITS)
    images = [image for _, image in found.images if isinstance(image, np.ndarray)]
    assert len(images) == 2 and all(i.dtype == np.float16 for i in images)
    assert images[0].base is not None
    assert images[0].base is images[1].base  # views of one decoded batch, no per-image copies

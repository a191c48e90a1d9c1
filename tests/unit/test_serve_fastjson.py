"""The fast path of predict bodies and the batch decoding of a request's images.

The fast path (:mod:`tirelib.serve.fastjson`) must never answer differently from the general
reader, only sooner: every body, good or bad, gets the same status and the same answer with it
and without it. The batch decoding (:meth:`~tirelib.serve.decoding.Admitted.decode`) must give
the tensors the one-image path gives, and name the first bad image of a request, in order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tests.factories import png16
from tests.unit.test_serve_api import BAD_REQUESTS, b64, classifier, floats, png
from tirelib.pyfunc import TireClassifier
from tirelib.serve import bodies, create_app, decoding, load_serve_config
from tirelib.serve.decoding import DecodePool, PixelBudget, admit
from tirelib.serve.fastjson import read_float_array, read_predict_images
from tirelib.serve.inputs import Limits, from_columnar, from_instances, pixel_array, to_tensor
from tirelib.serve.model import StaticSource
from tirelib.serve.schemas import PredictRequest, parse_body
from tirelib.settings import load_settings

pytestmark = pytest.mark.unit

PREDICT = "/v1/models/tire:predict"
LIMITS = Limits(max_instances=128, max_image_side=1000)


@pytest.fixture(scope="module")
def model() -> TireClassifier:
    return classifier()


@pytest.fixture(scope="module")
def client(model: TireClassifier) -> Iterator[TestClient]:
    config = load_serve_config(
        max_instances=LIMITS.max_instances,
        max_image_side=LIMITS.max_image_side,
        max_body_bytes=2**20,
        max_wait_ms=1,
    )
    app = create_app(config, load_settings(), source=StaticSource(model, version="7"))
    with TestClient(app) as test_client:
        yield test_client


def _grey(height: int, width: int) -> list[Any]:
    return np.linspace(0, 1, height * width).reshape(height, width, 1).round(4).tolist()


# Bodies the fast path takes: equal-sized float images, mixed sizes, b64 with floats, the
# columnar form, integers, indented JSON.
TAKEN: dict[str, bytes] = {
    "batch": json.dumps({"instances": [floats(seed=s) for s in range(3)]}).encode(),
    "sizes": json.dumps({"instances": [floats(20, 30), floats(32, 32), floats(7, 5)]}).encode(),
    "mixed": json.dumps({"instances": [floats(), b64(png()), b64(png(kind="JPEG"))]}).encode(),
    "columnar": json.dumps({"inputs": [floats(), floats(seed=4)]}).encode(),
    "integers": json.dumps({"instances": [[[[0, 1, 0], [1, 1, 1]]]]}).encode(),
    "indented": json.dumps({"instances": [floats(4, 4)], "signature_name": ""}, indent=2).encode(),
    "every digit": json.dumps(
        {"instances": [np.random.default_rng(1).random((6, 5, 3)).tolist()]}
    ).encode(),
    "exponents": b'{"instances": [[[[5e-1, 1E-3, 0.25e0], [1e0, 0, -0.0]]]]}',
}
TRUNCATED = b64(png()[:60])  # its header reads, its pixels do not decode
# Bodies it leaves to the general reader, or that fail later, with a bad image between others:
# the first bad one in order is the error.
LEFT: dict[str, bytes] = {
    "grey": json.dumps({"instances": [floats(), _grey(9, 9)]}).encode(),
    "bad middle": json.dumps({"instances": [floats(), [[[0.1, 1.5, 0.2]]], TRUNCATED]}).encode(),
    "bad png first": json.dumps({"instances": [floats(), TRUNCATED, [[[2, 0, 0]]]]}).encode(),
    "huge": json.dumps({"instances": [[[[1e300, 0.5, 0.5]]]]}).encode(),
    "beyond a double": b'{"instances": [[[[1e400, 0.5, 0.5]]]]}',
    "integer beyond 64 bits": b'{"instances": [[[[1' + b"0" * 400 + b", 0.5, 0.5]]]]}",
    "string number": json.dumps({"instances": [floats(), [[["0.5", 0.5, 0.5]]]]}).encode(),
    "null number": json.dumps({"instances": [[[[0.5, None, 0.5]]]]}).encode(),
    "object number": json.dumps({"instances": [[[[0.5, {"v": 1}, 0.5]]]]}).encode(),
    "negative": json.dumps({"instances": [floats(), [[[-0.5, 0.5, 0.5]]]]}).encode(),
    "bool": json.dumps({"instances": [[[[0.1, True, 0.2]]]]}).encode(),
    "nested named": json.dumps({"instances": [{"images": floats()}]}).encode(),
    "null": json.dumps({"instances": None}).encode(),
    "not utf-8 key": b'{"\xffinstances": [[[[0.5, 0.5, 0.5]]]]}',
    "not utf-8 value": b'{"instances": [[[[0.5, 0.5, "\xff"]]]]}',
    "deep": b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    **{
        name: body if isinstance(body, bytes) else json.dumps(body).encode()
        for name, path, body, _, _ in BAD_REQUESTS
        if path.startswith(PREDICT)
    },
}


@pytest.mark.parametrize("name", [*TAKEN, *LEFT])
def test_the_fast_path_answers_what_the_general_reader_does(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    body = TAKEN.get(name, LEFT.get(name))
    assert body is not None
    fast = client.post(PREDICT, content=body)
    monkeypatch.setattr(bodies, "read_predict_images", lambda raw, limits: None)
    general = client.post(PREDICT, content=body)
    assert fast.status_code == general.status_code, (fast.text, general.text)
    if fast.status_code == 200:
        key = "predictions" if b'"instances"' in body else "outputs"
        assert np.allclose(fast.json()[key], general.json()[key], atol=1e-6)
    else:
        assert fast.json() == general.json()
    if name in TAKEN:
        assert fast.status_code == 200
        assert read_predict_images(body, LIMITS) is not None  # it did take the fast path


def test_the_fast_path_reads_what_the_general_reader_reads() -> None:
    for name, body in TAKEN.items():
        found = read_predict_images(body, LIMITS)
        assert found is not None, name
        parsed = parse_body(body, PredictRequest)
        if parsed.instances is not None:
            general = from_instances(parsed.instances, LIMITS)
        else:
            general = from_columnar(parsed.inputs, LIMITS)
        assert [where for where, _ in found.images] == [where for where, _ in general]
        for (_, fast), (_, image) in zip(found.images, general, strict=True):
            if isinstance(image, bytes):
                assert fast == image
            else:
                assert isinstance(fast, np.ndarray) and fast.dtype == np.float32
                assert np.array_equal(fast, pixel_array(image)), name


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numbers_are_those_of_python_floats(dtype: type[np.floating[Any]]) -> None:
    """simdjson's numbers, cast to ``dtype``, are those of the same JSON read as Python floats:
    every digit, exponents, integers, subnormals, and what overflows ``dtype`` becomes inf."""
    values = np.random.default_rng(2).normal(0, 1e3, 500).tolist()
    values += [0, -0.0, 1, 3, 1e-310, 5e-324, 1.7976931348623157e308, 65519.9, 70000.0, 1e39]
    raw = json.dumps(values).encode()
    with np.errstate(over="ignore"):
        expected = np.asarray(values, dtype=dtype)
    found = read_float_array(raw, (len(values),), dtype)
    assert found is not None and found.dtype == dtype
    assert np.array_equal(found, expected)
    nested = read_float_array(json.dumps([values[:6], values[6:12]]).encode(), (2, 6), dtype)
    assert nested is not None and np.array_equal(nested, expected[:12].reshape(2, 6))
    for bad in (
        b"[0.5, true]",
        b"[0.5, null]",
        b'[0.5, "1"]',
        b"[1e400, 0]",
        b"[0.5, {}]",
        b"[1" + b"0" * 30 + b", 0]",
    ):
        assert read_float_array(bad, (2,), dtype) is None, bad


def test_the_first_bad_image_in_order_is_the_error(client: TestClient) -> None:
    answer = client.post(PREDICT, content=LEFT["bad middle"]).json()["error"]
    assert answer.startswith("instances[1]: image values must lie in [0, 1]")
    answer = client.post(PREDICT, content=LEFT["bad png first"]).json()["error"]
    assert answer.startswith("instances[1]: image could not be decoded")


def test_batch_decoding_gives_the_one_image_tensors(
    model: TireClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encoded and float images of several sizes (one already the model's: not resized),
    decoded in two threads and finished in batches, equal the one-image path's tensors."""
    prep = model.prep
    size = prep.image_size
    rng = np.random.default_rng(0)
    images: list[Any] = [
        png(40, 50),
        np.asarray(rng.random((size, size, 3)), dtype=np.float32),
        png(300, 400, kind="JPEG"),  # decoded at reduced size (draft mode)
        png16(np.linspace(0, 65535, 24 * 20).reshape(24, 20).astype(np.uint16)),
        floats(20, 30),
        png(40, 50, seed=2),
        _grey(9, 9),
        np.asarray(rng.random((size, size, 3)), dtype=np.float32),
    ]
    located = [(f"instances[{i}]", image) for i, image in enumerate(images)]
    budget = PixelBudget(image=2**22, request=2**24)
    monkeypatch.setattr(decoding, "PARALLEL_PIXELS", 0)
    pool = DecodePool(2)
    try:
        admitted = admit(prep, located, budget, LIMITS)
        batch = admitted.decode(pool)
        admitted.close()
    finally:
        pool.close()
    one_by_one = torch.stack([to_tensor(prep, image, LIMITS, "x") for image in images])
    assert batch.shape == (len(images), 3, size, size)
    assert float((batch - one_by_one).abs().max()) <= 1e-6

"""The Open Inference Protocol's binary tensor data extension over a tiny in-memory model.

Bodies are built here byte by byte, as Triton's protocol defines them (``tritonclient`` itself is
tested against a real server in ``tests/integration/test_serve_triton.py``): binary inputs and
outputs give the answers the JSON forms give, and every malformed body is a 4xx naming what does
not add up.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.unit.test_serve_api import classifier
from tirelib.pyfunc import TireClassifier
from tirelib.serve import create_app, load_serve_config
from tirelib.serve.binary import HEADER
from tirelib.serve.model import StaticSource
from tirelib.settings import load_settings

pytestmark = pytest.mark.unit

INFER = "/v2/models/tire/infer"
MAX_BODY = 2**20


@pytest.fixture(scope="module")
def model() -> TireClassifier:
    return classifier()


@pytest.fixture(scope="module")
def client(model: TireClassifier) -> Iterator[TestClient]:
    config = load_serve_config(max_instances=16, max_body_bytes=MAX_BODY, max_wait_ms=1)
    app = create_app(config, load_settings(), source=StaticSource(model, version="7"))
    with TestClient(app) as test_client:
        yield test_client


def binary_body(
    request: Mapping[str, Any], *chunks: bytes, header: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """A body as Triton's binary extension lays it out: JSON, then each input's bytes."""
    text = json.dumps(request).encode()
    return text + b"".join(chunks), {HEADER: header if header is not None else str(len(text))}


def tensor(
    datatype: str, shape: list[int], size: int | None = None, name: str = "images"
) -> dict[str, Any]:
    value: dict[str, Any] = {"name": name, "shape": shape, "datatype": datatype}
    if size is not None:
        value["parameters"] = {"binary_data_size": size}
    return value


def byte_elements(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def parse_answer(response: Any) -> dict[str, np.ndarray | list[Any]]:
    """Each output of an answer, from its JSON data or its binary data."""
    raw = response.content
    length = int(response.headers.get(HEADER, len(raw)))
    answer = json.loads(raw[:length])
    found: dict[str, np.ndarray | list[Any]] = {}
    offset = length
    for output in answer["outputs"]:
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            found[output["name"]] = output["data"]
            continue
        data = raw[offset : offset + size]
        offset += size
        if output["datatype"] == "BYTES":
            items, at = [], 0
            while at < len(data):
                (n,) = struct.unpack_from("<I", data, at)
                items.append(data[at + 4 : at + 4 + n].decode())
                at += 4 + n
            found[output["name"]] = items
        else:
            found[output["name"]] = np.frombuffer(data, "<f4").reshape(output["shape"])
    assert offset == len(raw), "binary data left over after the outputs"
    return found


def pixels(count: int = 2, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 24, 20, 3), dtype=np.uint8)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_binary_inputs_and_outputs_answer_what_json_does(client: TestClient) -> None:
    batch = pixels()
    floats = batch.astype(np.float32) / 255.0
    as_json = client.post(
        INFER,
        json={"inputs": [{**tensor("FP32", list(floats.shape)), "data": floats.ravel().tolist()}]},
    )
    assert as_json.status_code == 200 and HEADER.lower() not in as_json.headers
    want = parse_answer(as_json)
    probabilities = np.reshape(want["probabilities"], (2, 2))

    body, headers = binary_body(
        {
            "id": "binary-1",
            "inputs": [tensor("FP32", list(floats.shape), floats.nbytes)],
            "outputs": [
                {"name": "probabilities", "parameters": {"binary_data": True}},
                {"name": "label", "parameters": {"binary_data": True}},
            ],
        },
        floats.astype("<f4").tobytes(),
    )
    answer = client.post(INFER, content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/octet-stream"
    got = parse_answer(answer)
    assert np.array_equal(got["probabilities"], probabilities)
    assert got["label"] == want["label"]
    assert json.loads(answer.content[: int(answer.headers[HEADER])])["id"] == "binary-1"

    # 8-bit pixels as binary UINT8, and as PNG files in a binary BYTES tensor: one answer, the
    # one TF Serving's route gives for the same PNGs. binary_data_output is each output's
    # default; an output may still ask for JSON.
    encoded = [png(image) for image in batch]
    tf = client.post(
        "/v1/models/tire:predict",
        json={"instances": [{"b64": base64.b64encode(e).decode()} for e in encoded]},
    ).json()["predictions"]
    for datatype, shape, data in [
        ("UINT8", list(batch.shape), batch.tobytes()),
        ("BYTES", [2], byte_elements(*encoded)),
    ]:
        body, headers = binary_body(
            {
                "inputs": [tensor(datatype, shape, len(data))],
                "parameters": {"binary_data_output": True},
                "outputs": [
                    {"name": "probabilities"},
                    {"name": "label", "parameters": {"binary_data": False}},
                ],
            },
            data,
        )
        answer = client.post(INFER, content=body, headers=headers)
        assert answer.status_code == 200, (datatype, answer.text)
        got = parse_answer(answer)
        assert np.allclose(got["probabilities"], tf, atol=1e-6), datatype
        assert np.allclose(got["probabilities"], probabilities, atol=1e-6), datatype
        assert got["label"] == want["label"]

    # UINT8 in the JSON, flat, as tritonclient sends it with binary_data=False.
    flat = {"inputs": [{**tensor("UINT8", list(batch.shape)), "data": batch.ravel().tolist()}]}
    assert np.allclose(
        np.reshape(parse_answer(client.post(INFER, json=flat))["probabilities"], (2, 2)),
        probabilities,
        atol=1e-6,
    )


_FOUR = np.full((1, 2, 2, 3), 0.5, dtype="<f4").tobytes()  # 48 bytes: one 2 x 2 image
_IMAGE = {"inputs": [tensor("FP32", [1, 2, 2, 3], 48)]}
_PNG = png(pixels(1)[0])
BAD_BINARY: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("header beyond the body", *binary_body(_IMAGE, _FOUR, header="100000"), 400, "holds only"),
    ("header not a number", *binary_body(_IMAGE, _FOUR, header="12x"), 400, "positive integer"),
    ("header of 30 digits", *binary_body(_IMAGE, _FOUR, header="9" * 30), 400, "positive"),
    ("header zero", *binary_body(_IMAGE, _FOUR, header="0"), 400, "must start with its JSON"),
    (
        "header cuts the JSON",
        json.dumps(_IMAGE).encode() + _FOUR,
        {HEADER: "20"},
        400,
        "malformed JSON",
    ),
    (
        "binary size without the header",
        json.dumps(_IMAGE).encode() + _FOUR,
        {},
        400,
        f"no {HEADER} header",
    ),
    ("bytes left over", *binary_body(_IMAGE, _FOUR, b"\0" * 8), 400, "add up to 48"),
    ("binary size beyond the data", *binary_body(_IMAGE, _FOUR[:40]), 400, "only 40 bytes"),
    (
        "shape and size disagree",
        *binary_body({"inputs": [tensor("FP32", [1, 3, 2, 3], 48)]}, _FOUR),
        400,
        "needs 72 bytes (18 values of 4)",
    ),
    (
        "FP16 size of FP32 data",
        *binary_body({"inputs": [tensor("FP16", [1, 2, 2, 3], 48)]}, _FOUR),
        400,
        "needs 24 bytes",
    ),
    (
        "data and binary size",
        *binary_body({"inputs": [{**tensor("FP32", [1, 2, 2, 3], 48), "data": [0.5]}]}, _FOUR),
        400,
        "send one",
    ),
    ("no data at all", *binary_body({"inputs": [tensor("FP32", [1, 2, 2, 3])]}), 400, "no data"),
    (
        "negative binary size",
        *binary_body({"inputs": [tensor("FP32", [1, 2, 2, 3], -48)]}, _FOUR),
        400,
        "non-negative integer",
    ),
    (
        "binary size as text",
        *binary_body(
            {"inputs": [{**tensor("FP32", [1, 2, 2, 3]), "parameters": {"binary_data_size": "48"}}]}
        ),
        400,
        "non-negative integer, got '48'",
    ),
    (
        "NaN pixel",
        *binary_body(_IMAGE, np.full((1, 2, 2, 3), np.nan, dtype="<f4").tobytes()),
        400,
        "NaN",
    ),
    (
        "pixel above 1",
        *binary_body(_IMAGE, np.full((1, 2, 2, 3), 2.0, dtype="<f4").tobytes()),
        400,
        "must lie in [0, 1]",
    ),
    (
        "BYTES element longer than the data",
        *binary_body(
            {"inputs": [tensor("BYTES", [1], 8, "image_bytes")]}, struct.pack("<I", 99) + b"abcd"
        ),
        400,
        "element 0 declares 99 bytes",
    ),
    (
        "BYTES fewer elements than the shape",
        *binary_body(
            {"inputs": [tensor("BYTES", [2], len(_PNG) + 4, "image_bytes")]}, byte_elements(_PNG)
        ),
        400,
        "ends before element 1 of 2",
    ),
    (
        "BYTES more elements than the shape",
        *binary_body(
            {"inputs": [tensor("BYTES", [1], 2 * len(_PNG) + 8, "image_bytes")]},
            byte_elements(_PNG, _PNG),
        ),
        400,
        "left after the 1 elements",
    ),
    (
        "BYTES not an image",
        *binary_body({"inputs": [tensor("BYTES", [1], 9, "image_bytes")]}, byte_elements(b"%PDF-")),
        400,
        "not an image",
    ),
    (
        "BYTES of rank 2",
        *binary_body({"inputs": [tensor("BYTES", [1, 2], 4, "image_bytes")]}, byte_elements(b"")),
        400,
        "must have shape [N]",
    ),
    (
        "too many images",
        *binary_body({"inputs": [tensor("UINT8", [17, 1, 1, 3], 51)]}, b"\0" * 51),
        400,
        "at most 16 are allowed",
    ),
    (
        "UINT8 JSON above 255",
        json.dumps({"inputs": [{**tensor("UINT8", [1, 1, 1, 3]), "data": [1, 2, 256]}]}).encode(),
        {},
        400,
        "got the range [1, 256]",
    ),
    (
        "UINT8 JSON floats",
        json.dumps({"inputs": [{**tensor("UINT8", [1, 1, 1, 3]), "data": [1, 0.5, 2]}]}).encode(),
        {},
        400,
        "must be integers in [0, 255]",
    ),
    (
        "UINT8 JSON booleans",
        json.dumps({"inputs": [{**tensor("UINT8", [1, 1, 1, 3]), "data": [1, True, 2]}]}).encode(),
        {},
        400,
        "must be integers in [0, 255]",
    ),
    (
        "binary_data not a boolean",
        *binary_body(
            {**_IMAGE, "outputs": [{"name": "label", "parameters": {"binary_data": "yes"}}]}, _FOUR
        ),
        400,
        "binary_data must be true or false",
    ),
    (
        "output asked twice",
        *binary_body({**_IMAGE, "outputs": [{"name": "label"}, {"name": "label"}]}, _FOUR),
        400,
        "requested twice",
    ),
    (
        "shared memory",
        *binary_body(
            {
                "inputs": [
                    {**tensor("FP32", [1, 2, 2, 3]), "parameters": {"shared_memory_region": "r"}}
                ]
            }
        ),
        400,
        "shared memory is not supported",
    ),
    (
        "classification output",
        *binary_body(
            {**_IMAGE, "outputs": [{"name": "label", "parameters": {"classification": 2}}]}, _FOUR
        ),
        400,
        "classification outputs are not supported",
    ),
    (
        "compressed body",
        binary_body(_IMAGE, _FOUR)[0],
        {**binary_body(_IMAGE, _FOUR)[1], "Content-Encoding": "gzip"},
        415,
        "Content-Encoding 'gzip' is not supported",
    ),
]
"""Malformed binary bodies: (name, body, headers, status, part of the message)."""


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [case[1:] for case in BAD_BINARY],
    ids=[case[0] for case in BAD_BINARY],
)
def test_a_malformed_binary_body_is_a_4xx_naming_the_problem(
    client: TestClient, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}
    assert message in response.json()["error"], response.json()["error"]


def test_a_binary_body_over_the_limit_is_a_413(client: TestClient) -> None:
    data = b"\0" * MAX_BODY
    body, headers = binary_body({"inputs": [tensor("UINT8", [1, 1024, 1024, 1], MAX_BODY)]}, data)
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 413
    assert f"larger than {MAX_BODY} bytes" in response.json()["error"]

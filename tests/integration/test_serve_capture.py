"""Feedback and captured images reach S3 from a real ``tirelib serve`` process, and what the
server still held when it was stopped is written before it exits.

The flush interval is an hour, so every feedback record in S3 was written by the shutdown.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.integration.model_server import running_server, save_model_folder
from tirelib.settings import Settings
from tirelib.storage import CAPTURES_PREFIX, FEEDBACK_PREFIX, ObjectStore

pytestmark = pytest.mark.integration


def encoded(kind: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (36, 44, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=kind)
    return buffer.getvalue()


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


def test_captures_and_feedback_land_in_s3_and_nothing_is_lost_on_shutdown(
    tire_env: Settings, tmp_path: Path
) -> None:
    store = ObjectStore.for_data(tire_env)
    png, jpeg = encoded("PNG", 1), encoded("JPEG", 2)
    floats = np.random.default_rng(3).random((20, 30, 3)).round(4)
    env = {"TIRE_SERVE_CAPTURE_RATE": "1", "TIRE_SERVE_SINK_FLUSH_SECONDS": "3600"}
    args = ["--model-uri", str(save_model_folder(tmp_path / "model")), "--max-wait-ms", "2"]
    with running_server(tmp_path / "serve", args, env=env) as server, httpx.Client(
        base_url=server.url, timeout=60
    ) as http:  # fmt: skip
        first = http.post(
            "/v1/models/tire:predict?labels=true",
            json={"instances": [b64(png), b64(jpeg), floats.tolist()]},
            headers={"X-Request-ID": "lot 7/a"},
        )
        second = http.post(
            "/v2/models/tire/infer",
            json={"inputs": [{"name": "b", "shape": [1], "datatype": "BYTES",
                              "data": [base64.b64encode(png).decode()]}]},
        )  # fmt: skip
        assert first.status_code == second.status_code == 200
        assert first.headers["X-Request-ID"] == "lot 7/a"
        second_id = second.headers["X-Request-ID"]
        predicted = first.json()["labels"]
        answers = [
            http.post(
                "/v1/models/tire:feedback",
                json={"request_id": "lot 7/a", "labels": ["defective", None, "good"]},
            ),
            http.post(
                "/v1/models/tire:feedback", json={"request_id": second_id, "labels": ["good"]}
            ),
        ]
        assert [a.status_code for a in answers] == [200, 200], answers[0].text
        assert list(store.iter_objects(FEEDBACK_PREFIX)) == []  # an hour before the next flush
    # The server has stopped (SIGTERM): its shutdown wrote what it held.

    captures = {o.key: store.get_bytes(o.key) for o in store.iter_objects(CAPTURES_PREFIX)}
    assert len(captures) == 4, sorted(captures)
    by_name = {key.rpartition("/")[2]: data for key, data in captures.items()}
    assert by_name["lot%207%2Fa-0.png"] == png  # the bytes sent, under their format's extension
    assert by_name["lot%207%2Fa-1.jpg"] == jpeg
    assert by_name[f"{second_id}-0.png"] == png
    with Image.open(io.BytesIO(by_name["lot%207%2Fa-2.png"])) as image:
        assert np.abs(np.asarray(image) / 255.0 - floats).max() <= 0.5 / 255 + 1e-6

    parts = list(store.iter_objects(FEEDBACK_PREFIX))
    assert len(parts) == 1 and parts[0].key.endswith(".jsonl")
    records: list[dict[str, Any]] = [
        json.loads(line) for line in store.get_bytes(parts[0].key).decode().splitlines()
    ]
    day = records[0]["time"][:10]
    assert parts[0].key.startswith(f"{FEEDBACK_PREFIX}{day}/")
    key_of = {Path(key).name: key for key in captures}
    assert [{k: v for k, v in r.items() if k != "time"} for r in records] == [
        {
            "request_id": "lot 7/a", "index": 0, "label": "defective",
            "predicted_class": predicted[0], "model_version": "1",
            "capture": key_of["lot%207%2Fa-0.png"],
        },
        {
            "request_id": "lot 7/a", "index": 2, "label": "good",
            "predicted_class": predicted[2], "model_version": "1",
            "capture": key_of["lot%207%2Fa-2.png"],
        },
        {
            "request_id": second_id, "index": 0, "label": "good",
            "predicted_class": records[2]["predicted_class"], "model_version": "1",
            "capture": key_of[f"{second_id}-0.png"],
        },
    ]  # fmt: skip

"""Production data flows back, and batches are scored: real S3, a real MLflow registry.

The module's world writes feedback records and captured images into S3 the way the model
server's sink lays them out, turns the labelled captures into a dataset version with
``data from-feedback``, trains a tiny model on that version, registers it and makes it
production. The tests then check that version, and score folders, S3 prefixes and ``inbox/``
batches with the model.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import S3Server, module_env
from tests.factories import png_bytes
from tirelib import pipeline
from tirelib.cli import main
from tirelib.data import FeedbackReport, read_manifest, version_from_feedback
from tirelib.evaluate import MODEL_URI_TAG
from tirelib.pyfunc import TireClassifier
from tirelib.settings import Settings
from tirelib.storage import (
    ObjectStore,
    capture_key,
    feedback_key,
    inbox_prefix,
    predictions_key,
    raw_prefix,
)
from tirelib.train import make_config, train

pytestmark = pytest.mark.integration

VERSION = "from-feedback-1"
DAY1, DAY2 = "2026-11-28", "2026-11-29"
NOT_AN_IMAGE = b"these bytes are not an image"
DAY1_PER_LABEL = 20


@dataclass
class World:
    settings: Settings
    store: ObjectStore
    report: FeedbackReport
    model: TireClassifier  # version 1, production
    expected: dict[str, int]  # what from-feedback must report


def _feedback_line(request_id: str, index: int, label: str | None, time: str) -> str:
    record = {
        "request_id": request_id,
        "index": index,
        "label": label,
        "predicted_class": "good",
        "model_version": "7",
        "time": time,
    }
    return json.dumps(record)


def _write_production_traffic(store: ObjectStore) -> dict[str, int]:
    """Feedback and captures as the server's sink writes them; returns the counts to expect.

    Day 1: 20 good and 20 defective instances labelled and captured, and a request of two
    instances, one of them labelled twice (the later label, on day 2, wins). Day 2: 8 labelled and
    captured, 3 labelled but not captured (sampling), 2 with a null label, a capture that is not
    an image, a label that is no class name, a line that is not JSON, and a request id with a
    slash (percent-encoded in the capture's key).
    """
    lines: dict[str, list[str]] = {DAY1: [], DAY2: []}
    index = 0

    def captured(day: str, label: str | None, *, request_id: str | None = None, i: int = 0) -> str:
        nonlocal index
        request_id = request_id or secrets.token_hex(8)
        data = png_bytes(index, 16, label or "good")
        index += 1
        store.put_bytes(capture_key(day, quote(request_id, safe=""), i, "png"), data, "image/png")
        return request_id

    for n in range(DAY1_PER_LABEL):
        for label in ("good", "defective"):
            rid = captured(DAY1, label)
            lines[DAY1].append(_feedback_line(rid, 0, label, f"{DAY1}T10:{n:02d}:00+00:00"))
    # Two instances of one request, each with its own capture and label.
    rid = captured(DAY1, "good", request_id="pair-request", i=0)
    captured(DAY1, "defective", request_id=rid, i=1)
    lines[DAY1] += [
        _feedback_line(rid, 0, "good", f"{DAY1}T11:00:00+00:00"),
        _feedback_line(rid, 1, "good", f"{DAY1}T11:00:00+00:00"),  # a mistake ...
    ]
    lines[DAY2].append(_feedback_line(rid, 1, "defective", f"{DAY2}T08:00:00+00:00"))  # fixed
    for n in range(4):
        for label in ("good", "defective"):
            rid = captured(DAY2, label)
            lines[DAY2].append(_feedback_line(rid, 0, label, f"{DAY2}T09:{n:02d}:00+00:00"))
    for n in range(3):  # labelled, image not sampled
        lines[DAY2].append(_feedback_line(f"unsampled-{n}", 0, "good", f"{DAY2}T10:00:00+00:00"))
    for _ in range(2):  # the sender did not know
        rid = captured(DAY2, None)
        lines[DAY2].append(_feedback_line(rid, 0, None, f"{DAY2}T10:30:00+00:00"))
    store.put_bytes(capture_key(DAY2, "garbled", 0, "png"), NOT_AN_IMAGE, "image/png")
    lines[DAY2].append(_feedback_line("garbled", 0, "defective", f"{DAY2}T11:00:00+00:00"))
    rid = captured(DAY2, "good", request_id="camera/7:frame")
    lines[DAY2].append(_feedback_line(rid, 0, "good", f"{DAY2}T11:30:00+00:00"))
    rid = captured(DAY2, "good")
    lines[DAY2].append(_feedback_line(rid, 0, "not a class!", f"{DAY2}T12:00:00+00:00"))
    lines[DAY2].append("{not json")
    for day, day_lines in lines.items():
        half = len(day_lines) // 2  # two parts a day, as flushes make them
        for part, chunk in (("part-0", day_lines[:half]), ("part-1", day_lines[half:])):
            body = "\n".join(chunk).encode() + b"\n"
            store.put_bytes(feedback_key(day, part), body, "application/x-ndjson")
    return {
        # day 1: 2 x 20 + the pair; day 2: 8 + the slash id (the garbled capture is skipped)
        "good": DAY1_PER_LABEL + 1 + 4 + 1,
        "defective": DAY1_PER_LABEL + 1 + 4,
        # the pair's correction replaces its first label: one record per instance
        "records": 2 * DAY1_PER_LABEL + 2 + 8 + 3 + 2 + 1 + 1 + 1,
        "no_capture": 3,
        "null_labels": 2,
    }


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server, mlflow_server: str
) -> Iterator[World]:
    root = tmp_path_factory.mktemp("batch")
    with module_env(root, s3_server, mlflow_server, "batch", own_model=True) as settings:
        store = ObjectStore.for_data(settings)
        expected = _write_production_traffic(store)
        report = version_from_feedback(store, VERSION, progress=False)

        # The version made from feedback trains; its model becomes production.
        config = make_config(dataset_version=VERSION, model_type="tinyvgg", epochs=1, batch_size=8)
        run_id = train(config, settings, progress=False).run_id
        assert run_id is not None
        mlflow.set_tracking_uri(mlflow_server)
        client = MlflowClient(mlflow_server)
        uri = client.get_run(run_id).data.tags[MODEL_URI_TAG]
        version = mlflow.register_model(uri, settings.model_name).version
        client.set_registered_model_alias(settings.model_name, "production", str(version))
        model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}/1").unwrap_python_model()
        yield World(settings, store, report, model, expected)


# --- production data back into training ----------------------------------------------------


def test_labelled_captures_become_a_version_the_sensor_takes(world: World) -> None:
    report, expected = world.report, world.expected
    assert report.written
    assert report.counts == {"defective": expected["defective"], "good": expected["good"]}
    assert report.feedback == expected["records"]
    assert report.no_capture == expected["no_capture"]
    assert report.null_labels == expected["null_labels"]
    reasons = {s.path: s.reason for s in report.skipped}
    assert reasons["defective/garbled-0.png"] == "not an image"
    assert any("label" in reason and "not a class!" in reason for reason in reasons.values())
    assert any(path.startswith(f"feedback/{DAY2}/") for path in reasons)  # the line not JSON

    manifest = read_manifest(world.store, VERSION)
    assert manifest.source == "feedback"
    assert manifest.counts == report.counts
    keys = {r.key for r in manifest.records}
    prefix = raw_prefix(VERSION)
    # The later label of an instance labelled twice wins; a request id's slash stays encoded.
    assert f"{prefix}defective/pair-request-1.png" in keys
    assert f"{prefix}good/pair-request-0.png" in keys
    assert f"{prefix}good/{quote('camera/7:frame', safe='')}-0.png" in keys
    assert not world.store.exists(f"{prefix}_upload.json")


def test_data_list_shows_the_version_new_and_the_sensor_announces_it(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["data", "list", "--json"])
    assert done.value.code in (None, 0)
    (row,) = [r for r in json.loads(capsys.readouterr().out) if r["version"] == VERSION]
    assert row["state"] == "new" and row["complete"]
    assert row["counts"] == world.report.counts
    assert VERSION in pipeline.new_versions(world.settings)


def test_from_feedback_since_a_day_again_and_over_another_version(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    def cli(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as done:
            main(["data", "from-feedback", *args])
        out = capsys.readouterr()
        return int(done.value.code or 0), out.out, out.err

    code, out, err = cli("--version", "day-2", "--since", DAY2)
    assert code == 0, err
    # Day 2 only: 8 + the slash id + the pair's correction (its capture is of day 1).
    assert "from 10 labelled capture(s) (defective=5, good=5)" in out
    assert "3 had no captured image (sampling) and 2 no label" in out
    assert "garbled-0.png: not an image" in err
    code, out, _ = cli("--version", "day-2", "--since", DAY2)
    assert code == 0 and "already made with the same images" in out
    # Other images under an existing name are refused; so is a day that is no date.
    code, _, err = cli("--version", VERSION, "--since", DAY2)
    assert code == 2 and "already exists with other images" in err
    code, _, err = cli("--version", "day-3", "--since", "yesterday")
    assert code == 2 and "expected YYYY-MM-DD" in err
    code, _, err = cli("--version", "day-3", "--since", "2027-01-01")
    assert code == 2 and "no labelled capture" in err


# --- batch prediction ----------------------------------------------------------------------


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def _expected(world: World, data: bytes) -> np.ndarray:
    prep = world.model.prep
    return world.model.predict_proba(prep.batch([prep.from_bytes(data)]))[0]


def test_predict_a_folder_with_a_corrupt_image(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = {f"line-{n % 2}/tire-{n}.png": png_bytes(500 + n, 16, "good") for n in range(5)}
    images["line-0/cut-off.png"] = png_bytes(600, 16)[:40]
    images["line-1/notes.txt"] = b"shift B"
    for name, data in {**images, ".hidden/x.png": b""}.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(data)
    out = tmp_path / "out" / "scores.jsonl"

    with pytest.raises(SystemExit) as done:
        main(["predict", str(tmp_path / "in"), "--output", str(out), "--batch-size", "2"])
    captured = capsys.readouterr()
    assert done.value.code in (None, 0), captured.err
    lines = _lines(out.read_text())
    assert [line["key"] for line in lines] == sorted(images)
    for line in lines:
        assert line["model_name"] == world.settings.model_name and line["model_version"] == "1"
        if line["key"] in {"line-0/cut-off.png", "line-1/notes.txt"}:
            assert "error" in line and "label" not in line
            continue
        expected = _expected(world, images[line["key"]])
        probabilities = line["probabilities"]
        assert list(probabilities) == world.model.classes
        assert np.allclose(list(probabilities.values()), expected, atol=1e-5)
        assert line["label"] == world.model.classes[int(expected.argmax())]
    assert "scored 5 image(s)" in captured.out and "2 could not be scored" in captured.out
    assert "not scored line-1/notes.txt" in captured.err

    # Nothing to score is bad input; no production model is the registry's refusal.
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(NOT_AN_IMAGE)
    with pytest.raises(SystemExit) as done:
        main(["predict", str(tmp_path / "junk")])
    assert done.value.code == 2 and "none of the 1 file(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["predict", str(tmp_path / "nowhere/at-all")])
    assert done.value.code == 2 and "is not a folder here" in capsys.readouterr().err


def test_an_inbox_batch_is_scored_once_and_the_cli_scores_the_same_prefix(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, settings = world.store, world.settings
    batch = "line-3-2026-11-30"
    prefix = inbox_prefix(batch)
    for n in range(7):
        store.put_bytes(f"{prefix}cam-{n % 2}/{n}.png", png_bytes(700 + n, 16, "defective"))
    store.put_bytes(f"{prefix}cam-0/broken.png", NOT_AN_IMAGE)
    settled = settings.model_copy(update={"settle_seconds": 0})

    # Just written: the sensor waits for the batch to settle; then takes it.
    assert pipeline.ready_batches(settings.model_copy(update={"settle_seconds": 3600})) == []
    assert pipeline.ready_batches(settled) == [batch]
    summary = pipeline.predict_batch(batch, settled)
    assert summary["scored"] == 7 and summary["failed"] == 1
    assert summary["model_version"] == "1"
    written = store.get_bytes(predictions_key(batch)).decode()
    lines = _lines(written)
    assert len(lines) == 8 and lines[0]["key"] == f"{prefix}cam-0/0.png"
    assert [line["key"] for line in lines if "error" in line] == [f"{prefix}cam-0/broken.png"]

    # Done: the sensor no longer offers it and a second run scores nothing.
    assert pipeline.ready_batches(settled) == []
    assert pipeline.predict_batch(batch, settled) == {"batch": batch, "scored_before": True}

    # The command line on the same S3 prefix writes the same lines.
    url = f"s3://{settings.data_bucket}/{prefix}"
    with pytest.raises(SystemExit) as done:
        main(["predict", url])
    captured = capsys.readouterr()
    assert done.value.code in (None, 0), captured.err
    assert captured.out == written
    assert "scored 7 image(s)" in captured.err

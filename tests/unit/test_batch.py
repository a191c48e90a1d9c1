"""Batch prediction and feedback records, without servers: names, sources and record lines."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest

from tirelib.batch import FolderSource, S3Source, open_source
from tirelib.data import Feedback
from tirelib.errors import DataError
from tirelib.settings import load_settings
from tirelib.storage import capture_key, parse_capture_name

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("request_id", ["3f2a9c", "a-b-c", "camera/7:frame", "ä.b", "x-0"])
def test_a_capture_key_names_its_request_and_instance(request_id: str) -> None:
    key = capture_key("2026-11-30", quote(request_id, safe=""), 12, "png")
    name = key.rsplit("/", 1)[-1]
    assert parse_capture_name(name) == (request_id, 12)


@pytest.mark.parametrize("name", ["no-index.png", "-3.png", "abc.png", "abc-x.jpg", "a-٣.png"])
def test_a_file_that_is_not_a_capture_is_not_taken_for_one(name: str) -> None:
    assert parse_capture_name(name) is None


def test_feedback_lines_are_read_or_refused_with_the_reason() -> None:
    line = (
        '{"request_id": "r1", "index": 2, "label": null, "predicted_class": "good", '
        '"model_version": 3, "time": "2026-11-30T10:00:00+00:00", "capture": null}'
    )
    record = Feedback.parse(line)
    assert (record.request_id, record.index, record.label, record.model_version) == (
        "r1",
        2,
        None,
        "3",
    )
    for bad, reason in [
        ("{oops", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"index": 0, "label": "good"}', "no request_id"),
        ('{"request_id": "r", "index": -1, "label": "good"}', "not a non-negative integer"),
        ('{"request_id": "r", "index": true, "label": "good"}', "not a non-negative integer"),
        ('{"request_id": "r", "index": 0, "label": 3}', "neither a class name nor null"),
    ]:
        with pytest.raises(DataError, match=reason):
            Feedback.parse(bad)


def test_a_source_is_a_folder_an_s3_prefix_or_an_inbox_batch(tmp_path: Path) -> None:
    settings = load_settings(
        home=tmp_path, data_bucket="lake", s3_endpoint_url="http://127.0.0.1:1"
    )
    assert open_source(str(tmp_path), settings) == FolderSource(tmp_path)
    prefix = open_source("s3://other/scans/2026", settings)
    assert isinstance(prefix, S3Source) and prefix.where == "s3://other/scans/2026/"
    batch = open_source("line-3", settings)
    assert isinstance(batch, S3Source) and batch.where == "s3://lake/inbox/line-3/"
    (tmp_path / "a.png").write_bytes(b"")
    for text, problem in [
        (str(tmp_path / "a.png"), "is a file"),
        ("s3://", "names no bucket"),
        ("no/such/folder", "not a folder here, an S3 URL or a batch name"),
    ]:
        with pytest.raises(DataError, match=problem):
            open_source(text, settings)

"""The data lake against a real SeaweedFS S3 server: upload, list, split, cache, CLI."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.factories import add_broken_files, write_image_folder
from tirelib.cli import app
from tirelib.data import (
    TireImageDataset,
    VersionState,
    ensure_splits,
    ingest_version,
    list_versions,
    read_manifest,
    read_split,
    split_version,
    upload_version,
)
from tirelib.errors import VersionExistsError
from tirelib.settings import Settings
from tirelib.storage import ContentCache, ObjectStore, manifest_key, upload_marker_key

pytestmark = pytest.mark.integration


@pytest.fixture
def store(tire_env: Settings) -> ObjectStore:
    return ObjectStore.for_data(tire_env)


@contextmanager
def s3_calls(store: ObjectStore) -> Iterator[Counter[str]]:
    """The S3 operations the store's client makes inside the block, by name (a botocore hook)."""
    calls: Counter[str] = Counter()

    def count(model: Any, **_: Any) -> None:
        calls[model.name] += 1

    store.client.meta.events.register("before-call.s3", count)
    try:
        yield calls
    finally:
        store.client.meta.events.unregister("before-call.s3", count)


def test_upload_skips_broken_files_and_completes_the_rest(
    store: ObjectStore, tmp_path: Path
) -> None:
    write_image_folder(tmp_path, {"good": 20, "defective": 20})
    expected = add_broken_files(tmp_path / "good")
    report = upload_version(store, tmp_path, "v1", progress=False)
    assert report.uploaded == 40
    assert {s.path.rsplit("/", 1)[-1] for s in report.skipped} == set(expected)
    manifest = read_manifest(store, "v1")
    assert manifest.counts == {"defective": 20, "good": 20}
    assert len(manifest.skipped) == 4
    keys = {o.key for o in store.iter_objects("raw/v1/")}
    assert keys == {r.key for r in manifest.records} | {manifest_key("v1")}


def test_manifest_is_written_last(store: ObjectStore, tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"good": 5, "defective": 5})
    upload_version(store, tmp_path, "v1", progress=False)
    objects = list(store.iter_objects("raw/v1/"))
    manifest_time = store.client.head_object(Bucket=store.bucket, Key=manifest_key("v1"))
    image_times = [
        store.client.head_object(Bucket=store.bucket, Key=o.key)["LastModified"]
        for o in objects
        if o.key != manifest_key("v1")
    ]
    assert max(image_times) <= manifest_time["LastModified"]


def test_upload_is_idempotent_and_refuses_other_content(store: ObjectStore, tmp_path: Path) -> None:
    write_image_folder(tmp_path / "a", {"good": 6, "defective": 6})
    first = upload_version(store, tmp_path / "a", "v1", progress=False)
    again = upload_version(store, tmp_path / "a", "v1", progress=False)
    assert again.already_complete and again.uploaded == 0
    assert read_manifest(store, "v1").created_at == read_manifest(store, "v1").created_at
    write_image_folder(tmp_path / "b", {"good": 6, "defective": 7}, start=100)
    with pytest.raises(VersionExistsError, match="--force"):
        upload_version(store, tmp_path / "b", "v1", progress=False)
    assert read_manifest(store, "v1").counts == first.counts  # nothing lost
    replaced = upload_version(store, tmp_path / "b", "v1", force=True, progress=False)
    assert replaced.counts == {"defective": 7, "good": 6}
    keys = {o.key for o in store.iter_objects("raw/v1/")}
    assert len(keys) == 13 + 1  # the old images are gone, the manifest is there


def test_an_interrupted_upload_resumes_without_sending_again(
    store: ObjectStore, tmp_path: Path
) -> None:
    paths = write_image_folder(tmp_path, {"good": 8, "defective": 8})
    # Half an upload: some images there, no manifest.
    for path in paths["good"]:
        store.put_bytes(f"raw/v1/good/{path.name}", path.read_bytes())
    report = upload_version(store, tmp_path, "v1", progress=False)
    assert (report.uploaded, report.unchanged) == (8, 8)


def test_a_large_version_is_listed_and_split_in_full(store: ObjectStore, tmp_path: Path) -> None:
    # More than 1,000 keys: a listing that does not paginate would stop short.
    write_image_folder(tmp_path, {"good": 750, "defective": 750})
    upload_version(store, tmp_path, "big", progress=False)
    assert sum(1 for _ in store.iter_objects("raw/big/")) == 1501
    (info,) = list_versions(store)
    assert (info.version, info.total, info.complete, info.processed) == ("big", 1500, True, False)
    splits = split_version(store, "big")
    assert sum(len(m.records) for m in splits.values()) == 1500
    again = split_version(store, "big")
    for name in splits:
        assert read_split(store, "big", name) == again[name] == splits[name]


def test_the_cache_downloads_each_image_once(tire_env: Settings, tmp_path: Path) -> None:
    store = ObjectStore.for_data(tire_env)
    write_image_folder(tmp_path / "src", {"good": 30, "defective": 30})
    upload_version(store, tmp_path / "src", "v1", progress=False)
    split = split_version(store, "v1")["train"]
    cache = ContentCache(tmp_path / "cache")
    first = cache.fetch(store, ((r.key, r.sha256) for r in split.records), progress=False)
    assert first.downloaded == len(split.records) and first.cached == 0
    second = cache.fetch(store, ((r.key, r.sha256) for r in split.records), progress=False)
    assert second.downloaded == 0 and second.cached == len(split.records)
    dataset = TireImageDataset.from_split(split, cache, transform=lambda im: im.size)
    assert [dataset[i][1] for i in range(len(dataset))] == dataset.targets


def test_cli_upload_list_split(tire_env: Settings, tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"good": 40, "defective": 40})
    add_broken_files(tmp_path / "defective")
    runner = CliRunner()
    result = runner.invoke(app, ["data", "upload", str(tmp_path), "--version", "2026-11-24"])
    assert result.exit_code == 0, result.output
    assert "80 sent" in result.output and "4 skipped" in result.output
    listed = runner.invoke(app, ["data", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)
    assert row["counts"] == {"defective": 40, "good": 40} and row["processed"] is False
    split = runner.invoke(app, ["data", "split", "--version", "2026-11-24"])
    assert split.exit_code == 0, split.output
    assert "test" in split.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "upload", "{src}", "--version", "bad/name"], "invalid version name"),
        (["data", "split", "--version", "nope"], "not found"),
        (["data", "split", "--version", "v1", "--ratios", "0.5,0.5"], "ratios"),
    ],
)
def test_cli_bad_input_exits_2_with_a_message(
    tire_env: Settings,
    tmp_path: Path,
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tirelib.cli import main

    write_image_folder(tmp_path, {"good": 2, "defective": 2})
    with pytest.raises(SystemExit) as exit_info:
        main([a.replace("{src}", str(tmp_path)) for a in args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_upload_and_ingest_read_each_object_once_and_never_head_one(
    store: ObjectStore, tmp_path: Path
) -> None:
    write_image_folder(tmp_path, {"good": 12, "defective": 12})
    with s3_calls(store) as calls:
        upload_version(store, tmp_path, "v1", progress=False)
    # The images, the upload marker and the manifest; one GET finds there is no manifest yet.
    assert calls["PutObject"] == 24 + 2
    assert (calls["HeadObject"], calls["GetObject"], calls["ListObjectsV2"]) == (0, 1, 1)

    store.delete([manifest_key("v1")])  # as if another client had sent the images
    with s3_calls(store) as calls:
        report = ingest_version(store, "v1", cache=ContentCache(tmp_path / "cache"))
    assert report.written and report.counts == {"defective": 12, "good": 12}
    assert calls["HeadObject"] == 0
    assert calls["GetObject"] == 24 + 1  # each image once, and the manifest that is not there
    assert calls["ListObjectsV2"] == 1


def test_listing_takes_a_version_counts_from_one_head(store: ObjectStore, tmp_path: Path) -> None:
    write_image_folder(tmp_path / "a", {"good": 30, "defective": 20})
    upload_version(store, tmp_path / "a", "ours", progress=False)
    # A manifest written the old way, without its summary as metadata: read from the file.
    old = read_manifest(store, "ours")
    old.version = "older"
    store.put_json(manifest_key("older"), old.to_json())
    # An upload under way: no manifest, the marker among its objects.
    store.put_json(upload_marker_key("sending"), {"version": "sending"})
    store.put_bytes("raw/sending/good/x.png", b"image")

    with s3_calls(store) as calls:
        infos = {i.version: i for i in list_versions(store, settle_seconds=0)}
    assert infos["ours"].counts == infos["older"].counts == {"defective": 20, "good": 30}
    assert infos["ours"].created_at == old.created_at
    assert infos["sending"].state is VersionState.UPLOADING
    assert calls["HeadObject"] == 3  # one manifest each: never an object of a version
    assert calls["GetObject"] == 1  # the old manifest only
    # Dates of a listing are parsed by the standard library (dateutil's tzutc is not UTC).
    dates = [o.last_modified for o in store.iter_objects("raw/ours/")]
    assert {d.tzinfo if d else None for d in dates} == {UTC}


def test_splits_that_exist_are_read_with_one_get_each(store: ObjectStore, tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"good": 30, "defective": 30})
    upload_version(store, tmp_path, "v1", progress=False)
    made = split_version(store, "v1")
    with s3_calls(store) as calls:
        assert ensure_splits(store, "v1") == made
    assert (calls["GetObject"], calls["HeadObject"], calls["PutObject"]) == (3, 0, 0)

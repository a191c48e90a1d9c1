"""Versions uploaded by any S3 client: settle, ingest, train; failed versions never block others.

Images go in with plain boto3 ``put_object`` calls, as ``aws s3 sync`` or a camera gateway would
send them: no manifest, and junk beside the images.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.factories import png_bytes, upload_with_boto3
from tirelib import pipeline
from tirelib.cli import app, main
from tirelib.data import VersionState, list_versions, read_manifest
from tirelib.errors import DataError
from tirelib.settings import Settings
from tirelib.storage import ObjectStore, failed_key, manifest_key, processing_key
from tirelib.synth import generate

pytestmark = pytest.mark.integration

JUNK = {
    "good/notes.txt": (b"camera 7, shift B\n", "not an image"),
    "good/empty.png": (b"", "zero-byte file"),
    "good/.DS_Store": (b"\x00\x01binary junk", "hidden file"),
    "defective/corrupt.jpg": (None, "not decodable"),  # a JPEG cut in half, made below
}


def _corrupt_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 30)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


def sync_upload(settings: Settings, src: Path, version: str, *, junk: bool = True) -> int:
    """Upload ``src`` with plain boto3 calls, with the junk files beside the images."""
    extra = {n: _corrupt_jpeg() if d is None else d for n, (d, _) in JUNK.items()} if junk else {}
    return upload_with_boto3(settings, src, version, extra)


def _settled(settings: Settings) -> Settings:
    return settings.model_copy(update={"settle_seconds": 0})


def _skipped(store: ObjectStore, version: str) -> dict[str, str]:
    return {s.path: s.reason for s in read_manifest(store, version).skipped}


def _assert_junk_reported(store: ObjectStore, version: str) -> None:
    skipped = _skipped(store, version)
    assert set(skipped) == set(JUNK)
    for name, (_, reason) in JUNK.items():
        assert skipped[name].startswith(reason), (name, skipped[name])


def test_a_synced_version_settles_is_ingested_by_the_sensor_and_trains(
    tracked_env: Settings, tmp_path: Path
) -> None:
    generate(tmp_path / "src", 120, seed=5, size=64)
    images = sync_upload(tracked_env, tmp_path / "src", "synced")
    store = ObjectStore.for_data(tracked_env)

    # Just written: still uploading for the default settle period, so the sensor waits.
    (info,) = list_versions(store, settle_seconds=tracked_env.settle_seconds)
    assert info.state is VersionState.UPLOADING and not info.complete
    listed = CliRunner().invoke(app, ["data", "list"])
    assert listed.exit_code == 0 and "uploading" in listed.stdout, listed.output
    assert pipeline.poke_new_versions(tracked_env) == []
    assert not store.exists(manifest_key("synced"))

    # Settled: the sensor's poke ingests it and reports it ready.
    assert pipeline.poke_new_versions(_settled(tracked_env)) == ["synced"]
    manifest = read_manifest(store, "synced")
    assert len(manifest.records) == images
    assert manifest.source == "s3"
    _assert_junk_reported(store, "synced")
    assert pipeline.announce_versions() == {"version": "synced", "pending": ["synced"]}

    # A run started by hand without a version takes the newest waiting one, then trains on it.
    (job,) = pipeline.resolve_version({"epochs": 1})
    assert pipeline.version_of([job]) == "synced"
    assert pipeline.validate_data("synced")["skipped"] == len(JUNK)
    assert sum(pipeline.split("synced")["train"].values()) > 0
    trained = pipeline.train(job)
    assert trained["run_id"] and 0 <= trained["test_metrics"]["test_accuracy"] <= 1
    pipeline.mark_processed("synced", {"promotion": {}})
    assert pipeline.poke_new_versions(_settled(tracked_env)) == []
    with pytest.raises(DataError, match="no dataset version is waiting"):
        pipeline.resolve_version({})


def test_cli_ingest_is_idempotent_and_retry_clears_a_failed_mark(
    tire_env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for index, label in enumerate(["good", "defective"] * 10):
        folder = tmp_path / "src" / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{index:03d}.png").write_bytes(png_bytes(index, 16, label))
    sync_upload(tire_env, tmp_path / "src", "by-hand")
    store = ObjectStore.for_data(tire_env)
    runner = CliRunner()

    first = runner.invoke(app, ["data", "ingest", "--version", "by-hand"])
    assert first.exit_code == 0, first.output
    assert "ingested version by-hand (defective=10, good=10); 4 skipped" in first.stdout
    _assert_junk_reported(store, "by-hand")
    before = store.get_bytes(manifest_key("by-hand"))
    again = runner.invoke(app, ["data", "ingest", "--version", "by-hand"])
    assert again.exit_code == 0 and "already ingested" in again.stdout
    assert store.get_bytes(manifest_key("by-hand")) == before

    # A run takes it, then fails on bad data: marked failed, told once, skipped by the sensor.
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "manual__1")
    pipeline.resolve_version({"dataset_version": "by-hand"})
    assert store.exists(processing_key("by-hand"))
    failure = pipeline.TaskFailure(
        dag_id="tire_training_pipeline",
        task_id="validate_data",
        error=DataError("too few images"),
        run_id="manual__1",
        version="by-hand",
    )
    marker = pipeline.version_failed(failure, tire_env)
    assert marker is not None and marker["reason"] == "DataError: too few images"
    assert not store.exists(processing_key("by-hand"))
    assert pipeline.version_failed(failure, tire_env) == store.get_json(failed_key("by-hand"))
    assert pipeline.poke_new_versions(_settled(tire_env)) == []
    listed = runner.invoke(app, ["data", "list", "--json"])
    (row,) = json.loads(listed.stdout)
    assert row["state"] == "failed" and row["failure"]["task"] == "validate_data"

    retried = runner.invoke(app, ["data", "retry", "by-hand"])
    assert retried.exit_code == 0 and "cleared the failed mark" in retried.stdout
    assert not store.exists(failed_key("by-hand"))
    assert pipeline.poke_new_versions(_settled(tire_env)) == ["by-hand"]


def test_a_version_without_images_is_marked_failed_and_the_next_goes_ahead(
    tire_env: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk_only = {"good/notes.txt": b"junk", "good/.DS_Store": b"junk"}
    (tmp_path / "none").mkdir()
    upload_with_boto3(tire_env, tmp_path / "none", "a-junk", junk_only)
    (tmp_path / "good").mkdir()
    (tmp_path / "defective").mkdir()
    for index in range(4):
        (tmp_path / "good" / f"{index}.png").write_bytes(png_bytes(index, 16, "good"))
        (tmp_path / "defective" / f"{index}.png").write_bytes(png_bytes(index, 16, "defective"))
    sync_upload(tire_env, tmp_path, "b-fine", junk=False)

    with pytest.raises(SystemExit) as exit_info:
        main(["data", "ingest", "--version", "a-junk"])
    assert exit_info.value.code == 2
    assert "no usable images" in capsys.readouterr().err

    store = ObjectStore.for_data(tire_env)
    assert pipeline.poke_new_versions(_settled(tire_env)) == ["b-fine"]
    failure = store.get_json(failed_key("a-junk"))
    assert failure["task"] == "wait_for_new_version" and "no usable images" in failure["reason"]
    # The mark holds: the next look neither ingests it again nor reports it.
    assert pipeline.poke_new_versions(_settled(tire_env)) == ["b-fine"]
    states = {i.version: i.state for i in list_versions(store, settle_seconds=0)}
    assert states == {"a-junk": VersionState.FAILED, "b-fine": VersionState.NEW}

"""The command line against failing services and a user's Ctrl-C, as a shell runs it.

Each test runs ``python -m tirelib`` in a child process against the session's SeaweedFS and
checks the exit status, that no traceback is printed, and what is left behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tirelib.cli.exit_codes import ExitCode
from tirelib.data import VersionState, list_versions, upload_version
from tirelib.settings import Settings
from tirelib.stack import free_port
from tirelib.storage import (
    ObjectInfo,
    ObjectStore,
    manifest_key,
    raw_prefix,
    upload_marker_key,
)
from tirelib.synth import generate

pytestmark = pytest.mark.integration


def _tirelib(*args: str) -> list[str]:
    return [sys.executable, "-m", "tirelib", *args]


def test_train_with_mlflow_down_fails_soon_naming_the_server(
    tire_env: Settings, tmp_path: Path
) -> None:
    generate(tmp_path / "synth", 40, seed=3, size=32)
    upload_version(ObjectStore.for_data(tire_env), tmp_path / "synth", "down-1", progress=False)
    port = free_port()  # nothing listens there: every connection is refused
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://ops:pw-7f3a9@127.0.0.1:{port}"}
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        env.pop(name, None)  # tirelib's own defaults apply
    started = time.monotonic()
    done = subprocess.run(
        _tirelib("train", "--dataset-version", "down-1", "--epochs", "1"),
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    took = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == ExitCode.UNAVAILABLE, output[-3000:]
    # MLflow's own defaults would retry for about four minutes; tirelib's give up within ~15 s.
    assert took < 60, f"took {took:.0f} s"
    assert "Traceback" not in output
    assert f"MLflow tracking server at http://ops:***@127.0.0.1:{port}" in done.stderr
    assert "pw-7f3a9" not in output


def _noise_images(root: Path, count: int) -> None:
    """Incompressible images, so each transfer takes a little while."""
    rng = np.random.default_rng(5)
    for index in range(count):
        label = "good" if index % 2 else "defective"
        (root / label).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / label / f"{index:04d}.png")


def _objects(store: ObjectStore, version: str) -> dict[str, ObjectInfo]:
    """The version's images and manifest (not the uploader's own in-progress marker)."""
    return {
        o.key: o
        for o in store.iter_objects(raw_prefix(version))
        if o.key != upload_marker_key(version)
    }


def test_ctrl_c_stops_an_upload_at_once_and_the_next_run_resumes(
    tire_env: Settings, tmp_path: Path
) -> None:
    total, version = 240, "interrupted-1"
    _noise_images(tmp_path / "src", total)
    store = ObjectStore.for_data(tire_env)
    env = {**os.environ, "TIRE_S3_MAX_WORKERS": "1"}
    command = _tirelib("data", "upload", str(tmp_path / "src"), "--version", version)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 120
        while not _objects(store, version):  # the first files have arrived
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no object arrived within 120 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        interrupted_at = time.monotonic()
        stdout, stderr = process.communicate(timeout=60)
        stopped_after = time.monotonic() - interrupted_at
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == ExitCode.INTERRUPTED, stderr[-3000:]
    assert stopped_after < 10, f"took {stopped_after:.1f} s to stop"  # not every remaining file
    assert "Traceback" not in stdout + stderr
    match = re.search(r"sent (\d+) of (\d+) files", stderr)
    assert match, stderr
    sent, of = int(match[1]), int(match[2])
    there = _objects(store, version)
    assert of == total and 0 < sent < total
    assert len(there) == sent  # what it says it sent is exactly what is there
    assert manifest_key(version) not in there  # not complete, so no sensor takes it
    assert "again" in stderr  # it says how to resume
    # However long it waits to be resumed, the sensor does not ingest it half-sent.
    assert store.exists(upload_marker_key(version))
    waiting = {i.version: i.state for i in list_versions(store, settle_seconds=0)}
    assert waiting[version] is VersionState.UPLOADING

    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{total - sent} sent, {sent} already there" in again.stdout
    finished = _objects(store, version)
    assert len(finished) == total + 1
    manifest = finished[manifest_key(version)]
    images = [o.last_modified for k, o in finished.items() if k != manifest_key(version)]
    assert manifest.last_modified is not None and None not in images
    assert manifest.last_modified >= max(t for t in images if t is not None)  # written last
    assert not store.exists(upload_marker_key(version))
    assert {i.version: i.state for i in list_versions(store)}[version] is VersionState.NEW


def test_an_upload_reports_what_it_cannot_send_and_sends_the_rest(
    tire_env: Settings, tmp_path: Path
) -> None:
    generate(tmp_path / "src", 6, seed=4, size=32)
    image = next((tmp_path / "src" / "good").glob("*.png")).read_bytes()
    good = os.fsencode(tmp_path / "src" / "good")
    with open(os.path.join(good, b"tire-\xff.png"), "wb") as file:  # a name S3 cannot take
        file.write(image)
    os.mkfifo(tmp_path / "src" / "defective" / "pipe.png")  # reading it would block
    (tmp_path / "src" / "good" / "gone.png").symlink_to(tmp_path / "missing.png")
    done = subprocess.run(
        _tirelib("data", "upload", str(tmp_path / "src"), "--version", "odd-1"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "skipped good/tire-\\xff.png: file name is not valid UTF-8" in done.stderr
    assert "skipped defective/pipe.png: not a regular file" in done.stderr
    assert "skipped good/gone.png: broken symbolic link" in done.stderr
    assert "6 sent, 0 already there" in done.stdout and "3 skipped" in done.stdout
    manifest = ObjectStore.for_data(tire_env).get_json(manifest_key("odd-1"))
    assert {item["path"] for item in manifest["skipped"]} == {
        "good/tire-\\xff.png",
        "defective/pipe.png",
        "good/gone.png",
    }

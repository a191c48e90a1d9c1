"""Reading a source folder: every file that cannot be uploaded is reported, none vanishes.

Permissions mean nothing to root, so where the tests run as root the scan runs in a forked
child that has become the unprivileged user ``nobody``: the real ``open`` then fails with
``PermissionError``, as it does for a user.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tirelib.config import MAX_LABEL_LENGTH, MAX_VERSION_LENGTH, dag_params
from tirelib.data import scan_source, validate_name
from tirelib.errors import DataError


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def source() -> Iterator[Path]:
    """A source folder any user can read (pytest's own temporary folders are private)."""
    with tempfile.TemporaryDirectory(prefix="tire-scan-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        for label in ("good", "defective"):
            (root / label).mkdir()
            for index in range(2):
                (root / label / f"{index}.png").write_bytes(png(index))
        yield root


def _scan(root: Path) -> dict[str, object]:
    images, skipped, _ = scan_source(root)
    return {
        "images": sorted(f"{image.label}/{image.name}" for image in images),
        "skipped": {item.path: item.reason for item in skipped},
    }


def scan_as_user(root: Path) -> dict[str, object]:
    """``scan_source(root)`` as an unprivileged user: images and skipped files.

    As root, a forked child drops to ``nobody`` and scans: no new interpreter is started (its
    files may not be readable to that user), so every module the scan needs is loaded first.
    """
    if os.geteuid() != 0:
        return _scan(root)
    Image.init()  # the image plugins, loaded while their files are readable
    user = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            with os.fdopen(write_end, "w") as pipe:
                pipe.write(json.dumps(_scan(root)))
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the scan failed in the child"
    result: dict[str, object] = json.loads(text)
    return result


def test_an_unreadable_file_is_skipped_and_reported(source: Path) -> None:
    locked = source / "good" / "locked.png"
    locked.write_bytes(png(7))
    locked.chmod(0)
    found = scan_as_user(source)
    assert found["images"] == ["defective/0.png", "defective/1.png", "good/0.png", "good/1.png"]
    skipped = found["skipped"]
    assert isinstance(skipped, dict)
    assert "good/locked.png" in skipped
    assert "unreadable" in skipped["good/locked.png"]
    assert "Permission denied" in skipped["good/locked.png"]


def test_an_unreadable_folder_is_listed_as_skipped(source: Path) -> None:
    hidden_from_user = source / "good" / "batch-2"
    hidden_from_user.mkdir()
    (hidden_from_user / "a.png").write_bytes(png(8))
    hidden_from_user.chmod(0)
    found = scan_as_user(source)
    skipped = found["skipped"]
    assert isinstance(skipped, dict)
    assert "folder unreadable" in skipped["good/batch-2/"]
    assert found["images"] == ["defective/0.png", "defective/1.png", "good/0.png", "good/1.png"]


def test_a_name_that_is_not_utf8_is_skipped_before_anything_is_read(source: Path) -> None:
    bad = os.path.join(os.fsencode(source / "good"), b"tire-\xff.png")
    with open(bad, "wb") as file:
        file.write(png(9))
    images, skipped, _ = scan_source(source)
    assert len(images) == 4
    reasons = {item.path: item.reason for item in skipped}
    # Shown with the byte escaped, so it prints and goes into the JSON manifest as it is.
    assert "not valid UTF-8" in reasons["good/tire-\\xff.png"]
    json.dumps(reasons, ensure_ascii=False).encode("utf-8")


def test_links_and_special_files_are_reported_not_dropped(source: Path) -> None:
    (source / "good" / "gone.png").symlink_to(source / "good" / "missing.png")
    os.mkfifo(source / "defective" / "pipe.png")
    images, skipped, _ = scan_source(source)
    assert len(images) == 4
    reasons = {item.path: item.reason for item in skipped}
    assert reasons["good/gone.png"] == "broken symbolic link"
    assert reasons["defective/pipe.png"] == "not a regular file"


def test_a_file_name_too_long_for_an_s3_key_is_skipped(source: Path) -> None:
    deep = source / "good" / ("d" * 200) / ("e" * 200) / ("f" * 200) / ("g" * 200)
    deep.mkdir(parents=True)
    (deep / ("h" * 200 + ".png")).write_bytes(png(10))
    images, skipped, _ = scan_source(source)
    assert len(images) == 4
    assert any("too long for an S3 key" in item.reason for item in skipped)


@pytest.mark.parametrize("name", ["v1\n", "v1\r\n", "v" * (MAX_VERSION_LENGTH + 1), "v" * 2000])
def test_names_are_matched_whole_and_bounded(name: str) -> None:
    with pytest.raises(DataError, match=f"at most {MAX_VERSION_LENGTH} characters"):
        validate_name(name)


def test_the_longest_names_allowed_pass() -> None:
    assert validate_name("v" * MAX_VERSION_LENGTH)
    assert validate_name("l" * MAX_LABEL_LENGTH, "label")
    with pytest.raises(DataError, match=f"at most {MAX_LABEL_LENGTH} characters"):
        validate_name("l" * (MAX_LABEL_LENGTH + 1), "label")


@pytest.mark.parametrize("name", ["v1", "v" * MAX_VERSION_LENGTH, "v1\n", "v" * 2000, "-v"])
def test_the_dag_param_accepts_exactly_the_names_the_library_accepts(name: str) -> None:
    import jsonschema

    schema = {k: v for k, v in dag_params()["dataset_version"].items() if k != "default"}
    try:
        validate_name(name)
        valid = True
    except DataError:
        valid = False
    try:
        jsonschema.validate(name, schema)  # as Airflow checks a Param
        accepted = True
    except jsonschema.ValidationError:
        accepted = False
    assert accepted == valid

"""Dataset versions in the data lake: upload, ingest, list, split, and read back for training.

A version is the folder ``raw/<version>/`` with one sub-folder per label and a ``_manifest.json``
written last, whose presence means the version is complete: the uploader writes it, or
:func:`ingest_version` does for images any S3 client put there. Markers under ``state/`` say
where a version stands (:class:`VersionState`). Splits are decided by each image's
sha256, so an image keeps its split in every version and the test set never leaks into training.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import msgspec
from PIL import Image, UnidentifiedImageError

from tirelib.config import (
    MAX_LABEL_LENGTH,
    MAX_VERSION_LENGTH,
    NAME_RULE,
    VERSION_PATTERN,
    name_problem,
)
from tirelib.errors import DataError, UploadInterrupted, VersionExistsError
from tirelib.progress import progress_bar
from tirelib.settings import get_settings
from tirelib.storage import (
    CAPTURES_PREFIX,
    FAILED_PREFIX,
    FEEDBACK_PREFIX,
    PROCESSED_PREFIX,
    PROCESSING_PREFIX,
    RAW_PREFIX,
    ContentCache,
    ObjectInfo,
    ObjectStore,
    bounded_map,
    failed_key,
    manifest_key,
    parse_capture_name,
    processed_key,
    processing_key,
    raw_prefix,
    split_key,
    upload_marker_key,
)

log = logging.getLogger(__name__)

NAME_RE = re.compile(VERSION_PATTERN)
SPLITS = ("train", "val", "test")
DEFAULT_RATIOS = (0.7, 0.15, 0.15)
MANIFEST_FORMAT = 1
INGEST_SOURCE = "s3"  # the manifest's source when tirelib wrote it for objects already there
FEEDBACK_SOURCE = "feedback"  # the manifest's source of a version made from labelled captures
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def validate_name(value: str, what: str = "version") -> str:
    """Return ``value`` when it is a valid version or label name, else raise :class:`DataError`.

    The whole name must match (a trailing newline does not), within the length bound of
    :func:`tirelib.config.name_problem`; the message gives the rule.
    """
    problem = name_problem(value, what)
    if problem:
        raise DataError(problem)
    return value


def class_order(labels: Iterable[str]) -> list[str]:
    """The class index order: ``good`` first (index 0), then the other labels sorted."""
    return sorted(set(labels), key=lambda label: (label != "good", label))


def check_image(data: bytes) -> str | None:
    """Why ``data`` is not a usable image, or None when it decodes in full."""
    if not data:
        return "zero-byte file"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        # verify() checks the structure only; a full decode catches truncated pixel data.
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"not decodable ({error})"
    return None


@dataclass(frozen=True, slots=True)
class Record:
    """One image of a version: its key in the bucket, label, content hash and size."""

    key: str
    label: str
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class Skipped:
    """A source file left out of a version, and why."""

    path: str
    reason: str


# Manifests are encoded and decoded by msgspec in one pass between bytes and Records: no list
# of dicts beside the Records, and the bytes are made once, already indented.
_JSON_ENCODER = msgspec.json.Encoder(order="sorted")


def _encode_json(document: dict[str, Any]) -> bytes:
    """``document`` as indented JSON with sorted keys (dataclasses encoded as objects)."""
    return msgspec.json.format(_JSON_ENCODER.encode(document), indent=1)


class _ManifestDocument(msgspec.Struct):
    version: str
    created_at: str
    objects: list[Record]
    skipped: list[Skipped] = []
    source: str = ""


class _ManifestSummary(msgspec.Struct):
    """What a listing needs of a manifest: its ``objects`` are skipped, never built."""

    created_at: str
    labels: dict[str, int]
    skipped: list[msgspec.Raw] = []


class _SplitDocument(msgspec.Struct):
    version: str
    split: str
    classes: list[str]
    objects: list[Record]
    ratios: tuple[float, float, float] = DEFAULT_RATIOS


_MANIFEST_DECODER = msgspec.json.Decoder(_ManifestDocument)
_SUMMARY_DECODER = msgspec.json.Decoder(_ManifestSummary)
_SPLIT_DECODER = msgspec.json.Decoder(_SplitDocument)
# A manifest's summary rides along as user metadata (x-amz-meta-tire-summary), so a listing
# reads it with one HEAD; S3 allows 2 KB of metadata, a summary past this is left out.
SUMMARY_METADATA = "tire-summary"
MAX_SUMMARY_BYTES = 1536


@dataclass(frozen=True)
class ManifestSummary:
    """A manifest's creation time, images per label and number of skipped files."""

    created_at: str
    counts: dict[str, int]
    skipped: int

    def to_metadata(self) -> dict[str, str]:
        text = json.dumps(
            {"created_at": self.created_at, "labels": self.counts, "skipped": self.skipped},
            separators=(",", ":"),
            sort_keys=True,
        )
        return {SUMMARY_METADATA: text} if len(text) <= MAX_SUMMARY_BYTES else {}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> ManifestSummary | None:
        """The summary the manifest's metadata carries; None when absent or unreadable."""
        text = metadata.get(SUMMARY_METADATA)
        if not text:
            return None
        try:
            value = json.loads(text)
            return cls(str(value["created_at"]), dict(value["labels"]), int(value["skipped"]))
        except (ValueError, KeyError, TypeError):
            return None

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "manifest") -> ManifestSummary:
        try:
            value = _SUMMARY_DECODER.decode(data)
        except msgspec.DecodeError as error:  # ValidationError is one
            raise DataError(f"malformed {where}: {error}") from error
        return cls(value.created_at, dict(sorted(value.labels.items())), len(value.skipped))


@dataclass
class Manifest:
    """``raw/<version>/_manifest.json``: the complete content of a version."""

    version: str
    created_at: str
    records: list[Record]
    skipped: list[Skipped] = field(default_factory=list)
    source: str = ""

    @property
    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(r.label for r in self.records).items()))

    def content(self) -> set[tuple[str, str]]:
        return {(r.key, r.sha256) for r in self.records}

    def summary(self) -> ManifestSummary:
        return ManifestSummary(self.created_at, self.counts, len(self.skipped))

    def _document(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "created_at": self.created_at,
            "source": self.source,
            "labels": self.counts,
            "objects": self.records,
            "skipped": self.skipped,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            **self._document(),
            "objects": [asdict(r) for r in self.records],
            "skipped": [asdict(s) for s in self.skipped],
        }

    def to_bytes(self) -> bytes:
        """The manifest file: the same document as :meth:`to_json`, encoded in one pass."""
        return _encode_json(self._document())

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Manifest:
        try:
            return cls(
                version=value["version"],
                created_at=value["created_at"],
                records=[Record(**item) for item in value["objects"]],
                skipped=[Skipped(**item) for item in value.get("skipped", [])],
                source=value.get("source", ""),
            )
        except (KeyError, TypeError) as error:
            raise DataError(f"malformed manifest: missing or unexpected field {error}") from error

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "manifest") -> Manifest:
        """Decode a manifest file straight into :class:`Record` objects (no dicts between)."""
        try:
            value = _MANIFEST_DECODER.decode(data)
        except msgspec.DecodeError as error:  # ValidationError is one
            raise DataError(f"malformed {where}: {error}") from error
        return cls(value.version, value.created_at, value.objects, value.skipped, value.source)


# --- reading a source folder or annotation file ---------------------------------------------


@dataclass(frozen=True)
class LocalImage:
    """A source image checked and hashed; its bytes are read again when it is sent."""

    path: Path
    label: str
    name: str  # file name below the label folder in the bucket
    sha256: str
    md5: str
    size: int

    @classmethod
    def read(cls, path: Path, label: str, name: str) -> LocalImage | Skipped:
        """Hash and decode-check ``path``; a :class:`Skipped` says why it is not usable."""
        try:
            data = path.read_bytes()
        except OSError as error:  # no permission, an I/O error: report it, read the rest
            return Skipped(f"{label}/{name}", f"unreadable ({error.strerror or error})")
        reason = check_image(data)
        if reason:
            return Skipped(f"{label}/{name}", reason)
        return cls(path, label, name, hashlib.sha256(data).hexdigest(), _md5(data), len(data))


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


@dataclass(frozen=True)
class Candidate:
    """A file a source names, before it is read: where it is, its label, its name in the lake."""

    path: Path
    label: str
    name: str


# S3's limit on a key's length, in UTF-8 bytes.
S3_MAX_KEY_BYTES = 1024


def _shown(path: str) -> str:
    """``path`` printable and valid in JSON: a byte that is not UTF-8 is shown as ``\\xff``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _file_name_problem(label: str, name: str) -> str | None:
    """Why ``name`` cannot be a file's name below ``label`` in the lake, or None."""
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # a byte of the file system's name that is not UTF-8
        return "file name is not valid UTF-8 (an S3 key must be): rename the file"
    longest = len(raw_prefix("v" * MAX_VERSION_LENGTH)) + len(label) + 1 + size
    if longest > S3_MAX_KEY_BYTES:
        return f"file name too long for an S3 key ({size} bytes): shorten it or its folders"
    return None


def _walk(top: Path) -> list[tuple[Path, str | None]]:
    """Every entry below ``top`` that is not a folder, sorted, with why it cannot be uploaded
    (None: a regular file). A folder that cannot be listed is an entry of its own."""
    found: list[tuple[Path, str | None]] = []

    def unreadable(error: OSError) -> None:
        where = Path(error.filename) if error.filename else top
        reason = f"folder unreadable ({error.strerror or error}): its files are left out"
        found.append((where, reason))

    for folder, _, names in os.walk(top, onerror=unreadable):
        for name in names:
            path = Path(folder, name)
            try:
                if path.is_file():
                    found.append((path, None))
                elif path.is_symlink() and not path.exists():
                    found.append((path, "broken symbolic link"))
                else:  # a FIFO, a socket, a device: reading it could block or mean nothing
                    found.append((path, "not a regular file"))
            except OSError as error:
                found.append((path, f"unreadable ({error.strerror or error})"))
    return sorted(found, key=lambda item: item[0])


def scan_folder(root: Path) -> tuple[list[Candidate], list[Skipped]]:
    """Files below ``root/<label>/``; what cannot be uploaded is skipped with a reason.

    Nothing vanishes in silence: hidden files, files that are not regular (a FIFO, a broken
    link), names that are not UTF-8 or too long for an S3 key, and folders that cannot be read
    are each reported, before anything is read or sent.
    """
    candidates: list[Candidate] = []
    skipped: list[Skipped] = []
    try:
        entries = sorted(root.iterdir())
    except OSError as error:
        raise DataError(f"cannot read the folder {root}: {error.strerror or error}") from error
    label_dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not label_dirs:
        raise DataError(
            f"{root} has no class folders: expected one folder per label (good/, defective/, ...)"
        )
    for label_dir in label_dirs:
        label = validate_name(label_dir.name, "label")
        for path, problem in _walk(label_dir):
            shown = _shown(path.relative_to(root).as_posix())
            name = path.relative_to(label_dir).as_posix()
            if problem and path.is_dir():  # a folder that could not be listed
                skipped.append(Skipped(f"{shown}/", problem))
            elif problem:
                skipped.append(Skipped(shown, problem))
            elif _is_hidden(path, root):
                skipped.append(Skipped(shown, "hidden file"))
            elif reason := _file_name_problem(label, name):
                skipped.append(Skipped(shown, reason))
            else:
                candidates.append(Candidate(path, label, name))
    return candidates, skipped


def scan_annotation(path: Path) -> tuple[list[Candidate], list[Skipped]]:
    """Files listed in the earlier system's annotation JSON.

    The format is ``{"annotation": {"data": [{"FilePath": ..., "label_value": ...}]}}``;
    relative paths are relative to the JSON file's folder.
    """
    try:
        entries = json.loads(path.read_text())["annotation"]["data"]
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not valid JSON: {error}") from error
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from error
    except (KeyError, TypeError) as error:
        raise DataError(
            f"{path} is not an annotation file: expected "
            '{"annotation": {"data": [{"FilePath": ..., "label_value": ...}]}}'
        ) from error
    candidates: list[Candidate] = []
    skipped: list[Skipped] = []
    for index, entry in enumerate(entries):
        try:
            file_path, label = str(entry["FilePath"]), str(entry["label_value"])
        except (KeyError, TypeError):
            skipped.append(Skipped(f"entry {index}", "no FilePath or label_value"))
            continue
        label = validate_name(label, "label")
        source = Path(file_path)
        if not source.is_absolute():
            source = path.parent / source
        if source.name.startswith("."):
            skipped.append(Skipped(file_path, "hidden file"))
        elif reason := _file_name_problem(label, source.name):
            skipped.append(Skipped(_shown(file_path), reason))
        elif not source.is_file():
            skipped.append(Skipped(file_path, "file not found"))
        else:
            candidates.append(Candidate(source, label, source.name))
    return candidates, skipped


def _unique_names(images: list[LocalImage]) -> list[LocalImage]:
    """Two different files with one name under one label (annotation sources): keep both."""
    seen: dict[tuple[str, str], str] = {}
    result = []
    for image in images:
        if seen.setdefault((image.label, image.name), image.sha256) != image.sha256:
            stem, dot, suffix = image.name.rpartition(".")
            name = (
                f"{stem}-{image.sha256[:8]}{dot}{suffix}" if dot else f"{suffix}-{image.sha256[:8]}"
            )
            image = replace(image, name=name)
        result.append(image)
    return result


def scan_source(src: Path, *, max_workers: int = 4) -> tuple[list[LocalImage], list[Skipped], str]:
    """Read a folder of class folders or an annotation JSON; skip what is not an image."""
    if src.is_dir():
        candidates, skipped = scan_folder(src)
        kind = "folder"
    elif src.is_file() and src.suffix.lower() == ".json":
        candidates, skipped = scan_annotation(src)
        kind = "annotation"
    else:
        raise DataError(f"{src} is neither a folder of class folders nor an annotation .json file")
    found: list[tuple[int, LocalImage]] = []

    def read(item: tuple[int, Candidate]) -> tuple[int, LocalImage | Skipped]:
        index, candidate = item
        return index, LocalImage.read(candidate.path, candidate.label, candidate.name)

    for index, result in bounded_map(
        read, enumerate(candidates), max_workers=max_workers, name="scan"
    ):
        if isinstance(result, Skipped):
            skipped.append(result)
        else:
            found.append((index, result))
    found.sort(key=lambda pair: pair[0])  # the sources' order: names stay the same every run
    images = [image for _, image in found]
    for item in skipped:
        log.warning("skipped %s: %s", item.path, item.reason)
    return _unique_names(images), skipped, kind


# --- uploading -----------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadReport:
    version: str
    uploaded: int
    unchanged: int
    counts: dict[str, int]
    skipped: list[Skipped]
    already_complete: bool = False


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def upload_version(
    store: ObjectStore,
    src: Path,
    version: str,
    *,
    force: bool = False,
    max_workers: int = 16,
    progress: bool | None = None,
) -> UploadReport:
    """Upload ``src`` as dataset version ``version``, writing ``_manifest.json`` last.

    Uploading the same content again changes nothing. A version that exists with different
    content is refused unless ``force``, which replaces it (and forgets its splits and processed
    marker, so the pipeline runs on it again). Objects already there with the same bytes are not
    sent again, so an interrupted upload resumes where it stopped.
    """
    validate_name(version)
    images, skipped, kind = scan_source(src)
    if not images:
        raise DataError(f"{src} holds no usable images ({len(skipped)} skipped)")
    prefix = raw_prefix(version)
    records = [
        Record(f"{prefix}{image.label}/{image.name}", image.label, image.sha256, image.size)
        for image in images
    ]
    manifest = Manifest(version, _now(), records, skipped, kind)

    existing = _manifest_if_exists(store, version)
    if existing is not None:
        if existing.content() == manifest.content():
            log.info("version %s is already uploaded with the same content", version)
            return UploadReport(version, 0, len(records), manifest.counts, skipped, True)
        if not force:
            raise VersionExistsError(
                f"version {version!r} already exists with different content "
                f"({len(existing.records)} images there, {len(records)} here); "
                "choose a new version name or pass --force to replace it"
            )
        log.warning("replacing version %s (--force)", version)
        # Incomplete from here on, so a sensor never sees a half-replaced version.
        store.delete(
            [
                manifest_key(version),
                processed_key(version),
                processing_key(version),
                failed_key(version),
            ]
        )
        store.delete(split_key(version, s) for s in SPLITS)

    present = {o.key: o for o in store.iter_objects(prefix)}
    wanted = {r.key for r in records}
    todo: list[tuple[Record, LocalImage]] = []
    for record, image in zip(records, images, strict=True):
        there = present.get(record.key)
        # A single-part upload's ETag is the MD5 of its bytes: equal means already sent.
        if there and there.size == record.size and there.etag == image.md5:
            continue
        todo.append((record, image))
    own = {manifest_key(version), upload_marker_key(version)}
    stale = [key for key in present if key not in wanted and key not in own]
    if stale:
        store.delete(stale)
    # Until the manifest is written, this marks the version as an upload under way: the sensor
    # leaves it alone however long an interrupted upload waits to be resumed.
    store.put_json(
        upload_marker_key(version), {"version": version, "started_at": _now(), "files": len(todo)}
    )

    sent = itertools.count()  # next() is atomic: the threads count what reached the store

    def send(item: tuple[Record, LocalImage]) -> None:
        record, image = item
        content_type = _CONTENT_TYPES.get(image.path.suffix.lower(), "application/octet-stream")
        try:
            data = image.path.read_bytes()
        except OSError as error:
            raise DataError(
                f"cannot read {image.path} any more ({error.strerror or error}); it was "
                "readable when the upload began: fix it and upload again (what was sent stays)"
            ) from error
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise DataError(f"{image.path} changed while it was being uploaded; upload again")
        store.put_bytes(record.key, data, content_type)
        next(sent)

    with progress_bar(
        total=len(todo), desc=f"upload {version}", unit="img", enabled=progress
    ) as bar:
        # A bounded number of files in flight: memory does not grow with the version.
        results = bounded_map(send, todo, max_workers=max_workers, name="upload")
        try:
            for _ in results:
                bar.update()
        except BaseException as error:
            # Stop now: files not started never are, the few under way finish. Without
            # this, leaving would wait for every remaining file to be sent.
            results.close()
            done = next(sent)  # counted from 0: the number of files stored
            already = len(records) - len(todo)
            before = f" ({already} were there before)" if already else ""
            stopped = f"sent {done} of {len(todo)} files of version {version}{before}"
            if isinstance(error, KeyboardInterrupt):
                raise UploadInterrupted(
                    f"{stopped}; no manifest was written, so the version is not complete. "
                    "Run the same upload again to send the rest."
                ) from None
            log.warning("upload stopped: %s", stopped)
            raise
    write_manifest(store, manifest)
    store.delete([upload_marker_key(version)])
    log.info(
        "uploaded version %s: %d sent, %d already there",
        version,
        len(todo),
        len(records) - len(todo),
    )
    return UploadReport(version, len(todo), len(records) - len(todo), manifest.counts, skipped)


# --- version states ------------------------------------------------------------------------


class VersionState(StrEnum):
    """Where a version stands, as ``tirelib data list`` shows it."""

    UPLOADING = "uploading"  # objects without a manifest, changed within the settle period
    NEW = "new"  # waiting for the pipeline (a settled upload without a manifest is ingested first)
    PROCESSING = "processing"  # a pipeline run has taken it
    PROCESSED = "processed"  # the pipeline has finished with it
    FAILED = "failed"  # the pipeline gave up on it; `tirelib data retry` clears the mark


def decide_state(
    *,
    complete: bool,
    processed: bool = False,
    failed: bool = False,
    processing: bool = False,
    last_change: datetime | None = None,
    now: datetime | None = None,
    settle_seconds: float = 0,
    upload_open: bool = False,
) -> VersionState:
    """A version's state from its markers and, without a manifest, from its newest object.

    A failed mark wins over a processed one: a later run of a processed version that failed is
    what an operator needs to see. A version without a manifest is ``uploading`` until no
    object under it has changed for ``settle_seconds``; then it is ``new`` (to be ingested).
    """
    if failed:
        return VersionState.FAILED
    if processed:
        return VersionState.PROCESSED
    if processing:
        return VersionState.PROCESSING
    if complete:
        return VersionState.NEW
    if last_change is None or upload_open:  # tirelib's uploader has not finished (or resumes)
        return VersionState.UPLOADING
    age = ((now or datetime.now(UTC)) - last_change).total_seconds()
    return VersionState.NEW if age >= settle_seconds else VersionState.UPLOADING


@dataclass(frozen=True)
class VersionInfo:
    version: str
    complete: bool
    processed: bool
    created_at: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    state: VersionState = VersionState.NEW
    last_change: str | None = None  # newest object of a version without a manifest
    failure: dict[str, Any] | None = None  # the failed marker, when listed in detail

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def order(self) -> tuple[str, str]:
        """Oldest first: by creation time (newest upload for a version not ingested yet)."""
        return (self.created_at or self.last_change or "9999", self.version)


def write_manifest(store: ObjectStore, manifest: Manifest) -> None:
    """Write ``raw/<version>/_manifest.json``, its summary in the object's metadata."""
    store.put_bytes(
        manifest_key(manifest.version),
        manifest.to_bytes(),
        "application/json",
        metadata=manifest.summary().to_metadata(),
    )


def _manifest_if_exists(store: ObjectStore, version: str) -> Manifest | None:
    key = manifest_key(version)
    data = store.get_bytes_if_exists(key)  # one GET; a missing manifest is its 404
    return None if data is None else Manifest.from_bytes(data, f"s3://{store.bucket}/{key}")


def read_manifest(store: ObjectStore, version: str) -> Manifest:
    validate_name(version)
    manifest = _manifest_if_exists(store, version)
    if manifest is None:
        raise DataError(
            f"dataset version {version!r} not found (no {manifest_key(version)} in "
            f"s3://{store.bucket}); `tirelib data list` shows the versions there are"
        )
    return manifest


def read_summary(store: ObjectStore, version: str) -> ManifestSummary | None:
    """The counts of a complete version, None when it has no manifest.

    One HEAD request when the manifest carries its summary as metadata (tirelib writes it);
    otherwise the manifest is read, its objects skipped over without being built.
    """
    key = manifest_key(version)
    metadata = store.head(key)
    if metadata is None:
        return None
    summary = ManifestSummary.from_metadata(metadata)
    if summary is not None:
        return summary
    data = store.get_bytes_if_exists(key)
    return None if data is None else ManifestSummary.from_bytes(data, f"s3://{store.bucket}/{key}")


def _marked(store: ObjectStore, prefix: str) -> set[str]:
    return {
        o.key.removeprefix(prefix).removesuffix(".json")
        for o in store.iter_objects(prefix)
        if o.key.endswith(".json")
    }


def processed_versions(store: ObjectStore) -> set[str]:
    return _marked(store, PROCESSED_PREFIX)


def failed_versions(store: ObjectStore) -> set[str]:
    return _marked(store, FAILED_PREFIX)


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def last_change(store: ObjectStore, version: str) -> datetime | None:
    """When the newest object under ``raw/<version>/`` was written (S3's LastModified)."""
    return _scan_upload(store, version)[0]


def _scan_upload(store: ObjectStore, version: str) -> tuple[datetime | None, bool]:
    """The newest LastModified under ``raw/<version>/`` and whether the upload marker is
    there, from one paginated listing (no request per object)."""
    newest: datetime | None = None
    marker = upload_marker_key(version)
    open_upload = False
    for obj in store.iter_objects(raw_prefix(version)):
        open_upload = open_upload or obj.key == marker
        if obj.last_modified and (newest is None or obj.last_modified > newest):
            newest = obj.last_modified
    return newest, open_upload


def list_versions(
    store: ObjectStore,
    *,
    settle_seconds: float | None = None,
    detail: bool = True,
    max_workers: int = 8,
    now: datetime | None = None,
) -> list[VersionInfo]:
    """Every version in the lake with its state, oldest first.

    With ``detail`` each manifest is read for its counts and each failed marker for its
    reason; without, only versions still waiting are looked into (the sensor's cheap path: a
    marked version costs no request and is reported by its state alone, without counts).
    ``settle_seconds`` defaults to the ``TIRE_SETTLE_SECONDS`` setting.
    """
    if settle_seconds is None:
        settle_seconds = get_settings().settle_seconds
    now = now or datetime.now(UTC)
    names = [p.removeprefix(RAW_PREFIX).rstrip("/") for p in store.iter_prefixes(RAW_PREFIX)]
    processed = processed_versions(store)
    failed = failed_versions(store)
    processing = _marked(store, PROCESSING_PREFIX)

    def info(name: str) -> VersionInfo:
        done, gave_up, taken = name in processed, name in failed, name in processing
        failure = read_failure(store, name) if detail and gave_up else None
        if not detail and (done or gave_up or taken):
            state = decide_state(complete=True, processed=done, failed=gave_up, processing=taken)
            return VersionInfo(name, True, done, state=state)
        summary = read_summary(store, name)
        if summary is not None:
            state = decide_state(complete=True, processed=done, failed=gave_up, processing=taken)
            return VersionInfo(
                name,
                True,
                done,
                summary.created_at,
                summary.counts,
                summary.skipped,
                state,
                failure=failure,
            )
        changed, upload_open = _scan_upload(store, name)
        state = decide_state(
            complete=False,
            processed=done,
            failed=gave_up,
            processing=taken,
            last_change=changed,
            now=now,
            settle_seconds=settle_seconds,
            upload_open=upload_open,
        )
        return VersionInfo(
            name, False, done, state=state, last_change=_iso(changed), failure=failure
        )

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        infos = list(pool.map(info, names))
    return sorted(infos, key=lambda i: i.order)


def waiting_versions(
    store: ObjectStore, *, settle_seconds: float | None = None, now: datetime | None = None
) -> list[VersionInfo]:
    """Versions in state ``new``, oldest first: complete ones, and settled uploads to ingest."""
    infos = list_versions(store, settle_seconds=settle_seconds, detail=False, now=now)
    return [i for i in infos if i.state is VersionState.NEW]


def mark_processing(store: ObjectStore, version: str, run_id: str) -> None:
    """Record that pipeline run ``run_id`` has taken ``version`` (the sensor skips it)."""
    store.put_json(
        processing_key(version), {"version": version, "run_id": run_id, "started_at": _now()}
    )


def mark_processed(store: ObjectStore, version: str, summary: dict[str, Any]) -> None:
    """Record that the pipeline has finished with ``version`` (what the sensor checks)."""
    store.put_json(processed_key(version), {"version": version, "processed_at": _now(), **summary})
    # A successful run supersedes an earlier failure of the same version.
    store.delete([processing_key(version), failed_key(version)])


def mark_failed(store: ObjectStore, version: str, failure: dict[str, Any]) -> dict[str, Any]:
    """Write ``state/failed/<version>.json``: the sensor skips the version from now on.

    ``failure`` says why (``reason``, ``task``, ``run_url``, ``error``, ``kind``); the marker
    adds the version and the time. Returns what was written.
    """
    marker = {"version": version, "failed_at": _now(), **failure}
    store.put_json(failed_key(version), marker)
    store.delete([processing_key(version)])
    return marker


def release_version(store: ObjectStore, version: str, run_id: str) -> None:
    """Remove the processing mark run ``run_id`` wrote: the version is ``new`` again."""
    try:
        marker = store.get_json(processing_key(version))
    except DataError:  # no mark (or not JSON): nothing of this run's to remove
        return
    if isinstance(marker, dict) and marker.get("run_id") == run_id:
        store.delete([processing_key(version)])


def version_exists(store: ObjectStore, version: str) -> bool:
    """Whether the lake holds anything under ``raw/<version>/``."""
    return next(store.iter_objects(raw_prefix(version)), None) is not None


def read_failure(store: ObjectStore, version: str) -> dict[str, Any] | None:
    """The failed marker of ``version``, or None when it is not marked failed."""
    try:
        marker = store.get_json(failed_key(version))
    except DataError:  # no such object (a marker removed meanwhile), or not JSON
        return None
    return marker if isinstance(marker, dict) else {"reason": str(marker)}


def retry_version(store: ObjectStore, version: str) -> dict[str, Any] | None:
    """Clear the failed (and any processing) mark of ``version`` so the sensor takes it again.

    Returns the marker removed, or None when the version was not marked failed. Refuses a
    version the lake does not hold.
    """
    validate_name(version)
    failure = read_failure(store, version)
    if failure is None and not version_exists(store, version):
        raise DataError(
            f"dataset version {version!r} not found under s3://{store.bucket}/"
            f"{raw_prefix(version)}; `tirelib data list` shows the versions there are"
        )
    store.delete([failed_key(version), processing_key(version)])
    if failure is not None:
        log.info("cleared the failed mark of version %s (%s)", version, failure.get("reason"))
    return failure


# --- ingesting what any S3 client uploaded -------------------------------------------------


@dataclass(frozen=True)
class IngestReport:
    version: str
    counts: dict[str, int]
    skipped: list[Skipped]
    written: bool  # False when the manifest there already described the same images


def _object_problem(relative: str, size: int) -> str | None:
    """Why an object below ``raw/<version>/`` is not a candidate image, from its key alone."""
    parts = relative.split("/")
    if len(parts) < 2:
        return "not in a label folder (raw/<version>/<label>/<file>)"
    if any(part.startswith(".") for part in parts):
        return "hidden file"
    if name_problem(parts[0], "label"):
        return f"label folder name not allowed ({NAME_RULE}, at most {MAX_LABEL_LENGTH})"
    if size == 0:
        return "zero-byte file"
    return None


def ingest_version(
    store: ObjectStore,
    version: str,
    *,
    cache: ContentCache | None = None,
    max_workers: int = 16,
    source: str = INGEST_SOURCE,
) -> IngestReport:
    """Write the manifest of a version uploaded without one (``aws s3 sync``, a console, ...).

    Every object under ``raw/<version>/<label>/`` is read and checked: hidden, empty and
    undecodable files are left out and listed in the manifest's ``skipped`` with a reason.
    The manifest is written last, in the uploader's format. Ingesting again changes nothing
    when the images are the same; when they changed, the manifest is rewritten and the
    version's splits and processed mark are dropped, so the pipeline runs on it again.
    ``cache`` keeps the bytes read, so the pipeline does not download them a second time.
    ``source`` is what the manifest says the images came from.
    """
    validate_name(version)
    prefix = raw_prefix(version)
    objects = [
        o
        for o in store.iter_objects(prefix)
        if o.key not in {manifest_key(version), upload_marker_key(version)}
        and not o.key.endswith("/")  # "/": console folders
    ]
    skipped: list[Skipped] = []
    candidates = []
    for obj in objects:
        problem = _object_problem(obj.key.removeprefix(prefix), obj.size)
        if problem:
            skipped.append(Skipped(obj.key.removeprefix(prefix), problem))
        else:
            candidates.append(obj)

    def check(obj: ObjectInfo) -> Record | Skipped:
        data = store.get_bytes(obj.key)
        relative = obj.key.removeprefix(prefix)
        reason = check_image(data)
        if reason:
            return Skipped(relative, reason)
        sha = hashlib.sha256(data).hexdigest()
        if cache is not None:
            cache.put(sha, data, source=f"s3://{store.bucket}/{obj.key}")
        return Record(obj.key, relative.split("/", 1)[0], sha, len(data))

    records: list[Record] = []
    for result in bounded_map(check, candidates, max_workers=max_workers, name="ingest"):
        if isinstance(result, Skipped):
            skipped.append(result)
        else:
            records.append(result)
    skipped.sort(key=lambda s: s.path)
    for item in skipped:
        log.warning("version %s: skipped %s: %s", version, item.path, item.reason)
    if not records:
        examples = ", ".join(f"{s.path} ({s.reason})" for s in skipped[:5])
        raise DataError(
            f"version {version!r} has no usable images under s3://{store.bucket}/{prefix}"
            f"<label>/ ({len(objects)} object(s){': ' + examples if examples else ''}); "
            "upload images into one folder per label (good/, defective/, ...)"
        )
    newest = max((o.last_modified for o in objects if o.last_modified), default=None)
    records.sort(key=lambda r: r.key)
    manifest = Manifest(version, _iso(newest) or _now(), records, skipped, source)

    existing = _manifest_if_exists(store, version)
    if existing is not None:
        if existing.content() == manifest.content():
            log.info("version %s is ingested already with the same images", version)
            return IngestReport(version, manifest.counts, skipped, written=False)
        log.warning(
            "version %s changed since its manifest was written (%d images then, %d now): "
            "writing it again and dropping its splits",
            version,
            len(existing.records),
            len(records),
        )
        store.delete([manifest_key(version), processed_key(version)])
        store.delete(split_key(version, s) for s in SPLITS)
    write_manifest(store, manifest)
    store.delete([upload_marker_key(version)])  # an interrupted upload, taken as it is
    log.info(
        "ingested version %s: %s, %d skipped",
        version,
        ", ".join(f"{label}={n}" for label, n in manifest.counts.items()),
        len(skipped),
    )
    return IngestReport(version, manifest.counts, skipped, written=True)


# --- production data back into training ----------------------------------------------------


@dataclass(frozen=True)
class Feedback:
    """One line of ``feedback/<date>/<part>.jsonl``: the true label of one served instance."""

    request_id: str
    index: int
    label: str | None  # null: the sender did not know
    predicted_class: str | None = None
    model_version: str | None = None
    time: str | None = None

    @classmethod
    def parse(cls, line: str) -> Feedback:
        """A record from one JSON line; :class:`DataError` saying what is wrong with it."""
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"not JSON ({error.msg})") from error
        if not isinstance(value, dict):
            raise DataError("not a JSON object")
        request_id, index, label = value.get("request_id"), value.get("index"), value.get("label")
        if not isinstance(request_id, str) or not request_id:
            raise DataError("no request_id")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise DataError(f"index {index!r} is not a non-negative integer")
        if label is not None and not isinstance(label, str):
            raise DataError(f"label {label!r} is neither a class name nor null")

        def text(name: str) -> str | None:
            item = value.get(name)
            return None if item is None else str(item)

        return cls(
            request_id, index, label, text("predicted_class"), text("model_version"), text("time")
        )


def parse_day(text: str) -> date:
    """A ``YYYY-MM-DD`` date (``--since``, a ``feedback/<date>/`` folder)."""
    try:
        return date.fromisoformat(text)
    except ValueError as error:
        raise DataError(f"{text!r} is not a date: expected YYYY-MM-DD, like 2026-11-24") from error


def _day_folders(store: ObjectStore, prefix: str, since: date | None) -> list[tuple[date, str]]:
    """The ``<prefix><YYYY-MM-DD>/`` folders from ``since`` on, oldest first."""
    days = []
    for folder in store.iter_prefixes(prefix):
        name = folder.removeprefix(prefix).rstrip("/")
        try:
            day = parse_day(name)
        except DataError:
            log.warning("ignoring s3://%s/%s: not a date folder", store.bucket, folder)
            continue
        if since is None or day >= since:
            days.append((day, folder))
    return sorted(days)


def read_feedback(
    store: ObjectStore, *, since: date | None = None
) -> tuple[list[Feedback], list[Skipped]]:
    """Every feedback record from ``since`` on (all without it), and the lines that are not one.

    A request's instance labelled more than once keeps its last label (by ``time``, then by the
    order written): a later correction wins.
    """
    records: dict[tuple[str, int], Feedback] = {}
    malformed: list[Skipped] = []
    for _, folder in _day_folders(store, FEEDBACK_PREFIX, since):
        for obj in store.iter_objects(folder):
            if not obj.key.endswith(".jsonl"):
                continue
            text = store.get_bytes(obj.key).decode("utf-8", "replace")
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = Feedback.parse(line)
                except DataError as error:
                    malformed.append(Skipped(f"{obj.key}:{number}", str(error)))
                    continue
                key = (record.request_id, record.index)
                earlier = records.get(key)
                if earlier is None or (record.time or "") >= (earlier.time or ""):
                    records[key] = record
    return list(records.values()), malformed


def captures(store: ObjectStore) -> dict[tuple[str, int], str]:
    """Every captured image's key by ``(request id, index)``, from all ``captures/<date>/``.

    All dates: an image is captured when it is served, and its label may come days later.
    """
    found: dict[tuple[str, int], str] = {}
    for _, folder in _day_folders(store, CAPTURES_PREFIX, None):
        for obj in store.iter_objects(folder):
            name = obj.key.removeprefix(folder)
            parsed = parse_capture_name(name) if "/" not in name else None
            if parsed is not None and obj.size > 0:
                found[parsed] = obj.key
    return found


@dataclass(frozen=True)
class FeedbackReport:
    """What :func:`version_from_feedback` did, and what it could not use."""

    version: str
    counts: dict[str, int]  # labelled captures in the version, by label
    feedback: int  # feedback records read (one per labelled instance, corrections folded)
    no_capture: int  # labelled, but the image was not captured (sampling)
    null_labels: int  # records whose label is null
    skipped: list[Skipped]  # malformed lines, bad labels, captures that are no image
    written: bool  # False when the version was made before from the same captures

    @property
    def used(self) -> int:
        return sum(self.counts.values())


def version_from_feedback(
    store: ObjectStore,
    version: str,
    *,
    since: date | None = None,
    max_workers: int = 16,
    progress: bool | None = None,
) -> FeedbackReport:
    """Make dataset version ``version`` from labelled production images.

    Feedback records (``feedback/<date>/<part>.jsonl``, from ``since`` on) are joined on
    ``(request id, index)`` with the captured images (``captures/<date>/<request id>-<i>.<ext>``);
    each pair is copied to ``raw/<version>/<label>/<request id>-<i>.<ext>`` and the version is
    then ingested as any S3 upload is (:func:`ingest_version`: every image checked, the manifest
    written last, source ``feedback``), so the sensor takes it like any other version. While the
    copies are made, ``_upload.json`` keeps the sensor away. A version that exists with other
    content is refused; running the same command again finishes an interrupted run or, when the
    version is complete with the same images, changes nothing.
    """
    validate_name(version)
    records, skipped = read_feedback(store, since=since)
    images = captures(store)
    prefix = raw_prefix(version)
    planned: dict[str, str] = {}  # raw key -> capture key
    no_capture = null_labels = 0
    for record in records:
        if record.label is None:
            null_labels += 1
            continue
        problem = name_problem(record.label, "label")
        if problem:
            skipped.append(Skipped(f"{record.request_id}-{record.index}", problem))
            continue
        capture = images.get((record.request_id, record.index))
        if capture is None:
            no_capture += 1
            continue
        planned[f"{prefix}{record.label}/{capture.rsplit('/', 1)[-1]}"] = capture
    where = "" if since is None else f" since {since.isoformat()}"
    if not planned:
        raise DataError(
            f"no labelled capture to make version {version!r} from{where}: {len(records)} "
            f"feedback record(s), {null_labels} without a label, {no_capture} without a "
            f"captured image (captures are sampled), {len(skipped)} unusable"
        )
    present = {
        o.key: o
        for o in store.iter_objects(prefix)
        if o.key not in {manifest_key(version), upload_marker_key(version)}
    }
    complete = store.exists(manifest_key(version))
    if set(present) - set(planned) or (complete and set(present) != set(planned)):
        raise VersionExistsError(
            f"version {version!r} already exists with other images ({len(present)} there, "
            f"{len(planned)} from feedback{where}); choose a new version name"
        )
    todo = [(key, capture) for key, capture in sorted(planned.items()) if key not in present]
    if todo:
        store.put_json(
            upload_marker_key(version),
            {"version": version, "started_at": _now(), "files": len(todo), "source": "feedback"},
        )

    def copy(key: str, capture: str) -> None:
        suffix = Path(key).suffix.lower()
        content_type = _CONTENT_TYPES.get(suffix, "application/octet-stream")
        store.put_bytes(key, store.get_bytes(capture), content_type)

    with progress_bar(
        total=len(todo), desc=f"captures -> {version}", unit="img", enabled=progress
    ) as bar:
        for _ in bounded_map(
            lambda pair: copy(*pair), todo, max_workers=max_workers, name="feedback"
        ):
            bar.update()
    report = ingest_version(store, version, max_workers=max_workers, source=FEEDBACK_SOURCE)
    log.info(
        "version %s from feedback%s: %d labelled capture(s) (%s); %d record(s) without a "
        "capture, %d with a null label, %d skipped",
        version,
        where,
        sum(report.counts.values()),
        ", ".join(f"{label}={n}" for label, n in report.counts.items()),
        no_capture,
        null_labels,
        len(skipped) + len(report.skipped),
    )
    return FeedbackReport(
        version,
        report.counts,
        len(records),
        no_capture,
        null_labels,
        skipped + report.skipped,
        report.written,
    )


# --- splitting -----------------------------------------------------------------------------


def parse_ratios(text: str) -> tuple[float, float, float]:
    """Parse ``"0.7,0.15,0.15"``: three positive fractions for train, val and test summing to 1."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError as error:
        raise DataError(
            f"invalid ratios {text!r}: expected three numbers like 0.7,0.15,0.15"
        ) from error
    return check_ratios(values)


def check_ratios(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) != 3 or any(not 0 < v < 1 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise DataError(
            f"invalid ratios {list(values)}: expected three fractions between 0 and 1 "
            "(train, val, test) that sum to 1, like 0.7,0.15,0.15"
        )
    return (values[0], values[1], values[2])


def assign_split(sha256: str, ratios: Sequence[float] = DEFAULT_RATIOS) -> str:
    """The split of an image, decided by its content hash alone.

    The first 64 bits of the sha256 give a uniform number in [0, 1); the ratios cut that range.
    Within each label this is a uniform draw, so splits are stratified in expectation, and an
    image never changes split as versions accumulate.
    """
    point = int(sha256[:16], 16) / 2**64
    if point < ratios[0]:
        return "train"
    if point < ratios[0] + ratios[1]:
        return "val"
    return "test"


@dataclass
class SplitManifest:
    """``splits/<version>/<split>.json``."""

    version: str
    split: str
    classes: list[str]
    records: list[Record]
    ratios: tuple[float, float, float] = DEFAULT_RATIOS

    @property
    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(r.label for r in self.records).items()))

    def _document(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "split": self.split,
            "classes": self.classes,
            "ratios": list(self.ratios),
            "labels": self.counts,
            "objects": self.records,
        }

    def to_json(self) -> dict[str, Any]:
        return {**self._document(), "objects": [asdict(r) for r in self.records]}

    def to_bytes(self) -> bytes:
        """The split file: the document of :meth:`to_json`, encoded in one pass."""
        return _encode_json(self._document())

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "split manifest") -> SplitManifest:
        try:
            value = _SPLIT_DECODER.decode(data)
        except msgspec.DecodeError as error:  # ValidationError is one
            raise DataError(f"malformed {where}: {error}") from error
        return cls(value.version, value.split, value.classes, value.objects, value.ratios)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> SplitManifest:
        try:
            ratios = value.get("ratios", DEFAULT_RATIOS)
            return cls(
                value["version"],
                value["split"],
                list(value["classes"]),
                [Record(**item) for item in value["objects"]],
                (ratios[0], ratios[1], ratios[2]),
            )
        except (KeyError, TypeError, IndexError) as error:
            raise DataError(f"malformed split manifest: {error}") from error


def make_splits(
    manifest: Manifest,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    *,
    min_per_label: int = 1,
) -> dict[str, SplitManifest]:
    """Split a version by content hash; refuse data that would give meaningless splits."""
    ratios = check_ratios(ratios)
    classes = class_order(r.label for r in manifest.records)
    if len(classes) < 2:
        raise DataError(
            f"version {manifest.version!r} has {len(classes)} label(s) {classes}: "
            "a classifier needs at least two (good/ and defective/)"
        )
    # One pass in key order: the first record of each image stands for it (duplicates would
    # only weigh it more), and an image under a second label is a conflict.
    unique: dict[str, Record] = {}
    conflicts: set[str] = set()
    for record in sorted(manifest.records, key=lambda r: r.key):
        first = unique.setdefault(record.sha256, record)
        if first.label != record.label:
            conflicts.add(record.sha256)
    if conflicts:
        examples = [f"{r.key} ({r.label})" for r in manifest.records if r.sha256 in conflicts][:6]
        raise DataError(
            f"{len(conflicts)} image(s) appear under more than one label in version "
            f"{manifest.version!r}: {', '.join(examples)}; fix the labels and upload again"
        )
    parts: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for record in unique.values():  # in key order, as inserted
        parts[assign_split(record.sha256, ratios)].append(record)
    problems = []
    for split, records in parts.items():
        counts = Counter(r.label for r in records)
        for label in classes:
            if counts[label] < min_per_label:
                problems.append(f"{split} has {counts[label]} '{label}' image(s)")
    if problems:
        raise DataError(
            f"version {manifest.version!r} is too small to split with ratios {list(ratios)}: "
            f"{'; '.join(problems)} (at least {min_per_label} of each label per split needed; "
            "add images or change --ratios)"
        )
    return {s: SplitManifest(manifest.version, s, classes, parts[s], ratios) for s in SPLITS}


def split_version(
    store: ObjectStore,
    version: str,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    *,
    min_per_label: int = 1,
) -> dict[str, SplitManifest]:
    """Write ``splits/<version>/{train,val,test}.json`` and return them."""
    splits = make_splits(read_manifest(store, version), ratios, min_per_label=min_per_label)
    for split, manifest in splits.items():
        store.put_bytes(split_key(version, split), manifest.to_bytes(), "application/json")
    log.info("split %s: %s", version, ", ".join(f"{s}={len(m.records)}" for s, m in splits.items()))
    return splits


def _split_if_exists(store: ObjectStore, version: str, split: str) -> SplitManifest | None:
    key = split_key(version, split)
    data = store.get_bytes_if_exists(key)  # one GET; a missing split is its 404
    return None if data is None else SplitManifest.from_bytes(data, f"s3://{store.bucket}/{key}")


def read_split(store: ObjectStore, version: str, split: str) -> SplitManifest:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    manifest = _split_if_exists(store, version, split)
    if manifest is None:
        raise DataError(
            f"version {version!r} has no {split} split yet; "
            f"run `tirelib data split --version {version}`"
        )
    return manifest


def ensure_splits(
    store: ObjectStore, version: str, ratios: Sequence[float] = DEFAULT_RATIOS
) -> dict[str, SplitManifest]:
    """The version's splits, making them first when they do not exist yet."""
    found: dict[str, SplitManifest] = {}
    for split in SPLITS:
        manifest = _split_if_exists(store, version, split)
        if manifest is None:
            return split_version(store, version, ratios)
        found[split] = manifest
    return found


# --- reading for training ------------------------------------------------------------------


class TireImageDataset:
    """A map-style dataset over a split, read from the local content cache.

    ``DataLoader`` needs only ``__len__`` and ``__getitem__``. Items are ``(transform(image),
    class_index)`` with the image decoded as RGB. :meth:`prepare` downloads what is missing
    (parallel, checksummed) and, within ``memory_mb``, decodes every image once into memory, in
    parallel; an epoch then neither touches the network nor decodes a file again. Images past
    the budget are decoded from the disk cache on each access.
    """

    def __init__(
        self,
        records: Sequence[Record],
        classes: Sequence[str],
        cache: ContentCache,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        memory_mb: int = 2048,
    ) -> None:
        unknown = {r.label for r in records} - set(classes)
        if unknown:
            raise DataError(f"labels {sorted(unknown)} are not among the classes {list(classes)}")
        self.records = list(records)
        self.classes = list(classes)
        self.class_to_index = {name: i for i, name in enumerate(classes)}
        self.cache = cache
        self.transform = transform
        self.memory_mb = memory_mb
        self._decoded: dict[int, Image.Image] = {}

    @classmethod
    def from_split(
        cls,
        split: SplitManifest,
        cache: ContentCache,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        memory_mb: int = 2048,
    ) -> TireImageDataset:
        return cls(split.records, split.classes, cache, transform, memory_mb=memory_mb)

    def prepare(
        self, store: ObjectStore, *, max_workers: int = 16, progress: bool | None = None
    ) -> None:
        """Download what the cache lacks, decoding into memory what the budget allows.

        Downloaded images are decoded from the bytes in hand, in the download threads; cached
        ones are decoded from disk in parallel (Pillow releases the GIL while it decodes).
        """
        by_sha: dict[str, list[int]] = {}
        for index, record in enumerate(self.records):
            by_sha.setdefault(record.sha256, []).append(index)
        budget = [self.memory_mb * 2**20]
        lock = threading.Lock()

        def keep(sha: str, image: Image.Image) -> None:
            size = image.width * image.height * 3
            with lock:
                if size > budget[0]:
                    return
                budget[0] -= size
                for index in by_sha[sha]:
                    self._decoded[index] = image

        def decode_bytes(sha: str, data: bytes) -> None:
            with Image.open(io.BytesIO(data)) as raw:
                keep(sha, raw.convert("RGB"))

        cached = [sha for sha in by_sha if self.cache.has(sha)]
        self.cache.fetch(
            store,
            ((r.key, r.sha256) for r in self.records),
            max_workers=max_workers,
            progress=progress,
            on_download=decode_bytes,
        )

        def decode_cached(sha: str) -> tuple[str, Image.Image]:
            return sha, self._load_sha(sha)

        threads = max(2, min(max_workers, 8))
        for sha, image in bounded_map(decode_cached, cached, max_workers=threads, name="decode"):
            keep(sha, image)
        if len(self._decoded) < len(self.records):
            log.info(
                "%d of %d images decoded in memory (budget %d MB); the rest are read from disk",
                len(self._decoded),
                len(self.records),
                self.memory_mb,
            )

    def _load_sha(self, sha: str) -> Image.Image:
        with Image.open(self.cache.path(sha)) as raw:
            return raw.convert("RGB")

    def _load(self, index: int) -> Image.Image:
        record = self.records[index]
        try:
            return self._load_sha(record.sha256)
        except FileNotFoundError as error:
            raise DataError(f"{record.key} is not in the cache; call prepare() first") from error

    @property
    def targets(self) -> list[int]:
        return [self.class_to_index[r.label] for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self._decoded.get(index) or self._load(index)
        target = self.class_to_index[self.records[index].label]
        return (self.transform(image) if self.transform else image), target

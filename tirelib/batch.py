"""Batch prediction: score many images with the production model, one JSON line per image.

A source is a local folder (every file below it), an S3 prefix (``s3://bucket/prefix/``) or a
batch name, which means ``s3://<data bucket>/inbox/<batch>/``. Images are read and decoded in
parallel, a batch of them ahead of the network, and scored ``TIRE_PREDICT_BATCH_SIZE`` at a time
by the logged model (its own preprocessing and class names, as the server uses them). Each line::

    {"key": "inbox/b1/tire-7.png", "label": "defective",
     "probabilities": {"good": 0.03, "defective": 0.97},
     "model_name": "tire-defect-classifier", "model_version": "4"}

An image that cannot be read or decoded gets a line with ``"error"`` instead of a label and
probabilities; the rest of the batch is scored. Lines come in key order, so the same batch and
model give the same file. The ``tire_batch_predict`` DAG scores each settled ``inbox/<batch>/``
into ``predictions/<batch>.jsonl``, whose presence means the batch is done.

Nothing heavy is imported here at module level: the sensor's poke lists batches without torch
or MLflow; :func:`load_model` imports them when a model is needed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from tirelib.data import NAME_RE, validate_name
from tirelib.errors import DataError, RegistryError
from tirelib.progress import progress_bar
from tirelib.settings import Settings
from tirelib.storage import (
    INBOX_PREFIX,
    PREDICTIONS_PREFIX,
    ObjectStore,
    inbox_prefix,
    predictions_key,
    s3_client,
)

if TYPE_CHECKING:
    import torch

    from tirelib.pyfunc import TireClassifier

log = logging.getLogger(__name__)

JSONL_CONTENT_TYPE = "application/x-ndjson"


# --- where the images come from --------------------------------------------------------------


class Source(Protocol):
    """Images to score: their keys, in order, and each one's bytes."""

    @property
    def where(self) -> str: ...

    def keys(self) -> list[str]: ...

    def read(self, key: str) -> bytes:
        """The bytes of ``key``; :class:`DataError` when this one image cannot be read."""
        ...


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


@dataclass(frozen=True)
class FolderSource:
    """Every regular file below a local folder, hidden ones aside; keys are relative paths."""

    root: Path

    @property
    def where(self) -> str:
        return str(self.root)

    def keys(self) -> list[str]:
        found = []
        for folder, _, names in os.walk(self.root):
            for name in names:
                path = Path(folder, name)
                relative = path.relative_to(self.root).as_posix()
                if not _hidden(relative) and path.is_file():
                    found.append(relative)
        return sorted(found)

    def read(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except OSError as error:  # no permission, removed meanwhile: this image only
            raise DataError(f"unreadable ({error.strerror or error})") from error


@dataclass(frozen=True)
class S3Source:
    """Every object below a prefix of a bucket, hidden ones aside; keys are the object keys."""

    store: ObjectStore
    prefix: str

    @property
    def where(self) -> str:
        return f"s3://{self.store.bucket}/{self.prefix}"

    def keys(self) -> list[str]:
        return sorted(
            o.key
            for o in self.store.iter_objects(self.prefix)
            if not o.key.endswith("/")  # console "folders"
            and not _hidden(o.key.removeprefix(self.prefix))
        )

    def read(self, key: str) -> bytes:
        return self.store.get_bytes(key)  # a vanished object is DataError, an outage is not


def open_source(text: str, settings: Settings) -> Source:
    """The source ``text`` names: ``s3://bucket/prefix``, a local folder, or a batch name.

    A name that is neither a folder here nor an S3 URL is a batch under the data bucket's
    ``inbox/``. Anything else is refused with the three forms allowed.
    """
    if text.startswith("s3://"):
        bucket, _, prefix = text.removeprefix("s3://").partition("/")
        if not bucket:
            raise DataError(f"{text!r} names no bucket: expected s3://bucket/prefix/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"  # a folder, never a key that merely starts the same way
        return S3Source(ObjectStore(s3_client(settings), bucket), prefix)
    path = Path(text)
    if path.is_dir():
        return FolderSource(path)
    if path.exists():
        raise DataError(
            f"{text} is a file: give a folder of images, s3://bucket/prefix/ or a batch name"
        )
    if NAME_RE.fullmatch(text):
        return S3Source(ObjectStore.for_data(settings), inbox_prefix(text))
    raise DataError(
        f"{text!r} is not a folder here, an S3 URL or a batch name: expected a local folder, "
        f"s3://bucket/prefix/ or the name of a batch under s3://{settings.data_bucket}/"
        f"{INBOX_PREFIX}"
    )


# --- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """A registered model version in memory, with the name and version every line carries."""

    name: str
    version: str
    classifier: TireClassifier

    @property
    def classes(self) -> list[str]:
        return list(self.classifier.classes)


def load_model(settings: Settings, *, version: str | None = None) -> LoadedModel:
    """Version ``version`` of ``TIRE_MODEL_NAME``, by default the one ``@production`` names.

    The alias is read once and that version is loaded by number, so a promotion meanwhile cannot
    mix two models in one batch. No production version is :class:`RegistryError`; an MLflow
    that cannot be reached is :class:`~tirelib.errors.RegistryUnavailableError` (retryable).
    """
    import mlflow.pyfunc

    from tirelib.pyfunc import TireClassifier
    from tirelib.registry.client import RegistryClient
    from tirelib.registry.results import PRODUCTION

    client = RegistryClient(settings)
    name = client.name
    if version is None:
        with client.errors(f"reading the {PRODUCTION} alias of {name!r}"):
            version = client.aliases().get(PRODUCTION)
        if version is None:
            raise RegistryError(
                f"model {name!r} has no {PRODUCTION} version at {client.where}: promote one "
                "first (`tirelib registry produce`), or name a version with --model-version"
            )
    else:
        with client.errors(f"reading version {version} of {name!r}"):
            client.version(version)  # an unknown version names the versions there are
    uri = f"models:/{name}/{version}"
    saved_path = list(sys.path)  # load_model prepends the model's code folder
    try:
        with (
            tempfile.TemporaryDirectory(prefix="tire-batch-") as tmp,
            client.errors(f"loading {uri}"),
        ):
            loaded = mlflow.pyfunc.load_model(uri, dst_path=tmp)
    finally:
        sys.path[:] = saved_path
    classifier = loaded.unwrap_python_model()
    if not isinstance(classifier, TireClassifier):
        raise RegistryError(
            f"{uri} is not a tire classifier (its python model is {type(classifier).__name__})"
        )
    log.info("scoring with %s (classes %s)", uri, ", ".join(classifier.classes))
    return LoadedModel(name, str(version), classifier)


# --- scoring -----------------------------------------------------------------------------------


@dataclass
class BatchReport:
    """What a batch prediction did: lines written, labels predicted, images that failed."""

    source: str
    model_name: str
    model_version: str
    counts: dict[str, int] = field(default_factory=dict)  # predicted label -> images
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, why)
    output: str | None = None

    @property
    def scored(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, Any]:
        """Small JSON for XCom and ``--json``."""
        return {
            "source": self.source,
            "output": self.output,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "scored": self.scored,
            "failed": len(self.failed),
            "labels": dict(sorted(self.counts.items())),
            "errors": [{"key": k, "error": e} for k, e in self.failed[:20]],
        }


def _chunks(keys: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(keys), size):
        yield keys[start : start + size]


def score(
    source: Source,
    model: LoadedModel,
    *,
    batch_size: int = 64,
    max_workers: int = 8,
    progress: bool | None = None,
    keys: Sequence[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """One line (a dict) per image of ``source``, in key order.

    While the network scores one batch, the next is read and decoded in ``max_workers``
    threads. An image that cannot be read or decoded gives a line with ``error``; a store that
    cannot be reached stops the whole run (its error is retryable).
    """
    keys = source.keys() if keys is None else keys
    prep = model.classifier.prep
    classes = model.classes
    stamp = {"model_name": model.name, "model_version": model.version}

    def prepare(key: str) -> torch.Tensor | str:
        try:
            return prep.from_bytes(source.read(key))
        except DataError as error:  # not an image, truncated, too large, gone: this one only
            return str(error)

    with (
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="predict") as pool,
        progress_bar(total=len(keys), desc="predict", unit="img", enabled=progress) as bar,
    ):

        def submit(chunk: Sequence[str]) -> list[Future[torch.Tensor | str]]:
            return [pool.submit(prepare, key) for key in chunk]

        chunks = list(_chunks(keys, batch_size))
        pending = submit(chunks[0]) if chunks else []
        for index, chunk in enumerate(chunks):
            prepared = [future.result() for future in pending]
            # Read the next batch while this one is scored.
            pending = submit(chunks[index + 1]) if index + 1 < len(chunks) else []
            tensors = [item for item in prepared if not isinstance(item, str)]
            probabilities = model.classifier.predict_proba(prep.batch(tensors)) if tensors else None
            row = 0
            for key, item in zip(chunk, prepared, strict=True):
                if isinstance(item, str):
                    yield {"key": key, "error": item, **stamp}
                    continue
                assert probabilities is not None  # some tensor was prepared
                values = probabilities[row]
                row += 1
                yield {
                    "key": key,
                    "label": classes[int(values.argmax())],
                    "probabilities": {c: float(p) for c, p in zip(classes, values, strict=True)},
                    **stamp,
                }
            bar.update(len(chunk))


def predict(
    source: Source,
    model: LoadedModel,
    out: TextIO,
    *,
    batch_size: int = 64,
    max_workers: int = 8,
    progress: bool | None = None,
    keys: Sequence[str] | None = None,
) -> BatchReport:
    """Score ``source`` into ``out``, one JSON line per image; what was done.

    ``keys`` are the source's keys when the caller listed them already. A source with no file
    at all is refused (:class:`DataError`): a wrong path or prefix must not pass for an empty
    batch.
    """
    keys = source.keys() if keys is None else keys
    if not keys:
        raise DataError(f"no files under {source.where}: nothing to score")
    report = BatchReport(source.where, model.name, model.version)
    counts: Counter[str] = Counter()
    for line in score(
        source,
        model,
        batch_size=batch_size,
        max_workers=max_workers,
        progress=progress,
        keys=keys,
    ):
        out.write(json.dumps(line) + "\n")
        if "error" in line:
            report.failed.append((line["key"], line["error"]))
            log.warning("%s: %s", line["key"], line["error"])
        else:
            counts[line["label"]] += 1
    report.counts = dict(sorted(counts.items()))
    log.info(
        "scored %d image(s) of %s with %s version %s (%s); %d could not be scored",
        report.scored,
        source.where,
        model.name,
        model.version,
        ", ".join(f"{label}={n}" for label, n in report.counts.items()) or "none",
        len(report.failed),
    )
    return report


def predict_to_file(
    source: Source,
    model: LoadedModel,
    output: Path,
    **options: Any,
) -> BatchReport:
    """:func:`predict` into ``output``, written whole or not at all (a temporary file renamed)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    part = output.with_name(f".{output.name}.part-{os.getpid()}")
    try:
        with part.open("w", encoding="utf-8") as out:
            report = predict(source, model, out, **options)
        part.replace(output)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    report.output = str(output)
    return report


# --- batches dropped under inbox/ ----------------------------------------------------------------


def predicted_batches(store: ObjectStore) -> set[str]:
    """Batches with a ``predictions/<batch>.jsonl``: done, never scored again."""
    return {
        o.key.removeprefix(PREDICTIONS_PREFIX).removesuffix(".jsonl")
        for o in store.iter_objects(PREDICTIONS_PREFIX)
        if o.key.endswith(".jsonl")
    }


def ready_batches(
    store: ObjectStore, *, settle_seconds: float, now: datetime | None = None
) -> list[str]:
    """Batches under ``inbox/`` to score now, oldest first.

    A batch is ready when it has no predictions yet and no object under it has changed for
    ``settle_seconds`` (S3's LastModified decides, so nothing is kept between pokes and a batch
    still being copied is left alone). A folder whose name is not a valid batch name is skipped
    with a warning.
    """
    now = now or datetime.now(UTC)
    done = predicted_batches(store)
    ready: list[tuple[datetime, str]] = []
    for prefix in store.iter_prefixes(INBOX_PREFIX):
        name = prefix.removeprefix(INBOX_PREFIX).rstrip("/")
        if name in done:
            continue
        try:
            validate_name(name, "batch")
        except DataError as error:
            log.warning("skipping s3://%s/%s: %s", store.bucket, prefix, error)
            continue
        times = [o.last_modified for o in store.iter_objects(prefix) if o.last_modified]
        if not times:
            continue
        newest = max(times)
        age = (now - newest).total_seconds()
        if age >= settle_seconds:
            ready.append((newest, name))
        else:
            log.info("batch %s changed %.0f s ago: waiting for it to settle", name, age)
    return [name for _, name in sorted(ready)]


def predict_batch(
    store: ObjectStore,
    batch: str,
    model: LoadedModel | Callable[[], LoadedModel],
    **options: Any,
) -> BatchReport | None:
    """Score ``inbox/<batch>/`` into ``predictions/<batch>.jsonl``; None when it was done before.

    The output is put in one request after every line is made, so it is there whole or not at
    all, and its presence is what marks the batch done. ``model`` may be a function that loads
    it, called only when there is work.
    """
    validate_name(batch, "batch")
    key = predictions_key(batch)
    if store.exists(key):
        log.info("batch %s was scored before (s3://%s/%s)", batch, store.bucket, key)
        return None
    loaded = model() if callable(model) else model
    buffer = io.StringIO()
    report = predict(S3Source(store, inbox_prefix(batch)), loaded, buffer, **options)
    store.put_bytes(key, buffer.getvalue().encode(), JSONL_CONTENT_TYPE)
    report.output = f"s3://{store.bucket}/{key}"
    return report

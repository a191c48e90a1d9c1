"""S3 access and the local content-addressed cache.

The data lake's layout (``raw/<version>/<label>/<file>``, ``raw/<version>/_manifest.json``,
``splits/<version>/<split>.json``, ``state/{processed,processing,failed}/<version>.json``,
``feedback/<date>/<part>.jsonl``, ``captures/<date>/<request id>-<i>.<ext>``,
``inbox/<batch>/...`` and ``predictions/<batch>.jsonl``) is spelled out once here; every other
module asks this one for keys. Listing always paginates: a
bare ``list_objects`` stops at 1,000 keys.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote

import boto3
import botocore.session
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.utils import parse_timestamp

from tirelib.errors import (
    TRANSIENT_S3_CODES,
    DataError,
    StorageError,
    StorageUnavailableError,
    is_transient_http_status,
)
from tirelib.progress import progress_bar
from tirelib.urls import mask_credentials, masked_url

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from tirelib.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

RAW_PREFIX = "raw/"
SPLITS_PREFIX = "splits/"
PROCESSED_PREFIX = "state/processed/"
PROCESSING_PREFIX = "state/processing/"
FAILED_PREFIX = "state/failed/"
FEEDBACK_PREFIX = "feedback/"
CAPTURES_PREFIX = "captures/"
INBOX_PREFIX = "inbox/"
PREDICTIONS_PREFIX = "predictions/"
MANIFEST_NAME = "_manifest.json"
UPLOAD_MARKER_NAME = "_upload.json"


def raw_prefix(version: str) -> str:
    return f"{RAW_PREFIX}{version}/"


def manifest_key(version: str) -> str:
    return f"{RAW_PREFIX}{version}/{MANIFEST_NAME}"


def upload_marker_key(version: str) -> str:
    """Written by ``tirelib data upload`` before its first file and removed after the manifest:
    while it is there, the sensor never ingests the version half-sent."""
    return f"{RAW_PREFIX}{version}/{UPLOAD_MARKER_NAME}"


def split_key(version: str, split: str) -> str:
    return f"{SPLITS_PREFIX}{version}/{split}.json"


def processed_key(version: str) -> str:
    return f"{PROCESSED_PREFIX}{version}.json"


def processing_key(version: str) -> str:
    """Written when a pipeline run takes the version, removed when it ends either way."""
    return f"{PROCESSING_PREFIX}{version}.json"


def failed_key(version: str) -> str:
    """A version the pipeline gave up on: reason, task, run link, time."""
    return f"{FAILED_PREFIX}{version}.json"


def feedback_key(day: str, part: str) -> str:
    """True labels sent for served predictions, one JSON object a line (``day``: YYYY-MM-DD)."""
    return f"{FEEDBACK_PREFIX}{day}/{part}.jsonl"


def capture_key(day: str, request_id: str, index: int, ext: str) -> str:
    """Instance ``index`` of request ``request_id``, as the client sent it (``ext``: png, jpg)."""
    return f"{CAPTURES_PREFIX}{day}/{request_id}-{index}.{ext.lstrip('.')}"


def parse_capture_name(name: str) -> tuple[str, int] | None:
    """``(request id, index)`` of a capture's file name ``<request id>-<i>.<ext>``, or None.

    The writer percent-encodes the request id in the key (``urllib.parse.quote(id, safe="")``,
    so a ``/`` in a client's id cannot make a folder); the id returned is decoded again.
    """
    stem = name.rpartition(".")[0] or name
    request_id, dash, index = stem.rpartition("-")
    if not dash or not request_id or not index.isascii() or not index.isdigit():
        return None
    return unquote(request_id), int(index)


def inbox_prefix(batch: str) -> str:
    """Images dropped to be scored in bulk by the production model."""
    return f"{INBOX_PREFIX}{batch}/"


def predictions_key(batch: str) -> str:
    """The scores of ``inbox/<batch>/``, one JSON object a line; its presence means done."""
    return f"{PREDICTIONS_PREFIX}{batch}.jsonl"


def fast_timestamp(value: Any) -> datetime:
    """A timestamp of an S3 answer: ISO 8601 (listings) and RFC 1123 (headers) by the standard
    library, anything else by botocore's own parser.

    botocore parses every timestamp with dateutil, about 0.3 ms each on a small CPU: a listing
    of 100,000 objects spent half a minute on its LastModified dates alone.
    """
    if isinstance(value, str) and not value.isdigit():
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            try:
                moment = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return parse_timestamp(value)
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return parse_timestamp(value)


def s3_client(settings: Settings) -> S3Client:
    """A boto3 S3 client for the configured endpoint, with botocore's standard retries.

    Credentials come from the settings when set, else from boto3's own chain (environment,
    shared files, instance roles); with none anywhere, requests go unsigned, which an open
    local server or a public bucket accepts.
    """
    core = botocore.session.get_session()
    core.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=fast_timestamp
    )
    session = boto3.session.Session(
        botocore_session=core,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=(
            settings.aws_secret_access_key.get_secret_value()
            if settings.aws_secret_access_key
            else None
        ),
        region_name=settings.aws_default_region,
    )
    config = Config(
        retries={"mode": "standard", "max_attempts": settings.s3_max_attempts},
        max_pool_connections=max(10, settings.s3_max_workers * 2),
        connect_timeout=5,
        read_timeout=60,
        # S3-compatible stores (SeaweedFS, older MinIO) reject the newer default checksums.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"},
    )
    if session.get_credentials() is None:
        config = config.merge(Config(signature_version=UNSIGNED))
    return session.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)


def is_transient(error: BaseException) -> bool:
    """Whether a botocore error says the store could not be reached or could not answer now.

    Connection errors and timeouts (a certificate problem aside), and answers with a 5xx or 429
    status or a "slow down / try later" code are; every other answer is the store's final word.
    """
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = error.response.get("Error", {}).get("Code")
        return code in TRANSIENT_S3_CODES or is_transient_http_status(status)
    if isinstance(error, SSLError):
        return False
    return isinstance(error, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError))


def classify(error: Exception, action: str, where: str, endpoint: str | None) -> StorageError:
    """The tirelib error for a failed S3 request: retryable when :func:`is_transient`.

    ``where`` names the object (``s3://bucket/key``); the message names the endpoint, never
    credentials.
    """
    at = masked_url(endpoint) if endpoint else "the default AWS endpoint"
    detail = mask_credentials(str(error))  # botocore quotes the endpoint URL, userinfo and all
    if is_transient(error):
        return StorageUnavailableError(
            f"cannot reach S3 at {at} to {action} {where} (botocore's retries are spent; "
            f"is the store running?): {detail}"
        )
    return StorageError(f"S3 at {at} refused to {action} {where}: {detail}")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: datetime | None = None


class ObjectStore:
    """One bucket of an S3 store, with the few operations the pipeline needs."""

    def __init__(self, client: S3Client, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    @classmethod
    def for_data(cls, settings: Settings) -> ObjectStore:
        """The data lake bucket (``TIRE_DATA_BUCKET``)."""
        return cls(s3_client(settings), settings.data_bucket)

    def _fail(self, action: str, key: str, error: Exception) -> StorageError:
        where = f"s3://{self.bucket}/{key}"
        return classify(error, action, where, self.client.meta.endpoint_url)

    def iter_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object below ``prefix``, page by page."""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield ObjectInfo(
                        item["Key"], item["Size"], item["ETag"].strip('"'), item.get("LastModified")
                    )
        except (ClientError, BotoCoreError) as error:
            raise self._fail("list", prefix, error) from error

    def iter_prefixes(self, prefix: str) -> Iterator[str]:
        """The immediate "folders" below ``prefix`` (common prefixes), page by page."""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                for item in page.get("CommonPrefixes", []):
                    yield item["Prefix"]
        except (ClientError, BotoCoreError) as error:
            raise self._fail("list", prefix, error) from error

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def head(self, key: str) -> dict[str, str] | None:
        """The user metadata of ``key`` (``x-amz-meta-*``, names lowercase), None when absent."""
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if _missing(error):
                return None
            raise self._fail("read", key, error) from error
        except BotoCoreError as error:
            raise self._fail("read", key, error) from error
        return dict(response.get("Metadata", {}))

    def get_bytes(self, key: str) -> bytes:
        data = self.get_bytes_if_exists(key)
        if data is None:
            raise DataError(f"s3://{self.bucket}/{key} does not exist")
        return data

    def get_bytes_if_exists(self, key: str) -> bytes | None:
        """The bytes of ``key``, or None when there is no such object: one request, no HEAD."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            return body.read()
        except ClientError as error:
            if _missing(error):
                return None
            raise self._fail("read", key, error) from error
        except BotoCoreError as error:
            raise self._fail("read", key, error) from error

    def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Write ``key``; ``metadata`` becomes its ``x-amz-meta-*`` headers (HEAD returns them)."""
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=content_type,
                Metadata=metadata or {},
            )
        except (ClientError, BotoCoreError) as error:
            raise self._fail("write", key, error) from error

    def get_json(self, key: str) -> Any:
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"s3://{self.bucket}/{key} is not valid JSON: {error}") from error

    def put_json(self, key: str, value: Any) -> None:
        body = json.dumps(value, indent=1, sort_keys=True).encode()
        self.put_bytes(key, body, "application/json")

    def delete(self, keys: Iterable[str]) -> int:
        """Delete ``keys`` in batches of 1,000 (S3's limit per request); returns the count."""
        batch: list[str] = []
        count = 0
        for key in keys:
            batch.append(key)
            if len(batch) == 1000:
                count += self._delete_batch(batch)
                batch = []
        if batch:
            count += self._delete_batch(batch)
        return count

    def _delete_batch(self, keys: list[str]) -> int:
        try:
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
            )
        except (ClientError, BotoCoreError) as error:
            raise self._fail("delete", keys[0], error) from error
        return len(keys)


def _missing(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}


def bounded_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    max_workers: int,
    name: str = "worker",
    window: int | None = None,
) -> Generator[R, None, None]:
    """``fn`` over ``items`` in ``max_workers`` threads, each result as soon as it is done.

    At most ``window`` items (default four per thread) are submitted and not yet taken, so
    memory stays the same for 1,000 items or 1,000,000: ``items`` is read as the work goes,
    never turned into a list of futures. When ``fn`` raises, the error comes out here; the
    items not started never run and those under way finish before it does. A consumer that
    stops early calls ``close()`` on the iterator to the same effect.
    """
    window = window or 4 * max_workers
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name) as pool:
        pending: set[Future[R]] = set()
        try:
            for item in items:
                pending.add(pool.submit(fn, item))
                if len(pending) >= window:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class FetchReport:
    """What :meth:`ContentCache.fetch` did: how many objects it downloaded and how many it had."""

    downloaded: int
    cached: int
    bytes_downloaded: int


class ContentCache:
    """Images stored once by their sha256, so no epoch or run downloads the same bytes twice."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, sha256: str, data: bytes, *, source: str = "") -> Path:
        """Store ``data`` under its hash after checking it; atomic, a crash leaves no half file."""
        actual = sha256_hex(data)
        if actual != sha256:
            raise DataError(
                f"checksum mismatch for {source or 'an object'}: the manifest says {sha256}, "
                f"the bytes hash to {actual}; the object changed after the manifest was written"
            )
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A name of this writer's own, renamed into place: readers never see half a file.
        part = target.with_name(f".part-{sha256[:16]}-{threading.get_ident()}")
        try:
            part.write_bytes(data)
            part.replace(target)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return target

    def fetch(
        self,
        store: ObjectStore,
        items: Iterable[tuple[str, str]],
        *,
        max_workers: int = 16,
        progress: bool | None = None,
        on_download: Callable[[str, bytes], None] | None = None,
    ) -> FetchReport:
        """Download every ``(key, sha256)`` not cached yet, in parallel, verifying each hash.

        ``on_download(sha256, data)`` runs in the worker thread after each download, so a caller
        can use the bytes (decode them) without reading the file back. ``progress=None`` shows
        a bar only on a terminal.
        """
        missing: dict[str, str] = {}
        cached = 0
        for key, sha in items:
            if sha in missing:
                continue
            if self.has(sha):
                cached += 1
            else:
                missing[sha] = key
        if not missing:
            return FetchReport(downloaded=0, cached=cached, bytes_downloaded=0)

        def download(item: tuple[str, str]) -> int:
            sha, key = item
            data = store.get_bytes(key)
            self.put(sha, data, source=f"s3://{store.bucket}/{key}")
            if on_download is not None:
                on_download(sha, data)
            return len(data)

        total = 0
        with progress_bar(total=len(missing), desc="download", unit="img", enabled=progress) as bar:
            for size in bounded_map(
                download, missing.items(), max_workers=max_workers, name="fetch"
            ):
                total += size
                bar.update()
        log.info(
            "cache: downloaded %d objects (%d bytes), %d already cached",
            len(missing),
            total,
            cached,
        )
        return FetchReport(downloaded=len(missing), cached=cached, bytes_downloaded=total)

"""Feedback records and sampled request images, written to the data lake off the request path.

Layout (keys from :mod:`tirelib.storage`, in ``TIRE_DATA_BUCKET``):

``feedback/<date>/<part>.jsonl``
    One JSON object a line, one line per labelled instance (instances sent with a null label are
    left out). ``<date>`` is the UTC day the feedback arrived (``YYYY-MM-DD``); ``<part>`` is
    ``HHMMSSffffff-<8 hex>``, unique per write, so replicas never overwrite each other. Fields::

        {"request_id": "3f2a…",          # the X-Request-ID of the prediction
         "index": 0,                     # the instance's position in that request
         "label": "defective",           # the true class sent
         "predicted_class": "good",      # what the server answered
         "model_version": "7",           # the version that answered
         "time": "2026-11-30T14:11:11.123456+00:00",   # when the feedback arrived (UTC)
         "capture": "captures/2026-11-30/3f2a…-0.png"}  # the instance's image, or null

``captures/<date>/<request id>-<i>.<ext>``
    Instance ``i`` of a sampled request (``capture_rate``; a request is sampled whole), on the
    UTC day of the prediction. Encoded images (``{"b64": …}``, BYTES, uploads) are stored as the
    bytes sent, with their format's extension (``jpg``, ``png``, ``webp``, ``bmp``, ``gif``,
    ``tif``); float instances as 8-bit PNG. In the key the request id is percent-encoded
    (``urllib.parse.quote(request_id, safe="")``): a uuid hex stays as it is, a ``/`` cannot
    make a folder; ``urllib.parse.unquote`` gives the id back.

:class:`Sink` takes work from the routes without waiting: its queue holds at most
``sink_queue_items`` jobs and ``capture_queue_bytes`` of images; beyond that a job is dropped and
counted in ``tire_capture_dropped_total{kind, reason="queue_full"}``. One writer thread writes
captures as they come and the feedback gathered every ``sink_flush_seconds``, and on
:meth:`Sink.close` (the app's shutdown) everything still queued. A write that fails after
botocore's retries is logged; feedback records are kept for the next flush (up to ten times the
queue's size), a capture is counted as ``reason="write_failed"``.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image

from tirelib.errors import TirelibError
from tirelib.serve.config import ServeConfig
from tirelib.serve.inputs import RawImage
from tirelib.serve.metrics import ServeMetrics
from tirelib.settings import Settings
from tirelib.storage import ObjectStore, capture_key, feedback_key

log = logging.getLogger(__name__)

EXTENSIONS = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "GIF": "gif",
    "TIFF": "tif",
}
_CONTENT_TYPES = {"jpg": "image/jpeg", "tif": "image/tiff"}
_FLOAT_BYTES = 32  # a pixel value as a Python float in nested lists, pointer included
_PENDING_FACTOR = 10  # feedback records kept across failed writes, in queue sizes
_STOP = object()


def utc_day(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%d")


def capture_object_key(day: str, request_id: str, index: int, ext: str) -> str:
    """Where instance ``index`` of a captured request lies (the id percent-encoded)."""
    return capture_key(day, quote(request_id, safe=""), index, ext)


def feedback_records(
    request_id: str,
    *,
    version: str,
    labelled: Sequence[tuple[int, str, str]],
    capture_keys: Sequence[str] | None,
    moment: datetime,
) -> list[dict[str, Any]]:
    """The lines of ``feedback/`` for one feedback body: (index, label, predicted) each."""
    at = moment.astimezone(UTC).isoformat()
    return [
        {
            "request_id": request_id,
            "index": index,
            "label": label,
            "predicted_class": predicted,
            "model_version": version,
            "time": at,
            "capture": capture_keys[index] if capture_keys else None,
        }
        for index, label, predicted in labelled
    ]


def image_extension(kind: str | None) -> str:
    """The file extension of an image format as Pillow names it (``JPEG`` is ``jpg``)."""
    kind = (kind or "").upper()
    return EXTENSIONS.get(kind, kind.lower() or "bin")


def float_png(image: Any) -> bytes:
    """An HWC float image in [0, 1] (1, 3 or 4 channels, or HW) as an 8-bit PNG."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    pixels = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def estimated_bytes(image: RawImage) -> int:
    """Memory an image held for capture takes, roughly (nested float lists are large)."""
    if isinstance(image, bytes):
        return len(image)
    if isinstance(image, np.ndarray):
        return int(image.nbytes)
    count, probe = 1, image
    while isinstance(probe, list) and probe:
        count *= len(probe)
        probe = probe[0]
    return count * _FLOAT_BYTES


@dataclass(frozen=True)
class _Capture:
    objects: Sequence[tuple[str, RawImage]]  # (key, image as sent)
    size: int


@dataclass(frozen=True)
class _Feedback:
    records: list[dict[str, Any]]


class Sink:
    """A background writer of captures and feedback records to one bucket (see the module)."""

    def __init__(
        self,
        store: ObjectStore,
        metrics: ServeMetrics,
        *,
        flush_s: float,
        queue_items: int,
        queue_bytes: int,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.flush_s = flush_s
        self.queue_bytes = queue_bytes
        self.max_pending = queue_items * _PENDING_FACTOR
        self._clock = clock
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_items)
        self._queued_bytes = 0
        self._lock = threading.Lock()  # guards _queued_bytes
        self._pending: list[dict[str, Any]] = []  # the writer thread's own
        self._failing = False
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def where(self) -> str:
        return f"s3://{self.store.bucket}/"

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tire-sink", daemon=True)
            self._thread.start()

    # -- the routes' side: never blocks

    def capture(self, objects: Sequence[tuple[str, RawImage]]) -> bool:
        """Queue a request's images under their keys; False (counted) when the queue is full."""
        size = sum(estimated_bytes(image) for _, image in objects)
        with self._lock:
            fits = not self._closed and self._queued_bytes + size <= self.queue_bytes
            if fits:
                self._queued_bytes += size
        if fits and self._offer(_Capture(objects, size)):
            return True
        if fits:
            with self._lock:
                self._queued_bytes -= size
        self.metrics.capture_dropped.labels(kind="capture", reason="queue_full").inc(len(objects))
        return False

    def feedback(self, records: list[dict[str, Any]]) -> bool:
        """Queue feedback records; False (counted) when the queue is full."""
        if not records:
            return True
        if not self._closed and self._offer(_Feedback(records)):
            return True
        dropped = self.metrics.capture_dropped.labels(kind="feedback", reason="queue_full")
        dropped.inc(len(records))
        return False

    def _offer(self, job: object) -> bool:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            return False
        return True

    def close(self, timeout: float = 120.0) -> None:
        """Write everything queued and the feedback gathered, then stop the writer."""
        self._closed = True
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.error("the sink's writer is stuck; %d jobs are not written", self._queue.qsize())
            return
        thread.join(timeout)
        if thread.is_alive():
            log.error("the sink did not finish writing to %s within %g s", self.where, timeout)

    # -- the writer thread

    def _run(self) -> None:
        next_flush = time.monotonic() + self.flush_s
        while True:
            try:
                job = self._queue.get(timeout=max(next_flush - time.monotonic(), 0.0))
            except queue.Empty:
                job = None
            if job is _STOP:
                break
            self._handle(job)
            if time.monotonic() >= next_flush:
                self._flush()
                next_flush = time.monotonic() + self.flush_s
        while True:  # jobs that came before the stop are written too
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            self._handle(job)
        self._flush()
        if self._pending:
            log.error(
                "%d feedback records could not be written to %s before shutdown",
                len(self._pending), self.where,
            )  # fmt: skip
            self._drop_pending(len(self._pending))

    def _handle(self, job: object) -> None:
        try:
            if isinstance(job, _Capture):
                self._write_capture(job)
            elif isinstance(job, _Feedback):
                self._pending.extend(job.records)
                excess = len(self._pending) - self.max_pending
                if excess > 0:
                    self._drop_pending(excess)
        except Exception:  # the writer must outlive any one bad job
            log.exception("the sink failed on a job; it goes on with the next")

    def _drop_pending(self, count: int) -> None:
        del self._pending[:count]
        self.metrics.capture_dropped.labels(kind="feedback", reason="write_failed").inc(count)

    def _write_capture(self, job: _Capture) -> None:
        try:
            for done, (key, image) in enumerate(job.objects):
                ext = key.rpartition(".")[2]
                data = image if isinstance(image, bytes) else float_png(image)
                kind = _CONTENT_TYPES.get(ext, f"image/{ext}")
                try:
                    self.store.put_bytes(key, data, kind)
                except TirelibError as error:
                    self._failed("a capture", error)
                    dropped = self.metrics.capture_dropped.labels(
                        kind="capture", reason="write_failed"
                    )
                    dropped.inc(len(job.objects) - done)
                    return
                self.metrics.capture_written.labels(kind="capture").inc()
            self._recovered()
        finally:
            with self._lock:
                self._queued_bytes -= job.size

    def _flush(self) -> None:
        """Write the feedback gathered, one part per UTC day; kept for the next try on failure."""
        if not self._pending:
            return
        by_day: dict[str, list[dict[str, Any]]] = {}
        for record in self._pending:
            by_day.setdefault(record["time"][:10], []).append(record)
        written = 0
        for day, records in by_day.items():
            part = f"{self._clock():%H%M%S%f}-{uuid.uuid4().hex[:8]}"
            body = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
            try:
                self.store.put_bytes(feedback_key(day, part), body, "application/x-ndjson")
            except TirelibError as error:
                self._failed("feedback", error)
                continue
            written += len(records)
            self.metrics.capture_written.labels(kind="feedback").inc(len(records))
            self._pending = [r for r in self._pending if r["time"][:10] != day]
        if written:
            self._recovered()

    def _failed(self, what: str, error: Exception) -> None:
        if not self._failing:
            log.warning("cannot write %s to %s (will keep trying): %s", what, self.where, error)
        self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            log.info("writing to %s again", self.where)
        self._failing = False


def s3_configured(settings: Settings) -> bool:
    """Whether the settings name an S3 store (its endpoint or credentials were set)."""
    return bool({"s3_endpoint_url", "aws_access_key_id"} & settings.model_fields_set)


def start_sink(config: ServeConfig, settings: Settings, metrics: ServeMetrics) -> Sink | None:
    """The running sink for the data bucket; None, said in the log, without S3 settings."""
    if not s3_configured(settings):
        log.info(
            "feedback and captures are not written to S3: no S3 endpoint or credentials are "
            "set (TIRE_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID)%s",
            "; capture_rate is ignored" if config.capture_rate else "",
        )
        return None
    sink = Sink(
        ObjectStore.for_data(settings),
        metrics,
        flush_s=config.sink_flush_seconds,
        queue_items=config.sink_queue_items,
        queue_bytes=config.capture_queue_bytes,
    )
    sink.start()
    rate = config.capture_rate
    captures = f" and the images of {rate:.2%} of requests" if rate else ""
    log.info(
        "writing feedback%s to %s (every %g s)", captures, sink.where, config.sink_flush_seconds
    )
    return sink

"""The server's Prometheus metrics, in a registry of its own (one per app, so tests can make many).

Names follow Prometheus's conventions: base units (seconds), ``_total`` counters, histograms rather
than summaries, and only low-cardinality labels: the route template (never the raw path), the
method, the status code, the class, the reload result.

With many workers (``tirelib serve --workers N``) every worker process writes its values to files
in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode) and ``/metrics``, whichever
worker answers it, shows them merged: counters and histograms summed over the workers, the time of
the last reload the latest of any, ``tire_model_info`` one series per version some live worker
serves. The drift baseline is the answering worker's (every worker serves the same version once a
reload is done).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tirelib.drift import BRIGHTNESS_BUCKETS, CONFIDENCE_BUCKETS, CONTRAST_BUCKETS, Baseline

__all__ = ["CONTENT_TYPE_LATEST", "HttpMetricsMiddleware", "ServeMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
UNMATCHED = "<unmatched>"
MODEL_INFO_LABELS = ("version", "model_type", "name")
MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# A live gauge's file in the multiprocess directory: gauge_liveall_<pid>.db, gauge_livemax_…
_LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def multiprocess_dir() -> Path | None:
    """Where this process shares its metrics with the other workers (None: it serves alone).

    prometheus_client reads the same variable when it is imported, so a worker is given it in its
    environment before it starts.
    """
    value = os.environ.get(MULTIPROC_DIR_VARIABLE)
    return Path(value) if value else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def forget_dead_workers(path: Path) -> list[int]:
    """Drop the live gauges of workers that exited without saying so (killed, crashed).

    Returns their pids. Each collection of the merged view calls it; a worker that stops normally
    drops its own at exit (:func:`tirelib.serve.workers.create_worker_app`).
    """
    dead = set()
    for entry in path.iterdir():
        found = _LIVE_GAUGE_FILE.match(entry.name)
        if found and not _pid_alive(int(found.group(1))):
            dead.add(int(found.group(1)))
    for pid in sorted(dead):
        forget_worker(path, pid)
    return sorted(dead)


def forget_worker(path: Path, pid: int) -> None:
    """Drop worker ``pid``'s live gauges (the version it serves) from the merged view."""
    # Another worker answering /metrics at the same moment may have removed them first.
    with contextlib.suppress(FileNotFoundError):
        mark_process_dead(pid, str(path))


class SharedInfo:
    """An info metric many worker processes share: ``<name>_info`` at 1 for each set of labels
    a live worker holds.

    prometheus_client's :class:`Info` keeps its labels in the process; a gauge is written to the
    shared files. Each worker sets the labels it left to 0 and the merged view drops them
    (:class:`MergedCollector`), so a version no live worker serves disappears as it does from a
    single process's :class:`Info`.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self.labelnames = tuple(labelnames)
        self._gauge = Gauge(
            f"{name}_info", documentation, self.labelnames, registry=registry,
            multiprocess_mode="livemax",
        )  # fmt: skip
        self._current: dict[str, str] = dict.fromkeys(self.labelnames, "")
        self._gauge.labels(**self._current).set(1)  # no labels yet, as an Info before info()

    def info(self, values: Mapping[str, str]) -> None:
        unknown = set(values) - set(self.labelnames)
        if unknown:
            raise ValueError(f"unknown labels {sorted(unknown)}; allowed: {list(self.labelnames)}")
        self._gauge.labels(**self._current).set(0)
        self._current = {label: values.get(label, "") for label in self.labelnames}
        self._gauge.labels(**self._current).set(1)


class MergedCollector(Collector):
    """Every worker's metrics merged from the multiprocess directory; info series at 0
    (labels a worker no longer holds) left out."""

    def __init__(self, path: Path, info_names: Sequence[str]) -> None:
        self.path = path
        self.info_names = frozenset(info_names)
        self._merged = MultiProcessCollector(None, path=str(path))

    def collect(self) -> Iterator[Metric]:
        forget_dead_workers(self.path)
        for metric in self._merged.collect():
            if metric.name in self.info_names:
                metric.samples = [sample for sample in metric.samples if sample.value]
            yield metric


class BaselineCollector(Collector):
    """The served model's baseline as gauges; no samples while the model has none."""

    def __init__(self) -> None:
        self.baseline: Baseline | None = None

    def describe(self) -> list[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        return self._families(self.baseline)

    @staticmethod
    def _families(baseline: Baseline | None) -> Iterator[Metric]:
        share = GaugeMetricFamily(
            "tire_model_baseline_class_share",
            "Share of each predicted class on the served model's test split (its baseline).",
            labels=["class"],
        )
        confidence = GaugeMetricFamily(
            "tire_model_baseline_confidence_mean",
            "Mean probability of the predicted class on the served model's test split.",
        )
        if baseline is not None:
            for name, value in baseline.class_share.items():
                share.add_metric([name], value)
            confidence.add_metric([], baseline.confidence_mean)
        yield share
        yield confidence


class ServeMetrics:
    """Every metric the server exports; :meth:`render` gives the text exposition."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir()
        r = self.registry
        self.requests = Counter(
            "tire_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "tire_http_request_duration_seconds",
            "Time from the request's arrival to the end of its response.",
            ["endpoint", "method", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "tire_inference_batch_size",
            "Images per forward pass (dynamic batching gathers concurrent requests).",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "tire_inference_duration_seconds",
            "Time of one batched forward pass.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.predictions = Counter(
            "tire_predictions",
            "Images classified, by predicted class.",
            ["class"],
            registry=r,
        )
        self.confidence = Histogram(
            "tire_prediction_confidence",
            "Probability of the predicted class.",
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.brightness = Histogram(
            "tire_input_brightness",
            "Mean grayscale pixel of each image in [0, 1], resized, before normalisation.",
            buckets=BRIGHTNESS_BUCKETS,
            registry=r,
        )
        self.contrast = Histogram(
            "tire_input_contrast",
            "Standard deviation of each image's grayscale pixels, resized, before normalisation.",
            buckets=CONTRAST_BUCKETS,
            registry=r,
        )
        self.baseline = BaselineCollector()
        r.register(self.baseline)
        self.feedback_labels = Counter(
            "tire_feedback_labels",
            "Predictions given their true label through the feedback route, by the model version "
            "that made them, the true class and the predicted class.",
            ["version", "class", "predicted_class"],
            registry=r,
        )
        self.feedback_correct = Counter(
            "tire_feedback_correct",
            "Labelled predictions whose predicted class was the true class, by version and class.",
            ["version", "class"],
            registry=r,
        )
        self.capture_written = Counter(
            "tire_capture_written",
            "Written to S3 by the capture sink: kind=capture counts images, feedback records.",
            ["kind"],
            registry=r,
        )
        self.capture_dropped = Counter(
            "tire_capture_dropped",
            "Captured images and feedback records not written to S3, by kind and reason "
            "(queue_full: the sink's queue was full; write_failed: S3 refused or was down).",
            ["kind", "reason"],
            registry=r,
        )
        self.model: Info | SharedInfo
        if self.multiprocess_dir is None:
            self.model = Info("tire_model", "The model version being served.", registry=r)
        else:
            self.model = SharedInfo(
                "tire_model", "The model version being served.", MODEL_INFO_LABELS, registry=r
            )
        self.reloads = Counter(
            "tire_model_reloads",
            "Attempts to load a model version, by result (success, failure).",
            ["result"],
            registry=r,
        )
        self.last_reload = Gauge(
            "tire_model_last_reload_timestamp_seconds",
            "When the served model last changed (Unix time).",
            registry=r,
            multiprocess_mode="max",  # the latest change of any worker
        )
        for result in ("success", "failure"):
            self.reloads.labels(result=result)
        for kind in ("capture", "feedback"):
            self.capture_written.labels(kind=kind)
            for reason in ("queue_full", "write_failed"):
                self.capture_dropped.labels(kind=kind, reason=reason)
        # What /metrics shows: this registry, or with many workers all of theirs merged.
        self.exposed = self.registry
        if self.multiprocess_dir is not None:
            self.exposed = CollectorRegistry()
            self.exposed.register(MergedCollector(self.multiprocess_dir, ["tire_model_info"]))
            self.exposed.register(self.baseline)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference_duration.observe(seconds)

    def observe_predictions(self, classes: Sequence[str], probabilities: np.ndarray) -> None:
        if probabilities.size == 0:
            return
        winners = probabilities.argmax(axis=1)
        counts = np.bincount(winners, minlength=len(classes))
        for name, count in zip(classes, counts.tolist(), strict=False):
            if count:
                self.predictions.labels(**{"class": name}).inc(count)
        for value in probabilities.max(axis=1).tolist():
            self.confidence.observe(value)

    def observe_inputs(self, brightness: Sequence[float], contrast: Sequence[float]) -> None:
        for value in brightness:
            self.brightness.observe(value)
        for value in contrast:
            self.contrast.observe(value)

    def observe_feedback(self, version: str, pairs: Sequence[tuple[str, str]]) -> None:
        """Count ``(true class, predicted class)`` pairs labelled for ``version``."""
        for true, predicted in pairs:
            self.feedback_labels.labels(version, true, predicted).inc()
            correct = self.feedback_correct.labels(version, true)
            if true == predicted:
                correct.inc()

    def model_loaded(
        self,
        *,
        version: str,
        model_type: str,
        name: str,
        baseline: Baseline | None = None,
        classes: Sequence[str] = (),
    ) -> None:
        """A version now serves: its info, its baseline, and its series of ``classes`` at zero.

        Prometheus's ``increase()`` counts from a series' first sample, so a counter that
        appears with the first label (or prediction) of a class would never count that one:
        the predictions of every class and the version's feedback series (every pair of true
        and predicted class) are exported at zero before any traffic.
        """
        for true in classes:
            self.predictions.labels(**{"class": true})
            self.feedback_correct.labels(version, true)
            for predicted in classes:
                self.feedback_labels.labels(version, true, predicted)
        self.model.info({"version": version, "model_type": model_type, "name": name})
        self.baseline.baseline = baseline
        self.reloads.labels(result="success").inc()
        self.last_reload.set(time.time())

    def model_failed(self) -> None:
        self.reloads.labels(result="failure").inc()

    def render(self) -> bytes:
        return generate_latest(self.exposed)


class HttpMetricsMiddleware:
    """Counts and times every HTTP request by route template, method and status (pure ASGI).

    The route is read after the app ran: the router records the matched route in the scope.
    Unmatched paths share one label, so a scan of random URLs cannot grow the series count.
    """

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route: Any = scope.get("route")
            # path_format: the template without convertors ("/versions/{version}").
            endpoint = getattr(route, "path_format", None) or UNMATCHED
            labels = {"endpoint": endpoint, "method": scope["method"], "status": str(status[0])}
            self.metrics.requests.labels(**labels).inc()
            self.metrics.request_duration.labels(**labels).observe(time.perf_counter() - start)

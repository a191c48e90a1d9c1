"""Production monitoring: live traffic against the served model's baseline, live accuracy against
its offline test accuracy, and, when allowed, a rollback.

:func:`check` reads the live statistics the model server exports (``tirelib/serve/metrics.py``)
from Prometheus's HTTP API, summed over every replica, over a window: the last
``TIRE_MONITOR_WINDOW_SECONDS`` (an hour), shortened to the time since the production version
was promoted, so what is judged is that version's traffic and nothing from before it.

- **Drift**: the prediction mix (``tire_predictions_total`` by class), the confidence
  (``tire_prediction_confidence``), the input brightness and contrast (``tire_input_brightness``,
  ``tire_input_contrast``) are compared with the production version's baseline (the
  ``baseline.json`` its training run logged, :class:`tirelib.drift.Baseline`), bucket by bucket
  over the edges of :mod:`tirelib.drift`, with the population stability index. A statistic has
  drifted when its PSI is over ``TIRE_MONITOR_PSI_THRESHOLD`` (0.25, a major shift); it is only
  judged on at least ``TIRE_MONITOR_MIN_OBSERVATIONS`` live images.
- **Live accuracy**: the feedback counters of the production version
  (``tire_feedback_{labels,correct}_total{version=...}``), judged on at least
  ``TIRE_MONITOR_MIN_LABELS`` labels: under ``TIRE_MONITOR_ACCURACY_FLOOR``, or more than
  ``TIRE_MONITOR_MAX_ACCURACY_DROP`` under the offline test accuracy, is an alert.

Slack hears only when a threshold is crossed, with the numbers. With ``TIRE_AUTO_ROLLBACK`` on,
live accuracy under the floor rolls production back (:func:`tirelib.registry.rollback`). Only the
version the labels were about is rolled back: production must still be that version under the
registry's lock (``rollback``'s ``expected``), and since the restored version's window starts at
its own (re)promotion, the labels that condemned one version never count against another, nor
twice.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from tirelib import notify
from tirelib.drift import (
    BASELINE_FILE,
    BRIGHTNESS_BUCKETS,
    CONFIDENCE_BUCKETS,
    CONTRAST_BUCKETS,
    Baseline,
    from_cumulative,
    psi,
)
from tirelib.errors import (
    PrometheusUnavailableError,
    RegistryError,
    RegistryUnavailableError,
    TirelibError,
    is_transient_http_status,
)
from tirelib.registry import PRODUCTION, rollback
from tirelib.registry.client import RegistryClient
from tirelib.settings import Settings
from tirelib.urls import mask_credentials, masked_url

log = logging.getLogger(__name__)

PROMETHEUS_TIMEOUT_S = 10.0

# The statistics compared with the baseline: the server's histogram and the baseline's counts.
HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "confidence": ("tire_prediction_confidence", CONFIDENCE_BUCKETS),
    "brightness": ("tire_input_brightness", BRIGHTNESS_BUCKETS),
    "contrast": ("tire_input_contrast", CONTRAST_BUCKETS),
}


# --- Prometheus ----------------------------------------------------------------------------


class Prometheus:
    """Instant queries against Prometheus's HTTP API, with a timeout; outages are retryable."""

    def __init__(self, url: str, *, timeout: float = PROMETHEUS_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def query(self, promql: str, *, at: float | None = None) -> list[tuple[dict[str, str], float]]:
        """The instant vector ``promql`` gives at Unix time ``at`` (now): (labels, value) pairs.

        Raises :class:`PrometheusUnavailableError` when Prometheus cannot be reached, times out
        or answers 5xx/429, and :class:`TirelibError` when it refuses the query.
        """
        params: dict[str, str | float] = {"query": promql}
        if at is not None:
            params["time"] = at
        where = masked_url(self.url)
        try:
            response = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=self.timeout)
        except httpx.TransportError as error:
            raise PrometheusUnavailableError(
                f"cannot reach Prometheus at {where} (TIRE_PROMETHEUS_URL): "
                f"{type(error).__name__}: {mask_credentials(str(error))[:300]}"
            ) from error
        if is_transient_http_status(response.status_code):
            raise PrometheusUnavailableError(
                f"Prometheus at {where} answered {response.status_code}: "
                f"{mask_credentials(response.text)[:300]}"
            )
        try:
            body = response.json()
        except ValueError as error:
            raise TirelibError(
                f"Prometheus at {where} answered {response.status_code} with no JSON: "
                f"{mask_credentials(response.text)[:200]}"
            ) from error
        if response.status_code != 200 or body.get("status") != "success":
            raise TirelibError(
                f"Prometheus at {where} refused the query {promql!r} "
                f"({response.status_code}): {body.get('error', body)}"
            )
        data = body.get("data", {})
        if data.get("resultType") != "vector":
            raise TirelibError(f"expected an instant vector from {promql!r}, got {data}")
        return [(dict(item["metric"]), float(item["value"][1])) for item in data["result"]]


# --- the decisions -------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftCheck:
    """One statistic, live against the baseline. ``psi`` is None when it was not judged."""

    statistic: str
    observations: int
    threshold: float
    psi: float | None = None
    note: str = ""

    @property
    def drifted(self) -> bool:
        return self.psi is not None and self.psi > self.threshold

    def describe(self) -> str:
        if self.psi is None:
            return f"{self.statistic}: not judged ({self.note})"
        verdict = "DRIFTED" if self.drifted else "stable"
        return (
            f"{self.statistic}: PSI {self.psi:.3f} ({verdict}, threshold {self.threshold:g}) "
            f"on {self.observations} live images"
        )


def judge_drift(
    statistic: str,
    expected: Sequence[float],
    actual: Sequence[float],
    *,
    threshold: float,
    min_observations: int,
) -> DriftCheck:
    """Compare a live histogram with the baseline's over the same buckets, by PSI.

    Not judged (``psi`` None) with fewer than ``min_observations`` live observations, or when
    the baseline holds none.
    """
    observations = round(sum(actual))
    if observations < min_observations:
        note = f"{observations} live images, at least {min_observations} are needed"
        return DriftCheck(statistic, observations, threshold, note=note)
    if sum(expected) <= 0:
        note = "the baseline holds no observations"
        return DriftCheck(statistic, observations, threshold, note=note)
    return DriftCheck(statistic, observations, threshold, psi(expected, actual))


@dataclass(frozen=True)
class AccuracyCheck:
    """The production version's live accuracy from feedback, against the floor and its offline
    test accuracy. Judged only on at least ``min_labels`` labels."""

    version: str
    labels: int
    correct: int
    live: float | None
    offline: float | None
    floor: float
    max_drop: float
    min_labels: int

    @property
    def judged(self) -> bool:
        return self.live is not None and self.labels >= self.min_labels

    @property
    def below_floor(self) -> bool:
        return self.judged and self.live is not None and self.live < self.floor

    @property
    def dropped(self) -> bool:
        """More than ``max_drop`` under the offline test accuracy."""
        if not self.judged or self.live is None or self.offline is None:
            return False
        return self.live < self.offline - self.max_drop

    def describe(self) -> str:
        if not self.judged:
            return (
                f"live accuracy of version {self.version}: not judged ({self.labels} labels, "
                f"at least {self.min_labels} are needed)"
            )
        offline = f"{self.offline:.3f}" if self.offline is not None else "unknown"
        flags = [
            *(["UNDER THE FLOOR"] if self.below_floor else []),
            *(["DROPPED"] if self.dropped else []),
        ]
        verdict = ", ".join(flags) or "fine"
        return (
            f"live accuracy of version {self.version}: {self.live:.3f} on {self.labels} labels "
            f"({verdict}; floor {self.floor:g}, offline test accuracy {offline}, "
            f"largest drop allowed {self.max_drop:g})"
        )


def judge_accuracy(
    version: str,
    labels: float,
    correct: float,
    *,
    offline: float | None,
    floor: float,
    max_drop: float,
    min_labels: int,
) -> AccuracyCheck:
    """Live accuracy from the (possibly extrapolated) label and correct counts of a window."""
    live = min(max(correct / labels, 0.0), 1.0) if labels > 0 else None
    return AccuracyCheck(
        version, round(labels), round(correct), live, offline, floor, max_drop, min_labels
    )


@dataclass
class MonitoringReport:
    """What :func:`check` found and did; :meth:`summary` is JSON for XCom."""

    model_name: str
    version: str | None
    window_seconds: int
    drift: list[DriftCheck] = field(default_factory=list)
    accuracy: AccuracyCheck | None = None
    notes: list[str] = field(default_factory=list)
    rolled_back: dict[str, Any] | None = None
    rollback_refused: str | None = None
    notified: bool = False

    @property
    def drifted(self) -> list[DriftCheck]:
        return [check for check in self.drift if check.drifted]

    @property
    def alert(self) -> bool:
        """A threshold was crossed: Slack hears of it."""
        accuracy = self.accuracy
        return bool(self.drifted) or (
            accuracy is not None and (accuracy.below_floor or accuracy.dropped)
        )

    def message(self) -> str:
        """The Slack message: what crossed a threshold, every number, what was done."""
        window = _duration(self.window_seconds)
        lines = [
            f":warning: *{self.model_name}* version {self.version} in production, "
            f"over the last {window}:"
        ]
        lines += [f"- {check.describe()}" for check in self.drift]
        if self.accuracy is not None:
            lines.append(f"- {self.accuracy.describe()}")
        lines += [f"- {note}" for note in self.notes]
        if self.rolled_back is not None:
            lines.append(f":rewind: auto-rollback: {self.rolled_back['message']}")
        elif self.rollback_refused is not None:
            lines.append(f":no_entry: auto-rollback not done: {self.rollback_refused}")
        elif self.accuracy is not None and self.accuracy.below_floor:
            lines.append(
                "auto-rollback is off (TIRE_AUTO_ROLLBACK); to roll back: "
                "`tirelib registry rollback`"
            )
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "version": self.version,
            "window_seconds": self.window_seconds,
            "drift": [{**asdict(check), "drifted": check.drifted} for check in self.drift],
            "accuracy": (
                {
                    **asdict(self.accuracy),
                    "judged": self.accuracy.judged,
                    "below_floor": self.accuracy.below_floor,
                    "dropped": self.accuracy.dropped,
                }
                if self.accuracy is not None
                else None
            ),
            "notes": list(self.notes),
            "alert": self.alert,
            "rolled_back": self.rolled_back,
            "rollback_refused": self.rollback_refused,
            "notified": self.notified,
        }


def _duration(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds >= 120:
        return f"{seconds // 60} min"
    return f"{seconds} s"


# --- the check -----------------------------------------------------------------------------


def check(
    settings: Settings, *, prometheus: Prometheus | None = None, now: float | None = None
) -> MonitoringReport:
    """Compare the production version's live traffic with its baseline and its live accuracy
    with the floor; tell Slack when a threshold is crossed; roll back when allowed (see the
    module's docstring). ``now`` is the Unix time every query is evaluated at.
    """
    prometheus = prometheus or Prometheus(settings.prometheus_url)
    at = time.time() if now is None else now
    registry = RegistryClient(settings)
    with registry.errors("reading the production version"):
        version = registry.aliases().get(PRODUCTION)
        if version is None:
            log.info("model %r has no production version: nothing to monitor", registry.name)
            report = MonitoringReport(registry.name, None, settings.monitor_window_seconds)
            report.notes.append("no production version: nothing to monitor")
            return report
        production = registry.version(version)
        run_id = production.run_id
        promoted_at = production.tags.get("promoted_at")
        offline_tag = production.tags.get("test_accuracy")
    window = evidence_window(settings.monitor_window_seconds, promoted_at, at)
    report = MonitoringReport(registry.name, version, window)
    baseline = read_baseline(registry, run_id) if run_id else None
    if baseline is None:
        report.notes.append(
            f"version {version} has no drift baseline (its run logged no {BASELINE_FILE}): "
            "drift is not judged"
        )
    else:
        report.drift = _drift_checks(settings, prometheus, baseline, window, at)
    offline = baseline.test_accuracy if baseline is not None else _float(offline_tag)
    report.accuracy = _accuracy_check(settings, prometheus, version, offline, window, at)
    for line in [*(c.describe() for c in report.drift), report.accuracy.describe()]:
        log.info("%s", line)

    if settings.auto_rollback and report.accuracy.below_floor:
        _roll_back(settings, report, version)
    if report.alert:
        report.notified = notify.send(report.message(), settings)
    else:
        log.info("version %s: no threshold crossed over the last %d s", version, window)
    return report


def evidence_window(window_seconds: int, promoted_at: str | None, now: float) -> int:
    """The window in seconds: ``window_seconds``, or the time since ``promoted_at`` (ISO 8601)
    when shorter, so only the production version's own traffic is judged. At least 1 s."""
    if promoted_at:
        try:
            since = now - datetime.fromisoformat(promoted_at).timestamp()
        except ValueError:
            log.warning("unreadable promoted_at tag %r: using the whole window", promoted_at)
        else:
            window_seconds = min(window_seconds, max(math.ceil(since), 1))
    return max(int(window_seconds), 1)


def read_baseline(registry: RegistryClient, run_id: str) -> Baseline | None:
    """The ``baseline.json`` logged by run ``run_id``; None when it logged none (a model trained
    before baselines were stored) or it does not parse."""
    with registry.errors(f"reading the baseline of run {run_id}"):
        names = {Path(item.path).name for item in registry.client.list_artifacts(run_id)}
        if BASELINE_FILE not in names:
            return None
        with tempfile.TemporaryDirectory(prefix="tire-baseline-") as tmp:
            path = registry.client.download_artifacts(run_id, BASELINE_FILE, tmp)
            text = Path(path).read_text()
    try:
        return Baseline.model_validate_json(text)
    except ValidationError as error:
        log.warning("run %s has an unreadable %s: %s", run_id, BASELINE_FILE, error)
        return None


def _float(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def _label(value: str) -> str:
    """A PromQL string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _drift_checks(
    settings: Settings, prometheus: Prometheus, baseline: Baseline, window: int, at: float
) -> list[DriftCheck]:
    threshold = settings.monitor_psi_threshold

    def judge(statistic: str, expected: Sequence[float], actual: Sequence[float]) -> DriftCheck:
        return judge_drift(
            statistic,
            expected,
            actual,
            threshold=threshold,
            min_observations=settings.monitor_min_observations,
        )

    by_class = {
        labels.get("class", ""): value
        for labels, value in prometheus.query(
            f"sum by (class) (increase(tire_predictions_total[{window}s]))", at=at
        )
    }
    checks = [
        judge(
            "prediction_mix",
            [baseline.class_share.get(name, 0.0) for name in baseline.classes],
            [by_class.get(name, 0.0) for name in baseline.classes],
        )
    ]
    expected_counts = {
        "confidence": baseline.confidence_counts,
        "brightness": baseline.brightness_counts,
        "contrast": baseline.contrast_counts,
    }
    for statistic, (metric, edges) in HISTOGRAMS.items():
        cumulative = {
            float(labels["le"]): value
            for labels, value in prometheus.query(
                f"sum by (le) (increase({metric}_bucket[{window}s]))", at=at
            )
            if "le" in labels
        }
        problem = _bucket_mismatch(cumulative, edges)
        if problem:
            observations = round(cumulative.get(math.inf, 0.0))
            checks.append(DriftCheck(statistic, observations, threshold, note=problem))
            continue
        actual = from_cumulative(cumulative) if cumulative else [0.0] * (len(edges) + 1)
        checks.append(judge(statistic, expected_counts[statistic], actual))
    return checks


def _bucket_mismatch(cumulative: Mapping[float, float], edges: Sequence[float]) -> str | None:
    """Why the server's buckets cannot be compared with the baseline's, or None."""
    if not cumulative:
        return None  # no live observations: judged as zero
    served = sorted(edge for edge in cumulative if math.isfinite(edge))
    same = len(served) == len(edges) and all(
        math.isclose(a, b, rel_tol=1e-9) for a, b in zip(served, edges, strict=True)
    )
    if same and math.inf in cumulative:
        return None
    return (
        f"the server's buckets {served} are not tirelib.drift's {list(edges)}: "
        "server and monitoring run different tirelib releases"
    )


def _accuracy_check(
    settings: Settings,
    prometheus: Prometheus,
    version: str,
    offline: float | None,
    window: int,
    at: float,
) -> AccuracyCheck:
    selector = f"{{version={_label(version)}}}"

    def total(metric: str) -> float:
        rows = prometheus.query(f"sum(increase({metric}{selector}[{window}s]))", at=at)
        return sum(value for _, value in rows if math.isfinite(value))

    return judge_accuracy(
        version,
        total("tire_feedback_labels_total"),
        total("tire_feedback_correct_total"),
        offline=offline,
        floor=settings.monitor_accuracy_floor,
        max_drop=settings.monitor_max_accuracy_drop,
        min_labels=settings.monitor_min_labels,
    )


def _roll_back(settings: Settings, report: MonitoringReport, version: str) -> None:
    """Roll production back from ``version``, the version whose live accuracy is low, only if
    it still serves (checked under the registry's lock); a refusal is reported, an unreachable
    MLflow raised (the task retries)."""
    try:
        result = rollback(settings, expected=version)
    except RegistryUnavailableError:
        raise
    except RegistryError as error:  # nothing to roll back to, or production moved under it
        report.rollback_refused = str(error)
        log.warning("auto-rollback of version %s refused: %s", version, error)
        return
    report.rolled_back = result.summary()
    log.warning("auto-rollback: %s", result.describe())


__all__ = [
    "AccuracyCheck",
    "DriftCheck",
    "MonitoringReport",
    "Prometheus",
    "check",
    "evidence_window",
    "judge_accuracy",
    "judge_drift",
    "read_baseline",
]

"""What each registry operation answers: small dataclasses whose ``summary()`` is JSON for XCom.

A candidate that fails the gate is a *metric drop* (``metric_drop``), for the pipeline to report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from tirelib.metrics import METRIC_NAMES

PRODUCTION = "production"
STAGING = "staging"
METRIC_TAGS: tuple[str, ...] = (
    *(f"test_{name}" for name in METRIC_NAMES),
    "inference_ms_per_image",
)
"""The run metrics copied onto a version as tags, and shown by :func:`tirelib.registry.info`."""

Action = Literal["promote", "force", "rollback"]


@dataclass
class Registration:
    """What :func:`register_run` did with one run."""

    model_name: str
    run_id: str
    registered: bool
    version: str | None
    created: bool
    dataset_version: str | None
    model_type: str | None
    metrics: dict[str, float]
    thresholds: str
    reasons: list[str] = field(default_factory=list)

    @property
    def metric_drop(self) -> bool:
        """The run missed the floors (a message for Slack)."""
        return not self.registered

    def describe(self) -> str:
        if self.registered:
            how = "registered as" if self.created else "was already"
            return f"run {self.run_id} {how} version {self.version} of {self.model_name}"
        why = "; ".join(self.reasons)
        return f"run {self.run_id} was not registered ({self.thresholds}): {why}"

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "metric_drop": self.metric_drop, "message": self.describe()}


@dataclass
class Comparison:
    """A candidate and the production model scored on the same test split, and the verdict.

    ``champion_version`` is the production version the comparison was made against (``None``:
    there was none). A promotion applies the comparison only while ``production`` is still that
    version (compare-and-set), so stale evidence is never applied.
    """

    model_name: str
    metric: str
    dataset_version: str
    candidate_version: str
    champion_version: str | None
    candidate_score: float | None
    champion_score: float | None
    margin: float
    meets_thresholds: bool
    beats_champion: bool | None
    reasons: list[str]
    candidate_metrics: dict[str, float]
    champion_metrics: dict[str, float] | None

    @property
    def passed(self) -> bool:
        return self.meets_thresholds and self.beats_champion is not False

    @property
    def metric_drop(self) -> bool:
        """Below the floors or not better than the champion (a message for Slack)."""
        return not self.passed

    @property
    def difference(self) -> float | None:
        """Candidate minus champion, in the metric's units (for loss, negative is better)."""
        if self.candidate_score is None or self.champion_score is None:
            return None
        return self.candidate_score - self.champion_score

    def describe(self) -> str:
        head = (
            f"{self.model_name} version {self.candidate_version} on the test split of "
            f"{self.dataset_version}: {self.metric} {_fmt(self.candidate_score)}"
        )
        if self.champion_version is not None:
            head += (
                f" vs production version {self.champion_version} {_fmt(self.champion_score)} "
                f"(difference {_fmt(self.difference, signed=True)}, margin {self.margin:g})"
            )
        else:
            head += " (no production version yet: thresholds only)"
        verdict = "passes the gate" if self.passed else "fails the gate: " + "; ".join(self.reasons)
        return f"{head}; {verdict}"

    def summary(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "difference": self.difference,
            "passed": self.passed,
            "metric_drop": self.metric_drop,
            "message": self.describe(),
        }


@dataclass
class Staging:
    """Where :func:`stage` pointed the ``staging`` alias, and the scores it chose among."""

    model_name: str
    metric: str
    version: str
    score: float | None
    previous: str | None
    scores: dict[str, float]
    run_id: str | None = None

    def describe(self) -> str:
        moved = "kept" if self.previous == self.version else "moved"
        by = f" ({self.metric} {_fmt(self.score)})" if self.score is not None else ""
        return f"{STAGING} of {self.model_name} {moved} at version {self.version}{by}"

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "message": self.describe()}


@dataclass
class Promotion:
    """What :func:`produce` or :func:`rollback` did to the ``production`` alias."""

    model_name: str
    action: Action
    version: str
    previous: str | None
    promoted: bool
    reason: str
    metric: str | None = None
    comparison: Comparison | None = None
    at: str | None = None
    by: str | None = None

    @property
    def metric_drop(self) -> bool:
        return self.comparison is not None and self.comparison.metric_drop

    def describe(self) -> str:
        if not self.promoted:
            return f"version {self.version} of {self.model_name} not promoted: {self.reason}"
        was = f" (was {self.previous})" if self.previous else ""
        verb = "rolled back to" if self.action == "rollback" else "now"
        head = f"{PRODUCTION} of {self.model_name} {verb} version {self.version}{was}"
        return f"{head}: {self.reason}"

    def summary(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k != "comparison"},
            "comparison": self.comparison.summary() if self.comparison else None,
            "metric_drop": self.metric_drop,
            "message": self.describe(),
        }


@dataclass
class VersionInfo:
    """One version as :func:`info` shows it."""

    version: str
    aliases: list[str]
    model_type: str | None
    dataset_version: str | None
    metrics: dict[str, float]
    run_id: str | None
    run_link: str | None
    model_uri: str
    source: str | None
    artifact_uri: str | None
    tags: dict[str, str]

    def summary(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RegistryInfo:
    """The ``production`` and ``staging`` versions of the registered model."""

    model_name: str
    tracking_uri: str
    exists: bool
    production: VersionInfo | None
    staging: VersionInfo | None
    version_count: int = 0

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"

"""The gate and the choice: which metrics pass, whether a challenger beats the champion, and
which version is best. Pure functions of numbers already measured: nothing here scores a model
or calls a server.

The checks are MLflow's own ``MetricThreshold`` and ``validate_evaluation_results``: value
thresholds (floors; a ceiling for loss) and, once there is a champion, a change threshold
against it as the baseline in the metric the user names (the TFX Evaluator's idea).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from mlflow.models.evaluation import EvaluationResult
from mlflow.models.evaluation.validation import (
    MetricThreshold,
    ModelValidationFailedException,
    validate_evaluation_results,
)

from tirelib.config import Thresholds
from tirelib.metrics import canonical_metric, higher_is_better


def value_thresholds(thresholds: Thresholds) -> dict[str, MetricThreshold]:
    """MLflow value thresholds on the ``test_*`` metrics: the floors (a ceiling for loss)."""
    return {
        f"test_{name}": MetricThreshold(threshold=value, greater_is_better=higher_is_better(name))
        for name, value in thresholds.limits().items()
    }


def change_threshold(thresholds: Thresholds, metric: str) -> dict[str, MetricThreshold]:
    """An MLflow change threshold: ``metric`` beats the baseline by at least ``margin``."""
    name = canonical_metric(metric)
    better = higher_is_better(name)
    # MLflow wants a positive min_absolute_change; a relative change of 0 says "not worse".
    threshold = (
        MetricThreshold(min_absolute_change=float(thresholds.margin), greater_is_better=better)
        if thresholds.margin > 0
        else MetricThreshold(min_relative_change=0.0, greater_is_better=better)
    )
    return {f"test_{name}": threshold}


def check(thresholds: Thresholds, metrics: Mapping[str, float]) -> list[str]:
    """Why ``metrics`` (``test_accuracy``...) miss the floors; empty when they pass."""
    return _validate(value_thresholds(thresholds), metrics, None)


@dataclass(frozen=True)
class Decision:
    """The gate's verdict: floors met, and champion beaten (``None`` when there is none)."""

    meets_thresholds: bool
    beats_champion: bool | None
    reasons: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.meets_thresholds and self.beats_champion is not False


def decide(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    *,
    metric: str,
    thresholds: Thresholds,
) -> Decision:
    """Judge a candidate's ``test_*`` metrics: floors, then ``metric`` against the champion's.

    Both checks run through MLflow's ``validate_evaluation_results``; the champion is the
    baseline. Without a champion only the floors apply.
    """
    name = canonical_metric(metric)
    missing_floors = check(thresholds, candidate)
    if champion is None:
        return Decision(not missing_floors, None, tuple(missing_floors))
    key = f"test_{name}"
    if key not in champion:
        lost = [f"the champion has no {key} to compare with"]
    else:
        lost = _validate(change_threshold(thresholds, name), candidate, champion)
    return Decision(not missing_floors, not lost, tuple(missing_floors + lost))


def _validate(
    thresholds: dict[str, MetricThreshold],
    candidate: Mapping[str, float],
    baseline: Mapping[str, float] | None,
) -> list[str]:
    if not thresholds:
        return []
    # run_id given, so EvaluationResult does not look for an active run.
    results = [
        EvaluationResult(metrics=dict(values), artifacts={}, run_id="")
        for values in (candidate, baseline)
        if values is not None
    ]
    try:
        validate_evaluation_results(thresholds, *results)
    except ModelValidationFailedException as failure:
        return [line.strip() for line in failure.message.splitlines() if line.strip()]
    return []


def finite(value: object) -> float | None:
    """``value`` as a finite float (a number or a tag's text); ``None`` when it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def best_version(candidates: Mapping[str, Mapping[str, object]], metric: str) -> str | None:
    """The version whose ``test_<metric>`` is best; ``None`` when no candidate has one.

    ``candidates`` maps a version number to its test metrics (``test_f1``...; numbers, or the
    text of a version's tags). Higher is better, except for loss. A version whose value is
    missing, not a number or not finite is never best. Ties go to the newest version (the
    highest version number). Staging in the registry and in the pipeline both choose here.
    """
    name = canonical_metric(metric)
    key = f"test_{name}"
    sign = 1.0 if higher_is_better(name) else -1.0
    scored = {
        version: score
        for version, metrics in candidates.items()
        if (score := finite(metrics.get(key))) is not None
    }
    if not scored:
        return None
    return max(scored, key=lambda version: (sign * scored[version], _number(version)))


def _number(version: str) -> int:
    try:
        return int(version)
    except ValueError:  # MLflow numbers versions; anything else sorts first
        return -1


__all__ = [
    "Decision",
    "Thresholds",
    "best_version",
    "change_threshold",
    "check",
    "decide",
    "finite",
    "value_thresholds",
]

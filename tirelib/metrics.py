"""Classification metrics over predicted probabilities, and the names they are logged under.

Everything here is a pure function of numpy arrays. The headline precision, recall and F1 of a
two-class problem are those of the ``defective`` class, because a missed defect is the costly
error; with more classes (or no such class) they are macro averages. Values that are undefined are
``None`` rather than NaN, so they never reach XCom JSON or an MLflow comparison.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tirelib.errors import ConfigurationError, DataError

log = logging.getLogger(__name__)

METRIC_NAMES: tuple[str, ...] = ("loss", "accuracy", "precision", "recall", "f1", "roc_auc")
"""The canonical metric names, in the order they are reported."""

# Rows of a softmax in float32 sum to 1 within a few ulps; anything further off is not a
# probability distribution (logits passed by mistake, say).
_ROW_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ClassificationMetrics:
    """The metrics of one set of predictions.

    ``precision``, ``recall`` and ``f1`` are those of ``positive`` when it is set, else macro
    averages over ``classes``. ``roc_auc`` is ``None`` when undefined (a class missing from the
    true labels); ``loss`` is ``None`` when none was given.
    """

    accuracy: float
    precision: float
    recall: float
    f1: float
    roc_auc: float | None
    loss: float | None
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    classes: list[str]
    count: int
    positive: str | None = None

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat metrics named ``{prefix}loss`` ... ``{prefix}roc_auc``, ready for MLflow.

        ``None`` and non-finite values are left out: NaN breaks XCom JSON and comparisons.
        """
        out: dict[str, float] = {}
        for name in METRIC_NAMES:
            value = getattr(self, name)
            if value is None:
                continue
            if not math.isfinite(value):
                log.warning("leaving out %s%s: %r is not finite", prefix, name, value)
                continue
            out[f"{prefix}{name}"] = float(value)
        return out


def check_predictions(
    y_true: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels against probabilities; return them as int64 and float64 arrays.

    ``y_true`` holds class indices, shape ``(n,)``; ``probabilities`` has shape
    ``(n, len(classes))`` and rows that sum to 1. Raises :class:`DataError` otherwise.
    """
    names = list(classes)
    if len(names) < 2:
        raise DataError(f"need at least two classes, got {names}")
    if len(set(names)) != len(names):
        raise DataError(f"class names must be unique, got {names}")
    y = np.asarray(y_true)
    p = np.asarray(probabilities, dtype=np.float64)
    if y.ndim != 1:
        raise DataError(f"y_true must be one-dimensional, got shape {y.shape}")
    if y.size == 0:
        raise DataError("no predictions to score: y_true is empty")
    if p.ndim != 2 or p.shape != (y.shape[0], len(names)):
        raise DataError(
            f"probabilities must have shape (n, n_classes) = ({y.shape[0]}, {len(names)}), "
            f"got {p.shape}"
        )
    integral = np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_
    if not integral and not (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)):
        raise DataError(f"y_true must hold class indices, got dtype {y.dtype}")
    labels = y.astype(np.int64)
    bad = labels[(labels < 0) | (labels >= len(names))]
    if bad.size:
        raise DataError(
            f"y_true holds indices outside 0..{len(names) - 1} for classes {names}: "
            f"{sorted(set(bad.tolist()))[:10]}"
        )
    if not np.all(np.isfinite(p)):
        raise DataError("probabilities contain NaN or inf")
    sums = p.sum(axis=1)
    if np.any(p < 0) or not np.allclose(sums, 1.0, atol=_ROW_SUM_TOLERANCE):
        worst = float(sums[np.argmax(np.abs(sums - 1.0))])
        raise DataError(
            "each row of probabilities must be non-negative and sum to 1 "
            f"(a row sums to {worst:.4g})"
        )
    return labels, p


def compute_metrics(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
    *,
    loss: float | None = None,
    positive: str = "defective",
) -> ClassificationMetrics:
    """Score predicted ``probabilities`` against class indices ``y_true``.

    With two classes and ``positive`` among them, precision, recall and F1 are that class's;
    otherwise they are macro averages. ROC-AUC is binary on the positive class's probability, or
    one-vs-rest macro with more classes; ``None`` when some class is absent from ``y_true``.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels, p = check_predictions(y_true, probabilities, classes)
    names = list(classes)
    indices = list(range(len(names)))
    predicted = p.argmax(axis=1)

    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=indices, average=None, zero_division=0
    )
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": float(support[i]),
        }
        for i, name in enumerate(names)
    }
    binary_positive = positive if len(names) == 2 and positive in names else None
    if binary_positive is not None:
        head = per_class[binary_positive]
        headline = (head["precision"], head["recall"], head["f1"])
    else:
        headline = (float(precision.mean()), float(recall.mean()), float(f1.mean()))

    confusion = confusion_matrix(labels, predicted, labels=indices)
    return ClassificationMetrics(
        accuracy=float(np.mean(predicted == labels)),
        precision=headline[0],
        recall=headline[1],
        f1=headline[2],
        roc_auc=_roc_auc(labels, p, names, positive),
        loss=None if loss is None else float(loss),
        per_class=per_class,
        confusion=[[int(v) for v in row] for row in confusion],
        classes=names,
        count=int(labels.shape[0]),
        positive=binary_positive,
    )


def _roc_auc(labels: np.ndarray, p: np.ndarray, names: list[str], positive: str) -> float | None:
    """ROC-AUC, or ``None`` when a class is missing from ``labels`` (then it is undefined)."""
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import roc_auc_score

    missing = [name for i, name in enumerate(names) if not np.any(labels == i)]
    if missing:
        log.debug("ROC-AUC undefined: no true samples of %s", missing)
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        if len(names) == 2:
            # AUC of class 1 on p[:, 1] equals that of class 0 on p[:, 0]; use the named one.
            pos = names.index(positive) if positive in names else 1
            value = float(roc_auc_score(labels == pos, p[:, pos]))
        else:
            value = float(
                roc_auc_score(
                    labels, p, multi_class="ovr", average="macro", labels=list(range(len(names)))
                )
            )
    return value if math.isfinite(value) else None


def canonical_metric(name: str) -> str:
    """The canonical name of a metric; accepts the earlier system's names (``Loss``, ``F1``...).

    Matching ignores case and surrounding spaces. Raises :class:`ConfigurationError` listing the
    allowed names for anything else.
    """
    # The earlier names differ from ours only in case, so lower-casing is the whole alias table.
    key = name.strip().lower()
    if key not in METRIC_NAMES:
        raise ConfigurationError(
            f"unknown metric {name!r}; allowed: {', '.join(METRIC_NAMES)} "
            "(case-insensitive, so the earlier Loss, Accuracy, Precision, Recall, F1 also work)"
        )
    return key


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better: true for all but loss."""
    return canonical_metric(metric) != "loss"


__all__ = [
    "METRIC_NAMES",
    "ClassificationMetrics",
    "canonical_metric",
    "check_predictions",
    "compute_metrics",
    "higher_is_better",
]

"""Metric behaviour: hand-computed scores, the positive class, undefined values, metric names."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tirelib.errors import ConfigurationError, DataError
from tirelib.metrics import (
    METRIC_NAMES,
    canonical_metric,
    check_predictions,
    compute_metrics,
    higher_is_better,
)

pytestmark = pytest.mark.unit

CLASSES = ["good", "defective"]


def one_hot_probs(predicted: list[int], n_classes: int = 2, confidence: float = 0.9) -> np.ndarray:
    rest = (1 - confidence) / (n_classes - 1)
    probs = np.full((len(predicted), n_classes), rest)
    probs[np.arange(len(predicted)), predicted] = confidence
    return probs


# Four samples: three defective, one good; the model finds one defect and calls the rest good.
#   y_true     defective defective defective good
#   predicted  defective good      good      good
#   defective: TP 1, FP 0, FN 2 -> precision 1, recall 1/3, F1 2*1*(1/3)/(1+1/3) = 1/2
#   good:      TP 1, FP 2, FN 0 -> precision 1/3, recall 1, F1 1/2
# Scores for defective: positives 0.8, 0.4, 0.05; the negative 0.1 -> AUC 2 of 3 pairs = 2/3.
Y_SMALL = np.array([1, 1, 1, 0])
P_SMALL = np.array([[0.2, 0.8], [0.6, 0.4], [0.95, 0.05], [0.9, 0.1]])


def test_perfect_predictions_score_one() -> None:
    y = np.array([0, 1, 1, 0, 1])
    m = compute_metrics(y, one_hot_probs(y.tolist()), CLASSES, loss=0.01)
    assert (m.accuracy, m.precision, m.recall, m.f1, m.roc_auc) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert m.confusion == [[2, 0], [0, 3]]
    assert m.count == 5
    assert m.positive == "defective"


def test_hand_computed_small_confusion() -> None:
    m = compute_metrics(Y_SMALL, P_SMALL, CLASSES, loss=0.7)
    assert m.accuracy == pytest.approx(2 / 4)
    assert m.precision == pytest.approx(1.0)
    assert m.recall == pytest.approx(1 / 3)
    assert m.f1 == pytest.approx(1 / 2)
    assert m.roc_auc == pytest.approx(2 / 3)
    assert m.confusion == [[1, 0], [2, 1]]  # rows true (good, defective), columns predicted
    assert m.per_class["good"] == pytest.approx(
        {"precision": 1 / 3, "recall": 1.0, "f1": 0.5, "support": 1.0}
    )
    assert m.per_class["defective"]["support"] == 3.0
    assert m.loss == 0.7


def test_positive_class_decides_precision_and_recall() -> None:
    defective = compute_metrics(Y_SMALL, P_SMALL, CLASSES)
    good = compute_metrics(Y_SMALL, P_SMALL, CLASSES, positive="good")
    assert (good.precision, good.recall) == pytest.approx((1 / 3, 1.0))
    assert (defective.precision, defective.recall) != pytest.approx((good.precision, good.recall))
    # Accuracy and the binary AUC do not depend on which class is called positive.
    assert good.accuracy == defective.accuracy
    assert good.roc_auc == pytest.approx(defective.roc_auc)


def test_macro_averages_without_the_positive_class() -> None:
    m = compute_metrics(Y_SMALL, P_SMALL, ["ok", "bad"])
    assert m.positive is None
    assert m.precision == pytest.approx((1 + 1 / 3) / 2)
    assert m.recall == pytest.approx((1 / 3 + 1) / 2)
    assert m.f1 == pytest.approx(0.5)


def test_three_classes_use_macro_averages_and_one_vs_rest_auc() -> None:
    y = np.array([0, 1, 2, 2, 1, 0])
    perfect = compute_metrics(y, one_hot_probs(y.tolist(), 3), ["a", "defective", "c"])
    assert perfect.positive is None
    assert perfect.roc_auc == pytest.approx(1.0)
    wrong = compute_metrics(y, one_hot_probs([0, 1, 2, 2, 1, 1], 3), ["a", "defective", "c"])
    assert wrong.recall == pytest.approx((0.5 + 1 + 1) / 3)
    assert wrong.precision == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert len(wrong.confusion) == 3


def test_single_class_has_no_auc_and_no_nan() -> None:
    y = np.array([1, 1, 1])
    m = compute_metrics(y, one_hot_probs([1, 0, 1]), CLASSES, loss=0.3)
    assert m.roc_auc is None
    flat = m.as_dict("test_")
    assert "test_roc_auc" not in flat
    assert all(math.isfinite(v) for v in flat.values())
    json.dumps(flat, allow_nan=False)


def test_class_absent_from_three_class_truth_has_no_auc() -> None:
    y = np.array([0, 1, 0, 1])
    assert compute_metrics(y, one_hot_probs(y.tolist(), 3), ["a", "b", "c"]).roc_auc is None


def test_as_dict_names_and_values() -> None:
    m = compute_metrics(Y_SMALL, P_SMALL, CLASSES, loss=0.7)
    flat = m.as_dict("val_")
    assert list(flat) == [f"val_{name}" for name in METRIC_NAMES]
    assert flat["val_recall"] == pytest.approx(1 / 3)
    assert set(m.as_dict()) == set(METRIC_NAMES)
    assert "loss" not in compute_metrics(Y_SMALL, P_SMALL, CLASSES).as_dict()


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_as_dict_never_emits_non_finite(loss: float) -> None:
    flat = compute_metrics(Y_SMALL, P_SMALL, CLASSES, loss=loss).as_dict()
    assert "loss" not in flat
    json.dumps(flat, allow_nan=False)


@pytest.mark.parametrize(
    ("y", "probs", "message"),
    [
        (np.array([0, 1, 1]), one_hot_probs([0, 1]), "shape"),
        (np.array([0, 1]), one_hot_probs([0, 1], 3), "shape"),
        (np.array([], dtype=int), np.zeros((0, 2)), "empty"),
        (np.array([[0, 1]]), one_hot_probs([0, 1]), "one-dimensional"),
        (np.array([0, 2]), one_hot_probs([0, 1]), "outside"),
        (np.array([0, 1]), np.array([[2.0, 1.0], [0.5, 0.5]]), "sum to 1"),
        (np.array([0, 1]), np.array([[np.nan, 1.0], [0.5, 0.5]]), "NaN"),
        (np.array(["good", "defective"]), one_hot_probs([0, 1]), "class indices"),
    ],
)
def test_bad_inputs_raise_data_error(y: np.ndarray, probs: np.ndarray, message: str) -> None:
    with pytest.raises(DataError, match=message):
        compute_metrics(y, probs, CLASSES)


def test_fewer_than_two_classes_raise() -> None:
    with pytest.raises(DataError, match="two classes"):
        check_predictions(np.array([0]), np.array([[1.0]]), ["good"])


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("Loss", "loss"),
        ("loss", "loss"),
        ("Accuracy", "accuracy"),
        ("Precision", "precision"),
        ("Recall", "recall"),
        ("F1", "f1"),
        ("f1", "f1"),
        ("roc_auc", "roc_auc"),
        ("ROC_AUC", "roc_auc"),
    ],
)
def test_canonical_metric_accepts_the_earlier_names(alias: str, canonical: str) -> None:
    assert canonical_metric(alias) == canonical


def test_unknown_metric_lists_the_allowed_names() -> None:
    with pytest.raises(ConfigurationError, match="unknown metric 'mAP'") as caught:
        canonical_metric("mAP")
    for name in METRIC_NAMES:
        assert name in str(caught.value)


def test_higher_is_better_only_loss_is_lower() -> None:
    assert higher_is_better("Loss") is False
    assert all(higher_is_better(name) for name in METRIC_NAMES if name != "loss")
    with pytest.raises(ConfigurationError):
        higher_is_better("speed")

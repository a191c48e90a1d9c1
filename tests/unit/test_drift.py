"""The drift baseline made at training, stored with the model, and the monitoring's decisions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tirelib import drift, monitoring
from tirelib.errors import PrometheusUnavailableError, is_retryable
from tirelib.models import get_model, get_spec
from tirelib.preprocessing import Preprocessing
from tirelib.pyfunc import TireClassifier, write_model_files
from tirelib.stack import free_port
from tirelib.train import ImageStatisticsTap

pytestmark = pytest.mark.unit

CLASSES = ["good", "defective"]
JUDGE = {"threshold": 0.25, "min_observations": 100}


def test_the_baseline_counts_predictions_labels_confidence_and_images() -> None:
    targets = np.array([0, 0, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.45, 0.55], [0.3, 0.7], [0.02, 0.98]])
    brightness = np.array([0.05, 0.25, 0.25, 0.95])
    contrast = np.array([0.01, 0.12, 0.12, 0.6])
    baseline = drift.compute_baseline(CLASSES, targets, probabilities, brightness, contrast)
    assert baseline.images == 4
    assert baseline.class_share == {"good": 0.25, "defective": 0.75}
    assert baseline.label_share == {"good": 0.5, "defective": 0.5}
    assert baseline.test_accuracy == pytest.approx(0.75)
    assert baseline.confidence_mean == pytest.approx((0.9 + 0.55 + 0.7 + 0.98) / 4)
    # (.., 0.5], (0.5, 0.6], ..., (0.99, 1.0], overflow: 0.55 -> 2nd, 0.7 -> 3rd, 0.9 -> 5th ...
    assert baseline.confidence_counts == [0, 1, 1, 0, 1, 0, 1, 0, 0]
    assert baseline.brightness_counts == [1, 0, 2, 0, 0, 0, 0, 0, 0, 1, 0]
    assert baseline.contrast_counts == [1, 0, 0, 2, 0, 0, 0, 0, 0, 1]
    for counts, edges in [
        (baseline.confidence_counts, drift.CONFIDENCE_BUCKETS),
        (baseline.brightness_counts, drift.BRIGHTNESS_BUCKETS),
        (baseline.contrast_counts, drift.CONTRAST_BUCKETS),
    ]:
        assert len(counts) == len(edges) + 1 and sum(counts) == 4


def test_the_baseline_refuses_probabilities_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        drift.compute_baseline(CLASSES, np.array([0, 1]), np.ones((3, 2)), np.ones(2), np.ones(2))


def test_the_tap_measures_the_pixels_before_normalisation() -> None:
    spec = get_spec("cnn")
    prep = Preprocessing(8, spec.mean, spec.std)
    dark = torch.full((3, 8, 8), 0.2)
    striped = torch.zeros(3, 8, 8)
    striped[:, :, ::2] = 1.0  # half black, half white: brightness 0.5, contrast 0.5
    pixels = torch.stack([dark, striped, dark])
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    loader = DataLoader(TensorDataset((pixels - mean) / std, torch.tensor([0, 1, 0])), batch_size=2)
    tap = ImageStatisticsTap(loader, prep)
    assert len(tap) == 2
    seen = [targets.tolist() for _, targets in tap]
    assert seen == [[0, 1], [0]]
    brightness, contrast = tap.statistics()
    np.testing.assert_allclose(brightness, [0.2, 0.5, 0.2], atol=1e-5)
    np.testing.assert_allclose(contrast, [0.0, 0.5, 0.0], atol=1e-5)


def _files(tmp_path: Path, baseline: drift.Baseline | None) -> dict[str, str]:
    spec = get_spec("cnn")
    return write_model_files(
        tmp_path,
        get_model("cnn", num_classes=2),
        model_type="cnn",
        classes=CLASSES,
        prep=Preprocessing(32, spec.mean, spec.std),
        baseline=baseline,
    )


def test_the_model_carries_its_baseline(tmp_path: Path) -> None:
    baseline = drift.compute_baseline(
        CLASSES, np.array([0, 1]), np.array([[0.8, 0.2], [0.4, 0.6]]), np.ones(2), np.ones(2)
    )
    artifacts = _files(tmp_path, baseline)
    assert Path(artifacts["baseline"]).name == drift.BASELINE_FILE
    model = TireClassifier()
    assert model.baseline is None  # before loading, as for a classifier built by hand
    model.load(Path(artifacts["config"]), Path(artifacts["weights"]))  # found beside the config
    assert model.baseline == baseline


def test_a_model_without_a_baseline_loads_with_none(tmp_path: Path) -> None:
    artifacts = _files(tmp_path, None)
    assert "baseline" not in artifacts
    model = TireClassifier()
    model.load(Path(artifacts["config"]), Path(artifacts["weights"]))
    assert model.classes == CLASSES and model.baseline is None


# --- the monitoring's decisions ------------------------------------------------------------


def test_psi_is_near_zero_for_the_same_mix_and_large_for_a_shift() -> None:
    baseline = [10, 30, 40, 20]
    same = monitoring.judge_drift("brightness", baseline, [20, 60, 80, 40], **JUDGE)
    assert same.psi is not None and same.psi < 0.01 and not same.drifted
    darker = monitoring.judge_drift("brightness", baseline, [120, 60, 15, 5], **JUDGE)
    assert darker.psi is not None and darker.psi > 0.25 and darker.drifted
    assert "DRIFTED" in darker.describe() and "200 live images" in darker.describe()


def test_drift_is_not_judged_on_too_few_live_images() -> None:
    few = monitoring.judge_drift("confidence", [10, 30, 40, 20], [99, 0, 0, 0], **JUDGE)
    assert few.psi is None and not few.drifted
    assert "99 live images, at least 100 are needed" in few.describe()
    empty = monitoring.judge_drift("confidence", [0, 0, 0, 0], [100, 0, 0, 0], **JUDGE)
    assert empty.psi is None and "no observations" in empty.note


@pytest.mark.parametrize(
    ("labels", "correct", "offline", "below_floor", "dropped"),
    [
        (60, 30, 0.95, True, True),  # 0.5: under the floor and far under the offline accuracy
        (49, 0, 0.95, False, False),  # too few labels: not judged at all
        (100, 84, 0.97, False, True),  # over the floor, but 0.13 under the offline accuracy
        (100, 84, None, False, False),  # no offline accuracy known: the floor alone
        (100, 92, 0.97, False, False),
    ],
)
def test_live_accuracy_is_judged_on_enough_labels(
    labels: int, correct: int, offline: float | None, below_floor: bool, dropped: bool
) -> None:
    check = monitoring.judge_accuracy(
        "7", labels, correct, offline=offline, floor=0.8, max_drop=0.1, min_labels=50
    )
    assert (check.below_floor, check.dropped) == (below_floor, dropped)
    assert check.judged == (labels >= 50)


def test_a_report_alerts_only_when_a_threshold_is_crossed() -> None:
    stable = monitoring.judge_drift("brightness", [10, 30], [20, 60], **JUDGE)
    fine = monitoring.judge_accuracy(
        "3", 80, 76, offline=0.96, floor=0.8, max_drop=0.1, min_labels=50
    )
    quiet = monitoring.MonitoringReport("m", "3", 3600, [stable], fine)
    assert not quiet.alert
    bad = monitoring.judge_accuracy(
        "3", 80, 40, offline=0.96, floor=0.8, max_drop=0.1, min_labels=50
    )
    loud = monitoring.MonitoringReport("m", "3", 3600, [stable], bad)
    assert loud.alert
    text = loud.message()
    assert "live accuracy of version 3: 0.500 on 80 labels (UNDER THE FLOOR, DROPPED" in text
    assert "auto-rollback is off (TIRE_AUTO_ROLLBACK)" in text and "over the last 1 h" in text
    summary = loud.summary()
    assert summary["alert"] and summary["accuracy"]["below_floor"]
    assert summary["drift"][0]["drifted"] is False


def test_the_window_starts_at_the_production_versions_promotion() -> None:
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC).timestamp()
    ten_minutes_ago = (datetime.fromtimestamp(now, UTC) - timedelta(minutes=10)).isoformat()
    assert monitoring.evidence_window(3600, ten_minutes_ago, now) == 600
    assert monitoring.evidence_window(3600, "2026-04-01T00:00:00+00:00", now) == 3600
    assert monitoring.evidence_window(3600, None, now) == 3600
    assert monitoring.evidence_window(3600, "yesterday", now) == 3600
    assert monitoring.evidence_window(3600, datetime.fromtimestamp(now, UTC).isoformat(), now) == 1


def test_an_unreachable_prometheus_is_a_retryable_outage() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(PrometheusUnavailableError, match=f"cannot reach Prometheus at .*:{port}"):
        monitoring.Prometheus(f"http://127.0.0.1:{port}", timeout=2).query("up")
    assert is_retryable(PrometheusUnavailableError("x"))

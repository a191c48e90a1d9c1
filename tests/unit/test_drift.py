"""The drift baseline made at training, stored with the model, and the monitoring's decisions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tirelib import drift
from tirelib.models import get_model, get_spec
from tirelib.preprocessing import Preprocessing
from tirelib.pyfunc import TireClassifier, write_model_files
from tirelib.train import ImageStatisticsTap

pytestmark = pytest.mark.unit

CLASSES = ["good", "defective"]


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

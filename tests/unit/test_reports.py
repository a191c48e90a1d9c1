"""Report behaviour: each plot writes a readable PNG, mistakes lead the grid, reports round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tirelib.errors import ConfigurationError, DataError
from tirelib.metrics import compute_metrics
from tirelib.reports import (
    REPORT_JSON,
    REPORT_MARKDOWN,
    _display_order,
    best_epoch,
    format_per_class_table,
    plot_confusion_matrix,
    plot_roc_pr,
    plot_sample_predictions,
    plot_training_curves,
    write_classification_report,
)

pytestmark = pytest.mark.unit

CLASSES = ["good", "defective"]
Y = np.array([1, 1, 1, 0, 0, 0, 1, 0])
P = np.array(
    [
        [0.2, 0.8],
        [0.6, 0.4],
        [0.95, 0.05],
        [0.9, 0.1],
        [0.3, 0.7],
        [0.8, 0.2],
        [0.1, 0.9],
        [0.7, 0.3],
    ]
)
HISTORY = [
    {"train_loss": 0.9, "val_loss": 0.8, "val_accuracy": 0.6, "val_f1": 0.5, "learning_rate": 1e-3},
    {"train_loss": 0.6, "val_loss": 0.5, "val_accuracy": 0.8, "val_f1": 0.7, "learning_rate": 1e-3},
    {
        "train_loss": 0.4,
        "val_loss": 0.55,
        "val_accuracy": 0.82,
        "val_f1": 0.8,
        "learning_rate": 1e-4,
    },
]


def assert_png(path: Path, min_side: int = 200) -> None:
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= min_side
        assert max(image.size) <= 4000
    assert not list(path.parent.glob(".*.tmp"))


@pytest.mark.parametrize("normalize", [False, True])
def test_confusion_matrix_png(tmp_path: Path, normalize: bool) -> None:
    out = plot_confusion_matrix([[3, 1], [2, 2]], CLASSES, tmp_path / "cm.png", normalize=normalize)
    assert out == tmp_path / "cm.png"
    assert_png(out)


def test_confusion_matrix_must_match_classes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="2x2"):
        plot_confusion_matrix([[1, 2, 3]], CLASSES, tmp_path / "cm.png")


@pytest.mark.parametrize(
    ("y", "probs", "classes"),
    [
        (Y, P, CLASSES),
        (np.array([0, 1, 2, 2, 1, 0]), np.eye(3)[[0, 1, 2, 1, 1, 0]] * 0.7 + 0.1, ["a", "b", "c"]),
        (np.ones(4, dtype=int), P[:4], CLASSES),  # one class: undefined, still a picture
    ],
)
def test_roc_pr_png(tmp_path: Path, y: np.ndarray, probs: np.ndarray, classes: list[str]) -> None:
    assert_png(plot_roc_pr(y, probs, classes, tmp_path / "roc_pr.png"))


def test_training_curves_png(tmp_path: Path) -> None:
    assert_png(plot_training_curves(HISTORY, tmp_path / "curves.png"))


def test_training_curves_tolerate_missing_keys(tmp_path: Path) -> None:
    history = [{"train_loss": 1.0}, {"train_loss": 0.5, "val_loss": 0.4}]
    assert_png(plot_training_curves(history, tmp_path / "curves.png"))


def test_training_curves_need_history(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty"):
        plot_training_curves([], tmp_path / "curves.png")


def test_best_epoch_is_lowest_val_loss() -> None:
    assert best_epoch(HISTORY) == 2
    assert best_epoch([{"val_loss": float("nan")}, {"val_loss": 0.3}]) == 2
    assert best_epoch([{"train_loss": 1.0}]) is None


def test_display_order_puts_mistakes_first() -> None:
    order = _display_order(Y, P)
    wrong = np.flatnonzero(P.argmax(axis=1) != Y)  # samples 1, 2, 4
    assert set(order[: wrong.size]) == set(wrong)
    # Most confident mistake first (0.95), then the correct ones, most confident first (0.9s).
    assert order[0] == 2
    assert list(order[wrong.size :][:2]) == [3, 6]
    assert sorted(order) == list(range(Y.size))


def test_sample_predictions_png_with_mixed_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [
        Image.new("RGB", (64, 48), (200, 30, 30)),
        rng.random((32, 32, 3)),  # HWC in [0, 1]
        rng.normal(size=(3, 32, 32)),  # CHW, normalised with mean/std
        (rng.random((40, 40)) * 255).astype(np.uint8),  # greyscale
        Image.new("L", (20, 20), 128),
        rng.random((24, 24, 1)) * 255,
        rng.random((16, 16, 3)),
        rng.random((16, 16, 3)),
    ]
    out = plot_sample_predictions(images, Y, P, CLASSES, tmp_path / "samples.png", max_images=5)
    assert_png(out)


def test_sample_predictions_checks_arguments(tmp_path: Path) -> None:
    images = [np.zeros((8, 8, 3))] * Y.size
    with pytest.raises(DataError, match="images"):
        plot_sample_predictions(images[:3], Y, P, CLASSES, tmp_path / "s.png")
    with pytest.raises(ConfigurationError, match="max_images"):
        plot_sample_predictions(images, Y, P, CLASSES, tmp_path / "s.png", max_images=0)


def test_plots_leave_pyplot_alone(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plot_confusion_matrix([[1, 0], [0, 1]], CLASSES, tmp_path / "cm.png")
    assert plt.get_fignums() == before


def test_report_round_trips(tmp_path: Path) -> None:
    metrics = compute_metrics(Y, P, CLASSES, loss=0.42)
    json_path, md_path = write_classification_report(
        metrics, tmp_path / "report", extra={"inference_ms_per_image": 3.5, "broken": float("nan")}
    )
    assert (json_path.name, md_path.name) == (REPORT_JSON, REPORT_MARKDOWN)
    report = json.loads(json_path.read_text())
    assert report["metrics"] == metrics.as_dict()
    assert report["per_class"] == metrics.per_class
    assert report["confusion_matrix"] == metrics.confusion
    assert report["classes"] == CLASSES
    assert report["positive"] == "defective"
    assert report["extra"] == {"inference_ms_per_image": 3.5, "broken": None}
    markdown = md_path.read_text()
    for name in CLASSES:
        assert f"| {name} |" in markdown
    assert "inference_ms_per_image" in markdown
    assert "| true \\ predicted | good | defective |" in markdown


def test_per_class_table_is_aligned() -> None:
    metrics = compute_metrics(Y, P, CLASSES, loss=0.42)
    table = format_per_class_table(metrics)
    lines = table.splitlines()
    rows = [line for line in lines if line.strip().startswith(("good", "defective", "macro"))]
    assert len(rows) == 3
    assert len({len(line) for line in rows}) == 1
    assert "precision" in lines[0]
    assert "accuracy" in table

"""Evaluation pictures (PNG) and per-class report files for a run's artefacts.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure`` rendered by Agg),
never through ``pyplot``: nothing is registered in pyplot's global figure list, no backend is
switched for the caller, and a figure is freed as soon as it goes out of scope. Each file is
written next to its final name and then renamed, so a failure never leaves half a file.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tirelib.errors import ConfigurationError, DataError
from tirelib.metrics import ClassificationMetrics, check_predictions

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL import Image

log = logging.getLogger(__name__)

REPORT_JSON = "classification_report.json"
REPORT_MARKDOWN = "classification_report.md"

_DPI = 100
_THUMBNAIL = 160  # pixels; enough to see a defect in a grid, small enough to keep the PNG light
_RIGHT = "tab:green"
_WRONG = "tab:red"


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _save(fig: Figure, path: Path | str) -> Path:
    """Render ``fig`` as PNG to ``path`` via a temporary file, so the write is all or nothing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    FigureCanvasAgg(fig)
    try:
        fig.savefig(tmp, format="png", dpi=_DPI)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
        fig.clear()
    log.debug("wrote %s", target)
    return target


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    log.debug("wrote %s", path)
    return path


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else 0.0


def plot_confusion_matrix(
    confusion: Sequence[Sequence[int]] | np.ndarray,
    classes: Sequence[str],
    path: Path | str,
    *,
    normalize: bool = False,
) -> Path:
    """Confusion matrix (rows true, columns predicted) with counts and row percentages.

    With ``normalize`` the colours show each row's fractions (recall on the diagonal), which keeps
    a small class readable beside a large one; the annotations are the same either way.
    """
    counts = np.asarray(confusion, dtype=np.int64)
    n = len(classes)
    if counts.shape != (n, n):
        raise DataError(
            f"confusion matrix must be {n}x{n} for classes {list(classes)}, got {counts.shape}"
        )
    totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    shown = fractions if normalize else counts.astype(np.float64)
    vmax = 1.0 if normalize else max(float(counts.max()), 1.0)

    size = 2.2 + 1.1 * n
    fig = _figure(size + 1.2, size)
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, label="fraction of true class" if normalize else "count")
    for i in range(n):
        for j in range(n):
            # White on dark cells, black on light ones.
            colour = "white" if shown[i, j] > 0.6 * vmax else "black"
            ax.text(
                j,
                i,
                f"{counts[i, j]}\n({_pct(counts[i, j], totals[i, 0]):.1f}%)",
                ha="center",
                va="center",
                color=colour,
                fontsize=11,
            )
    ax.set_xticks(
        range(n),
        labels=list(classes),
        rotation=30 if n > 3 else 0,
        ha="right" if n > 3 else "center",
    )
    ax.set_yticks(range(n), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    title = "Confusion matrix (row-normalised)" if normalize else "Confusion matrix"
    ax.set_title(f"{title}, n = {int(counts.sum())}")
    return _save(fig, path)


def _curve_classes(classes: Sequence[str], positive: str) -> list[int]:
    """The classes to draw a one-vs-rest curve for: the positive one in a binary problem."""
    if len(classes) == 2:
        return [list(classes).index(positive) if positive in classes else 1]
    return list(range(len(classes)))


def plot_roc_pr(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
    path: Path | str,
    *,
    positive: str = "defective",
) -> Path:
    """ROC curve (AUC, chance diagonal) beside the precision-recall curve (average precision).

    A binary problem gets the curves of ``positive`` (class 1 if it is absent); more classes get
    one one-vs-rest curve each. A class with no true samples has no curve.
    """
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    labels, p = check_predictions(y_true, probabilities, classes)
    fig = _figure(11.0, 5.0)
    roc_ax, pr_ax = fig.subplots(1, 2)
    roc_ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    drawn = 0
    for k in _curve_classes(classes, positive):
        truth = labels == k
        if truth.all() or not truth.any():
            log.info("no ROC/PR curve for %s: y_true has no negatives or no positives", classes[k])
            continue
        fpr, tpr, _ = roc_curve(truth, p[:, k])
        roc_ax.plot(fpr, tpr, linewidth=2, label=f"{classes[k]} (AUC = {auc(fpr, tpr):.3f})")
        precision, recall, _ = precision_recall_curve(truth, p[:, k])
        ap = average_precision_score(truth, p[:, k])
        line = pr_ax.step(
            recall, precision, where="post", linewidth=2, label=f"{classes[k]} (AP = {ap:.3f})"
        )
        # A classifier that guesses scores the positive rate on this axis.
        pr_ax.axhline(truth.mean(), linestyle=":", linewidth=1, color=line[0].get_color())
        drawn += 1
    if drawn == 0:
        for ax in (roc_ax, pr_ax):
            ax.text(0.5, 0.5, "undefined: y_true holds a single class", ha="center", va="center")
    roc_ax.set(
        xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate"
    )
    roc_ax.set_title("ROC curve")
    roc_ax.set_aspect("equal")
    pr_ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
    pr_ax.set_title("Precision-recall curve (dotted: positive rate)")
    pr_ax.set_aspect("equal")
    for ax, corner in ((roc_ax, "lower right"), (pr_ax, "lower left")):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc=corner, fontsize=9)
    fig.suptitle(f"n = {labels.size}")
    return _save(fig, path)


def _series(history: Sequence[Mapping[str, float]], key: str) -> np.ndarray:
    return np.array([float(row.get(key, math.nan)) for row in history], dtype=np.float64)


def _has(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).any())


def best_epoch(history: Sequence[Mapping[str, float]]) -> int | None:
    """The 1-based epoch with the lowest finite ``val_loss``, or ``None`` when there is none."""
    losses = _series(history, "val_loss")
    if not _has(losses):
        return None
    return int(np.nanargmin(np.where(np.isfinite(losses), losses, np.nan))) + 1


def plot_training_curves(history: Sequence[Mapping[str, float]], path: Path | str) -> Path:
    """Per-epoch losses, validation accuracy/F1 and learning rate (log scale) in three panels.

    ``history`` holds one mapping per epoch (epochs count from 1 unless a row has ``epoch``);
    missing values leave gaps. A dashed line marks the best epoch (lowest ``val_loss``).
    """
    if not history:
        raise DataError("cannot plot training curves: the history is empty")
    epochs = np.array([row.get("epoch", i + 1) for i, row in enumerate(history)], dtype=np.float64)
    fig = _figure(15.0, 4.2)
    loss_ax, score_ax, lr_ax = fig.subplots(1, 3)
    panels: list[tuple[Axes, str, tuple[str, ...]]] = [
        (loss_ax, "Loss", ("train_loss", "val_loss")),
        (score_ax, "Validation scores", ("val_accuracy", "val_f1", "val_precision", "val_recall")),
        (lr_ax, "Learning rate", ("learning_rate",)),
    ]
    for ax, title, keys in panels:
        plotted = 0
        for key in keys:
            values = _series(history, key)
            if _has(values):
                ax.plot(epochs, values, marker="o", markersize=3, linewidth=1.5, label=key)
                plotted += 1
        if plotted == 0:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    rates = _series(history, "learning_rate")
    if _has(rates) and np.all(rates[np.isfinite(rates)] > 0):
        lr_ax.set_yscale("log")
    if _has(_series(history, "val_accuracy")) or _has(_series(history, "val_f1")):
        score_ax.set_ylim(min(0.0, score_ax.get_ylim()[0]), 1.02)
    best = best_epoch(history)
    if best is not None:
        x = epochs[best - 1]
        for ax, _, _ in panels:
            ax.axvline(x, color="grey", linestyle="--", linewidth=1, label=f"best epoch {x:g}")
    for ax, _, _ in panels:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    # Whole epochs only on the x axis.
    from matplotlib.ticker import MaxNLocator

    for ax, _, _ in panels:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


def _display_order(y_true: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Indices to show: mistakes first (most confident first), then correct ones likewise."""
    y = np.asarray(y_true)
    p = np.asarray(probabilities)
    predicted = p.argmax(axis=1)
    confidence = p.max(axis=1)
    wrong = predicted != y
    # lexsort sorts by the last key first: correct after wrong, then by falling confidence;
    # the index keeps ties in their original order.
    return np.lexsort((np.arange(y.size), -confidence, ~wrong))


def _thumbnail(image: np.ndarray | Image.Image) -> np.ndarray:
    """An RGB (or grey) uint8 array no larger than the thumbnail size."""
    from PIL import Image

    if isinstance(image, Image.Image):
        picture = image if image.mode in ("RGB", "L") else image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)  # CHW, as a tensor holds it
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3):
            raise DataError(f"cannot show an image of shape {array.shape}")
        if array.dtype != np.uint8:
            array = array.astype(np.float64)
            low, high = float(np.nanmin(array)), float(np.nanmax(array))
            if low >= 0 and high <= 1:
                pass
            elif low >= 0 and high <= 255:
                array = array / 255.0
            else:  # normalised with mean/std: stretch back to [0, 1] for display
                array = (array - low) / (high - low or 1.0)
            array = (np.nan_to_num(array) * 255).round().astype(np.uint8)
        picture = Image.fromarray(array)
    picture = picture.copy()
    picture.thumbnail((_THUMBNAIL, _THUMBNAIL))
    return np.asarray(picture)


def plot_sample_predictions(
    images: Sequence[np.ndarray | Image.Image],
    y_true: np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
    path: Path | str,
    *,
    max_images: int = 16,
) -> Path:
    """A grid of up to ``max_images`` thumbnails titled ``true: X / pred: Y (p=0.93)``.

    Mistakes come first (titled in red), then the most confident correct predictions (green).
    """
    if max_images < 1:
        raise ConfigurationError(f"max_images must be at least 1, got {max_images}")
    labels, p = check_predictions(y_true, probabilities, classes)
    if len(images) != labels.size:
        raise DataError(f"got {len(images)} images for {labels.size} labels")
    order = _display_order(labels, p)[:max_images]
    predicted = p.argmax(axis=1)
    mistakes = int(np.sum(predicted != labels))

    ncols = math.ceil(math.sqrt(order.size))
    nrows = math.ceil(order.size / ncols)
    fig = _figure(2.8 * ncols, 2.9 * nrows + 0.4)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, index in zip(axes, order, strict=False):
        thumb = _thumbnail(images[int(index)])
        ax.imshow(thumb, cmap="gray" if thumb.ndim == 2 else None, vmin=0, vmax=255)
        t, y = int(labels[index]), int(predicted[index])
        ax.set_title(
            f"true: {classes[t]} / pred: {classes[y]} (p={p[index, y]:.2f})",
            color=_RIGHT if t == y else _WRONG,
            fontsize=9,
        )
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"{mistakes} of {labels.size} predictions wrong; mistakes first")
    return _save(fig, path)


def _finite_or_none(value: float) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def report_dict(
    metrics: ClassificationMetrics, *, extra: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """The JSON-safe content of the classification report (no NaN: undefined values are null)."""
    extras = {key: _finite_or_none(value) for key, value in (extra or {}).items()}
    return {
        "count": metrics.count,
        "classes": list(metrics.classes),
        "positive": metrics.positive,
        "average": "binary" if metrics.positive is not None else "macro",
        "metrics": metrics.as_dict(),
        "per_class": {
            name: {key: float(value) for key, value in row.items()}
            for name, row in metrics.per_class.items()
        },
        "confusion_matrix": [list(map(int, row)) for row in metrics.confusion],
        "extra": extras,
    }


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _markdown(report: Mapping[str, Any]) -> str:
    classes: list[str] = report["classes"]
    if report["positive"] is not None:
        scope = f"Precision, recall and F1 are those of class `{report['positive']}`."
    else:
        scope = "Precision, recall and F1 are macro averages over the classes."
    lines = [
        "# Classification report",
        "",
        f"{report['count']} samples; classes: {', '.join(f'`{c}`' for c in classes)}. {scope}",
        "",
        "## Overall",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {value:.4f} |" for name, value in report["metrics"].items()]
    for name, value in report["extra"].items():
        lines.append(f"| {_md(name)} | {'n/a' if value is None else f'{value:.4f}'} |")
    lines += [
        "",
        "## Per class",
        "",
        "| class | precision | recall | f1 | support |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in report["per_class"].items():
        lines.append(
            f"| {_md(name)} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} "
            f"| {int(row['support'])} |"
        )
    lines += [
        "",
        "## Confusion matrix",
        "",
        "Rows are true classes, columns predicted ones.",
        "",
        "| true \\ predicted | " + " | ".join(_md(c) for c in classes) + " |",
        "|---|" + "---:|" * len(classes),
    ]
    for name, row in zip(classes, report["confusion_matrix"], strict=True):
        lines.append(f"| {_md(name)} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_classification_report(
    metrics: ClassificationMetrics,
    directory: Path,
    *,
    extra: Mapping[str, float] | None = None,
) -> tuple[Path, Path]:
    """Write ``classification_report.json`` and ``.md`` into ``directory``; return both paths.

    ``extra`` adds numbers such as ``inference_ms_per_image`` to the overall section.
    """
    report = report_dict(metrics, extra=extra)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = _write_text(
        folder / REPORT_JSON, json.dumps(report, indent=2, allow_nan=False) + "\n"
    )
    md_path = _write_text(folder / REPORT_MARKDOWN, _markdown(report))
    return json_path, md_path


def format_per_class_table(metrics: ClassificationMetrics, *, digits: int = 4) -> str:
    """An aligned text table like scikit-learn's ``classification_report``, for a terminal."""
    keys = ("precision", "recall", "f1")
    names = list(metrics.per_class)
    scores = np.array([[metrics.per_class[n][k] for k in keys] for n in names], dtype=np.float64)
    supports = np.array([metrics.per_class[n]["support"] for n in names], dtype=np.float64)
    total = int(supports.sum())
    width = max(len("weighted avg"), *(len(name) for name in names))

    def line(label: str, cells: Sequence[float | None], support: int) -> str:
        text = [" " * 10 if v is None else f"{v:>10.{digits}f}" for v in cells]
        return f"{label:>{width}} {' '.join(text)} {support:>10d}"

    lines = [f"{'':>{width}} {'precision':>10} {'recall':>10} {'f1-score':>10} {'support':>10}", ""]
    lines += [
        line(n, row.tolist(), int(s)) for n, row, s in zip(names, scores, supports, strict=True)
    ]
    lines += ["", line("accuracy", [None, None, metrics.accuracy], total)]
    lines.append(line("macro avg", scores.mean(axis=0).tolist(), total))
    weighted = np.average(scores, axis=0, weights=supports) if total else np.zeros(len(keys))
    lines.append(line("weighted avg", weighted.tolist(), total))
    footer = []
    if metrics.positive is not None:
        footer.append(f"precision/recall/f1 are reported for class {metrics.positive!r}")
    footer += [
        f"{name} {value:.{digits}f}"
        for name, value in metrics.as_dict().items()
        if name in ("loss", "roc_auc")
    ]
    if footer:
        lines += ["", *footer]
    return "\n".join(lines)


__all__ = [
    "REPORT_JSON",
    "REPORT_MARKDOWN",
    "best_epoch",
    "format_per_class_table",
    "plot_confusion_matrix",
    "plot_roc_pr",
    "plot_sample_predictions",
    "plot_training_curves",
    "report_dict",
    "write_classification_report",
]

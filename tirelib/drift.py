"""What a model's inputs and outputs looked like at training, and how far live traffic has moved.

The training run stores a :class:`Baseline` with the model (class balance, confidence
distribution, image brightness and contrast on the test split). The server exports the same
statistics for live traffic as Prometheus histograms over the *same* bucket edges declared here,
so the monitoring DAG can compare the two bucket by bucket with the population stability index.

Brightness is the mean of an image's grayscale pixels in [0, 1], after resizing to the model's
input size and before normalisation; contrast is their standard deviation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

# The baseline's file name, beside the logged model's config and as an artifact of its run.
BASELINE_FILE = "baseline.json"

# Upper bucket edges (Prometheus ``le``), shared by the baseline and the server's histograms.
CONFIDENCE_BUCKETS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
BRIGHTNESS_BUCKETS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))
CONTRAST_BUCKETS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)

# ITU-R BT.601 luma weights, as PIL's convert("L") uses.
_LUMA = (0.299, 0.587, 0.114)


def image_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image brightness and contrast of an NHWC or NCHW batch of RGB pixels in [0, 1]."""
    batch = np.asarray(images, dtype=np.float32)
    if batch.ndim != 4:
        raise ValueError(f"expected a batch of images (4 dimensions), got shape {batch.shape}")
    channels_last = batch.shape[-1] in (1, 3) and batch.shape[1] not in (1, 3)
    axis = 3 if channels_last else 1
    if batch.shape[axis] == 3:
        # A weighted sum of channel views: no transposed copy of the batch (np.tensordot makes
        # one), so the server can afford it on every request.
        red, green, blue = np.moveaxis(batch, axis, 0)  # views
        gray = red * np.float32(_LUMA[0])
        gray += green * np.float32(_LUMA[1])
        gray += blue * np.float32(_LUMA[2])
    else:
        gray = batch.squeeze(axis)
    flat = gray.reshape(gray.shape[0], -1)
    return flat.mean(axis=1), flat.std(axis=1)


def normalised_image_statistics(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`image_statistics` of an NCHW RGB batch normalised per channel by ``mean`` and
    ``std``, without undoing the normalisation: the gray image is a weighted sum of the
    normalised channels plus a constant, which moves the brightness and leaves the contrast."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected an NCHW batch of RGB images, got shape {images.shape}")
    weights = [np.float32(luma * s) for luma, s in zip(_LUMA, std, strict=True)]
    gray = images[:, 0] * weights[0]
    gray += images[:, 1] * weights[1]
    gray += images[:, 2] * weights[2]
    flat = gray.reshape(gray.shape[0], -1)
    offset = sum(luma * m for luma, m in zip(_LUMA, mean, strict=True))
    return flat.mean(axis=1) + np.float32(offset), flat.std(axis=1)


def histogram(values: Sequence[float] | np.ndarray, edges: Sequence[float]) -> list[int]:
    """Counts per bucket ``(previous edge, edge]``, plus a last bucket over the highest edge."""
    data = np.asarray(values, dtype=np.float64).ravel()
    positions = np.searchsorted(np.asarray(edges, dtype=np.float64), data, side="left")
    return np.bincount(positions, minlength=len(edges) + 1).astype(int).tolist()


class Baseline(BaseModel):
    """The served model's reference statistics, computed on its test split at training."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    classes: list[str]
    images: int = Field(ge=0, description="test images the statistics were computed on")
    class_share: dict[str, float] = Field(description="share of each predicted class")
    label_share: dict[str, float] = Field(description="share of each true class")
    confidence_mean: float
    test_accuracy: float
    confidence_counts: list[int] = Field(description="per CONFIDENCE_BUCKETS bucket, + overflow")
    brightness_counts: list[int] = Field(description="per BRIGHTNESS_BUCKETS bucket, + overflow")
    contrast_counts: list[int] = Field(description="per CONTRAST_BUCKETS bucket, + overflow")


def compute_baseline(
    classes: Sequence[str],
    targets: np.ndarray,
    probabilities: np.ndarray,
    brightness: np.ndarray,
    contrast: np.ndarray,
) -> Baseline:
    """The baseline of a model from its test split: true labels, predicted probabilities (one
    row per image, one column per class) and each image's brightness and contrast."""
    y = np.asarray(targets, dtype=np.int64).ravel()
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape != (y.shape[0], len(classes)):
        raise ValueError(
            f"expected probabilities of shape ({y.shape[0]}, {len(classes)}), got {p.shape}"
        )
    n = y.shape[0]
    predicted = p.argmax(axis=1)
    confidence = p.max(axis=1)

    def shares(indices: np.ndarray) -> dict[str, float]:
        counts = np.bincount(indices, minlength=len(classes))[: len(classes)]
        return {name: float(c) / n if n else 0.0 for name, c in zip(classes, counts, strict=True)}

    return Baseline(
        classes=list(classes),
        images=n,
        class_share=shares(predicted),
        label_share=shares(y),
        confidence_mean=float(confidence.mean()) if n else 0.0,
        test_accuracy=float((predicted == y).mean()) if n else 0.0,
        confidence_counts=histogram(confidence, CONFIDENCE_BUCKETS),
        brightness_counts=histogram(brightness, BRIGHTNESS_BUCKETS),
        contrast_counts=histogram(contrast, CONTRAST_BUCKETS),
    )


def psi(expected: Sequence[float], actual: Sequence[float], *, floor: float = 1e-4) -> float:
    """Population stability index between two histograms over the same buckets.

    ``sum((a - e) * ln(a / e))`` over bucket shares, each share floored at ``floor`` so an
    empty bucket does not make it infinite. Rules of thumb: under 0.1 stable, 0.1 to 0.25 a
    moderate shift, over 0.25 a major one.
    """
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape:
        raise ValueError(f"histograms differ in buckets: {e.shape[0]} and {a.shape[0]}")
    if e.sum() <= 0 or a.sum() <= 0:
        raise ValueError("a histogram with no observations has no distribution to compare")
    e_share = np.maximum(e / e.sum(), floor)
    a_share = np.maximum(a / a.sum(), floor)
    return float(np.sum((a_share - e_share) * np.log(a_share / e_share)))


def from_cumulative(buckets: Mapping[float, float]) -> list[float]:
    """Per-bucket counts from Prometheus's cumulative ``le`` buckets (``+Inf`` included)."""
    edges = sorted(buckets)
    counts: list[float] = []
    previous = 0.0
    for edge in edges:
        value = float(buckets[edge])
        counts.append(max(value - previous, 0.0))
        previous = value
    return counts

"""Evaluation: score a logged model on a version's test split, and write its report and pictures.

The same function scores a fresh challenger and the model in production, so both are judged on
the same held-out images; what it measures is logged to the run that made the model.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from tirelib import reports
from tirelib.data import Record, TireImageDataset, ensure_splits
from tirelib.errors import DataError, RegistryError
from tirelib.metrics import ClassificationMetrics, compute_metrics
from tirelib.preprocessing import softmax
from tirelib.progress import progress_bar
from tirelib.settings import Settings
from tirelib.storage import ContentCache, ObjectStore
from tirelib.urls import mask_credentials, masked_url

log = logging.getLogger(__name__)

MODEL_URI_TAG = "tire.model_uri"
SAMPLE_IMAGES = 16


@dataclass
class Evaluation:
    """A model's scores on one version's test split (JSON-friendly through :meth:`summary`)."""

    model_uri: str
    dataset_version: str
    metrics: ClassificationMetrics
    ms_per_image: float

    def flat(self, prefix: str = "test_") -> dict[str, float]:
        return {**self.metrics.as_dict(prefix), "inference_ms_per_image": self.ms_per_image}

    def summary(self) -> dict[str, Any]:
        return {
            "model_uri": self.model_uri,
            "dataset_version": self.dataset_version,
            "metrics": self.flat(),
        }


@dataclass
class Predictions:
    targets: np.ndarray
    probabilities: np.ndarray
    loss: float
    seconds: float

    @property
    def ms_per_image(self) -> float:
        return 1000 * self.seconds / max(len(self.targets), 1)


def predict(
    model: nn.Module,
    loader: DataLoader[Any],
    device: torch.device,
    *,
    amp: bool = False,
    desc: str = "eval",
    progress: bool | None = None,
) -> Predictions:
    """Probabilities, targets and mean loss over ``loader``; time counts the forward passes."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    targets, probabilities = [], []
    loss, seconds = 0.0, 0.0
    with torch.inference_mode():
        for images, labels in progress_bar(
            loader, total=len(loader), desc=desc, unit="batch", enabled=progress
        ):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            start = time.perf_counter()
            with torch.autocast(device.type, enabled=amp):
                logits = model(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - start
            loss += criterion(logits.float(), labels).item()
            probabilities.append(softmax(logits).cpu().numpy())
            targets.append(labels.cpu().numpy())
    y = np.concatenate(targets) if targets else np.zeros(0, dtype=np.int64)
    p = np.concatenate(probabilities) if probabilities else np.zeros((0, 2), dtype=np.float32)
    return Predictions(y, p, loss / max(len(y), 1), seconds)


def write_artifacts(
    directory: Path,
    metrics: ClassificationMetrics,
    targets: np.ndarray,
    probabilities: np.ndarray,
    images: Sequence[Image.Image],
    *,
    history: Sequence[Mapping[str, float]] = (),
    extra: Mapping[str, float] | None = None,
    skipped: Sequence[Mapping[str, str]] = (),
) -> Path:
    """Confusion matrix, ROC/PR curves, training curves, sample predictions and the report."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    classes = metrics.classes
    reports.plot_confusion_matrix(metrics.confusion, classes, directory / "confusion_matrix.png")
    reports.plot_roc_pr(targets, probabilities, classes, directory / "roc_pr_curves.png")
    if history:
        reports.plot_training_curves(history, directory / "training_curves.png")
    if len(images):
        reports.plot_sample_predictions(
            images, targets, probabilities, classes, directory / "sample_predictions.png"
        )
    reports.write_classification_report(metrics, directory, extra=extra)
    (directory / "skipped_files.json").write_text(json.dumps(list(skipped), indent=1))
    return directory


def sample_images(records: Sequence[Record], cache: ContentCache) -> list[Image.Image]:
    """The test images as PIL images, for the grid of sample predictions."""
    images = []
    for record in records:
        with Image.open(cache.path(record.sha256)) as image:
            images.append(image.convert("RGB"))
    return images


def evaluate_model(
    model_uri: str,
    dataset_version: str,
    settings: Settings,
    *,
    artifact_dir: Path | None = None,
    progress: bool | None = None,
) -> Evaluation:
    """Score the logged model ``model_uri`` on ``dataset_version``'s test split.

    The model's own preprocessing (carried with it) prepares the images.
    """
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from tirelib import tracking
    from tirelib.pyfunc import TireClassifier

    store = ObjectStore.for_data(settings)
    test = ensure_splits(store, dataset_version)["test"]
    uri = settings.mlflow_tracking_uri
    try:
        with tracking.outages_are_retryable(uri, f"loading {model_uri}"):
            loaded = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as error:  # MLflow answered: no such model, version or alias
        raise RegistryError(
            f"MLflow at {masked_url(uri)} cannot load {model_uri}: "
            f"{mask_credentials(str(error.message))}"
        ) from error
    model = loaded.unwrap_python_model()
    if not isinstance(model, TireClassifier):
        raise DataError(f"{model_uri} is not a tire classifier (it is {type(model).__name__})")
    if list(model.classes) != list(test.classes):
        raise DataError(
            f"{model_uri} predicts {model.classes} but version {dataset_version!r} has "
            f"classes {test.classes}"
        )
    cache = ContentCache(settings.resolved_cache_dir)
    dataset = TireImageDataset.from_split(test, cache, model.prep)
    dataset.prepare(store, max_workers=settings.s3_max_workers, progress=progress)
    loader: DataLoader[Any] = DataLoader(dataset, batch_size=64)  # type: ignore[arg-type]
    result = predict(model.network, loader, torch.device("cpu"), desc="evaluate", progress=progress)
    metrics = compute_metrics(result.targets, result.probabilities, test.classes, loss=result.loss)
    if artifact_dir is not None:
        write_artifacts(
            artifact_dir,
            metrics,
            result.targets,
            result.probabilities,
            sample_images(test.records, cache),
            extra={"inference_ms_per_image": result.ms_per_image},
        )
    return Evaluation(model_uri, dataset_version, metrics, result.ms_per_image)


def evaluate_run(
    run_id: str,
    settings: Settings,
    *,
    dataset_version: str | None = None,
    progress: bool | None = None,
) -> Evaluation:
    """Score the model a training run logged, on its own version or ``dataset_version``.

    Metrics go back to the run: as ``test_*`` on its own version, as
    ``eval.<version>.test_*`` on another; the report and pictures under ``evaluation/<version>``.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from tirelib import tracking

    tracking.configure(settings)
    uri = settings.mlflow_tracking_uri
    try:
        with tracking.outages_are_retryable(uri, f"reading run {run_id}"):
            run = mlflow.get_run(run_id)
    except MlflowException as error:  # MLflow answered: there is no such run
        raise DataError(
            f"no MLflow run {run_id!r} at {masked_url(uri)}: {mask_credentials(str(error.message))}"
        ) from error
    model_uri = run.data.tags.get(MODEL_URI_TAG)
    if not model_uri:
        raise DataError(f"run {run_id} has no logged model (tag {MODEL_URI_TAG} is missing)")
    own_version = run.data.params.get("dataset_version")
    version = dataset_version or own_version
    if not version:
        raise DataError(f"run {run_id} has no dataset_version param; pass --dataset-version")
    with tempfile.TemporaryDirectory(prefix="tire-eval-") as tmp:
        evaluation = evaluate_model(
            model_uri, version, settings, artifact_dir=Path(tmp), progress=progress
        )
        metrics = evaluation.flat()
        if version != own_version:
            metrics = {f"eval.{version}.{name}": value for name, value in metrics.items()}
        with (
            tracking.outages_are_retryable(uri, f"logging the evaluation to run {run_id}"),
            mlflow.start_run(run_id=run_id),
        ):
            mlflow.log_metrics(metrics)
            mlflow.log_artifacts(tmp, f"evaluation/{version}")
    return evaluation

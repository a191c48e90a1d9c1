"""Training: a validated configuration, the epoch loop, early stopping, tracking in MLflow.

The recipe follows torchvision's reference script: :func:`load_data`, :func:`train_one_epoch`,
:func:`predict`, and :func:`train` that ties them together. Every hyperparameter is checked by
:class:`TrainConfig` (declared, torch-free, in :mod:`tirelib.config`) before anything is
downloaded or any MLflow run is opened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from tirelib import drift
from tirelib.config import OPTIMIZERS, SCHEDULERS, SweepMember, TrainConfig, make_config
from tirelib.data import SplitManifest, TireImageDataset, ensure_splits, read_manifest
from tirelib.evaluate import MODEL_URI_TAG, predict, sample_images, write_artifacts
from tirelib.metrics import compute_metrics
from tirelib.models import get_model, get_spec
from tirelib.preprocessing import Preprocessing, train_transform
from tirelib.progress import progress_bar
from tirelib.runtime import SampleTap
from tirelib.settings import Settings
from tirelib.storage import ContentCache, ObjectStore

log = logging.getLogger(__name__)

# --- early stopping ------------------------------------------------------------------------


@dataclass
class EarlyStopping:
    """Stop when the targets are met, or when nothing improves for ``patience`` epochs.

    The targets are the earlier system's: validation loss at most ``min_loss`` *and* accuracy at
    least ``min_accuracy`` (either alone when only one is set); the model then qualifies. An
    epoch improves when loss falls, or accuracy rises, by more than ``delta`` against the best
    seen so far.
    """

    patience: int = 3
    delta: float = 0.0
    min_loss: float | None = None
    min_accuracy: float | None = None
    best_loss: float = math.inf
    best_accuracy: float = -math.inf
    stale_epochs: int = 0
    reason: str = ""

    def targets_met(self, loss: float, accuracy: float) -> bool:
        if self.min_loss is None and self.min_accuracy is None:
            return False
        loss_ok = self.min_loss is None or loss <= self.min_loss
        accuracy_ok = self.min_accuracy is None or accuracy >= self.min_accuracy
        return loss_ok and accuracy_ok

    def step(self, loss: float, accuracy: float) -> bool:
        """Record one epoch's validation numbers; True means stop now."""
        improved = False
        if loss < self.best_loss - self.delta:
            improved = True
        if accuracy > self.best_accuracy + self.delta:
            improved = True
        self.best_loss = min(self.best_loss, loss)
        self.best_accuracy = max(self.best_accuracy, accuracy)
        self.stale_epochs = 0 if improved else self.stale_epochs + 1
        if self.targets_met(loss, accuracy):
            self.reason = (
                f"targets met: val_loss {loss:.4f} (<= {self.min_loss}), "
                f"val_accuracy {accuracy:.4f} (>= {self.min_accuracy})"
            )
            return True
        if self.stale_epochs >= self.patience:
            self.reason = f"no improvement by more than {self.delta} for {self.patience} epoch(s)"
            return True
        return False


# --- the loop ------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Loaders:
    train: DataLoader[Any]
    val: DataLoader[Any]
    test: DataLoader[Any]
    classes: list[str]
    splits: dict[str, SplitManifest]
    cache: ContentCache


def load_data(
    config: TrainConfig,
    store: ObjectStore,
    cache: ContentCache,
    *,
    max_workers: int = 16,
    progress: bool | None = None,
) -> Loaders:
    """The version's splits (made first when missing), cached locally, as three loaders."""
    splits = ensure_splits(store, config.dataset_version)
    classes = splits["train"].classes
    spec = get_spec(config.model_type)
    prep = Preprocessing(config.size, spec.mean, spec.std)
    datasets = {
        name: TireImageDataset.from_split(
            split,
            cache,
            train_transform(prep, augment=config.augment, policy=config.augmentation)
            if name == "train"
            else prep,
        )
        for name, split in splits.items()
    }
    for dataset in datasets.values():
        dataset.prepare(store, max_workers=max_workers, progress=progress)
    generator = torch.Generator().manual_seed(config.seed)
    pin = torch.cuda.is_available()

    def loader(name: str, shuffle: bool) -> DataLoader[Any]:
        return DataLoader(
            datasets[name],  # type: ignore[arg-type]
            batch_size=config.batch_size,
            shuffle=shuffle,
            num_workers=config.num_workers,
            generator=generator if shuffle else None,
            pin_memory=pin,
            persistent_workers=config.num_workers > 0,
        )

    return Loaders(
        loader("train", True), loader("val", False), loader("test", False), classes, splits, cache
    )


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    device: torch.device,
    scaler: torch.amp.GradScaler | None,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    desc: str = "train",
    progress: bool | None = None,
) -> float:
    """One pass over ``loader``; returns the mean training loss.

    ``scheduler``, when given, steps after every batch (one-cycle). The loss is summed on the
    device and read once at the end: a ``loss.item()`` per step would make the host wait for
    the accelerator after every batch.
    """
    model.train()
    total = torch.zeros((), device=device)
    count = 0
    for images, targets in progress_bar(
        loader, total=len(loader), desc=desc, unit="batch", enabled=progress
    ):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=scaler is not None):
            loss = criterion(model(images), targets)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.detach().float() * targets.shape[0]
        count += targets.shape[0]
    return total.item() / max(count, 1)


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    lr, wd = config.learning_rate, config.weight_decay or 0.0
    if config.optimizer_type == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if config.optimizer_type == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if config.optimizer_type == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=wd)
    return torch.optim.RMSprop(params, lr=lr, momentum=config.momentum, weight_decay=wd)


def make_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int = 1
) -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None:
    """The learning-rate schedule; ``onecycle`` steps per batch, the others per epoch.

    One-cycle (Smith and Topin's super-convergence) warms up from ``learning_rate / 25`` to
    ``learning_rate`` over the first 30% of the steps, then anneals to almost zero.
    """
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=config.learning_rate,
            epochs=config.epochs,
            steps_per_epoch=max(steps_per_epoch, 1),
        )
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(config.epochs // 3, 1))
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=1, factor=0.5)
    return None


# --- the drift baseline --------------------------------------------------------------------


class ImageStatisticsTap:
    """Iterates over a loader of normalised batches and records each image's brightness and
    contrast (:func:`tirelib.drift.image_statistics`) on the way, on its pixels in [0, 1]
    after resizing: normalisation is undone, so no image is decoded twice."""

    def __init__(self, loader: DataLoader[Any], prep: Preprocessing) -> None:
        self.loader = loader
        self._mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(prep.std).view(1, 3, 1, 1)
        self._brightness: list[np.ndarray] = []
        self._contrast: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        self._brightness.clear()
        self._contrast.clear()
        for images, targets in self.loader:
            pixels = (images.float() * self._std + self._mean).clamp_(0.0, 1.0)
            brightness, contrast = drift.image_statistics(pixels.numpy())
            self._brightness.append(brightness)
            self._contrast.append(contrast)
            yield images, targets

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Brightness and contrast of every image seen by the last pass."""
        if not self._brightness:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)
        return np.concatenate(self._brightness), np.concatenate(self._contrast)


# --- the whole recipe ----------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a training run produced; small and JSON-friendly for XCom."""

    run_id: str | None
    model_uri: str | None
    model_type: str
    dataset_version: str
    best_epoch: int
    epochs_run: int
    stop_reason: str
    test_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "model_uri": self.model_uri,
            "model_type": self.model_type,
            "dataset_version": self.dataset_version,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "stop_reason": self.stop_reason,
            "test_metrics": self.test_metrics,
        }


def _epochs(count: int) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"


@dataclass
class _Fit:
    model: nn.Module
    history: list[dict[str, float]]
    best_epoch: int
    stop_reason: str
    # Seconds per epoch spent training and validating (metrics and logging included).
    seconds: list[dict[str, float]] = field(default_factory=list)


def fit(
    config: TrainConfig,
    loaders: Loaders,
    device: torch.device,
    *,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool | None = None,
) -> _Fit:
    """Train for up to ``config.epochs`` epochs; restore the best epoch's weights at the end."""
    seed_everything(config.seed)
    # Channels-last activations: oneDNN's (CPU) and cuDNN's fast convolution layout; about a
    # fifth less time per step for the small CNNs on a CPU. The weights go back to the usual
    # layout at the end, so the saved and exported model is the ordinary one.
    model = (
        get_model(config.model_type, num_classes=len(loaders.classes), pretrained=config.pretrained)
        .to(device)
        .to(memory_format=torch.channels_last)
    )
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer, len(loaders.train))
    per_batch = scheduler if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) else None
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None
    criterion = nn.CrossEntropyLoss()
    stopper = EarlyStopping(config.patience, config.min_delta, config.min_loss, config.min_accuracy)
    history: list[dict[str, float]] = []
    best_state = _snapshot(model)
    best_key: tuple[float, float] = (math.inf, 0.0)
    best_epoch = 0
    stop_reason = f"ran all {_epochs(config.epochs)}"
    seconds: list[dict[str, float]] = []
    for epoch in range(1, config.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        train_loss = train_one_epoch(
            model, loaders.train, optimizer, criterion, device, scaler, scheduler=per_batch,
            desc=f"epoch {epoch}/{config.epochs}", progress=progress,
        )  # fmt: skip
        trained = time.perf_counter()
        val = predict(model, loaders.val, device, amp=amp, desc="validate", progress=progress)
        metrics = compute_metrics(val.targets, val.probabilities, loaders.classes, loss=val.loss)
        row = {"train_loss": train_loss, **metrics.as_dict("val_"), "learning_rate": lr}
        history.append(row)
        log.info(
            "epoch %d/%d: train_loss %.4f val_loss %.4f val_accuracy %.4f val_f1 %.4f lr %.2g",
            epoch, config.epochs, train_loss, val.loss, metrics.accuracy, metrics.f1, lr,
        )  # fmt: skip
        if on_epoch is not None:
            on_epoch(epoch, row)
        key = (val.loss, -metrics.accuracy)
        if key < best_key:
            best_key, best_epoch = key, epoch
            best_state = _snapshot(model)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val.loss)
        elif scheduler is not None and per_batch is None:
            scheduler.step()
        seconds.append({"train": trained - started, "validate": time.perf_counter() - trained})
        if stopper.step(val.loss, metrics.accuracy):
            if epoch < config.epochs:
                stop_reason = f"stopped early after epoch {epoch}: {stopper.reason}"
            else:  # the rule fired on the last epoch: nothing was cut short
                stop_reason = f"ran all {_epochs(config.epochs)} ({stopper.reason})"
            log.info(stop_reason)
            break
    model.load_state_dict(best_state)
    model.to(memory_format=torch.contiguous_format)
    return _Fit(model, history, best_epoch, stop_reason, seconds)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the weights where they are (no trip to the host for a model on a GPU)."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@contextmanager
def _run_or_none(enabled: bool, **kwargs: Any) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    import mlflow

    with mlflow.start_run(**kwargs) as run:
        yield run


def train(
    config: TrainConfig,
    settings: Settings,
    *,
    track: bool = True,
    progress: bool | None = None,
    run_name: str | None = None,
    sweep: SweepMember | None = None,
) -> TrainResult:
    """Train ``config.model_type`` on ``config.dataset_version``, tracked as one MLflow run.

    The dataset version is checked before any run is opened, so a bad name leaves nothing behind.
    A member of a sweep is tagged with the sweep's id and its place in it.
    """
    store = ObjectStore.for_data(settings)
    manifest = read_manifest(store, config.dataset_version)  # DataError for an unknown version
    from tirelib import tracking

    if track:  # before the download: a tracking server that is down fails in seconds
        tracking.configure(settings)
    cache = ContentCache(settings.resolved_cache_dir)
    loaders = load_data(
        config, store, cache, max_workers=settings.s3_max_workers, progress=progress
    )
    device = pick_device()
    log.info(
        "training %s on %s (%d train / %d val / %d test images, %s)",
        config.model_type, config.dataset_version, len(loaders.splits["train"].records),
        len(loaders.splits["val"].records), len(loaders.splits["test"].records), device,
    )  # fmt: skip

    tags = {
        "dataset_version": config.dataset_version,
        "model_type": config.model_type,
        JOB_DIGEST_TAG: job_digest(config, manifest.content(), sweep),
        **(sweep.tags() if sweep is not None else {}),
        **tracking.lineage_tags(),
    }
    job = f"{config.model_type} on {config.dataset_version}"
    with (
        # An MLflow outage while tracking is retryable; anything else passes unchanged.
        tracking.outages_are_retryable(settings.mlflow_tracking_uri, f"tracking {job}"),
        _run_or_none(
            track, run_name=run_name or f"{config.model_type}-{config.dataset_version}", tags=tags
        ) as run,
    ):
        if run is not None:
            import mlflow

            mlflow.log_params(config.mlflow_params())
            mlflow.log_params({"device": str(device), "classes": ",".join(loaders.classes)})
            tracking.log_dataset(
                bucket=store.bucket,
                version=config.dataset_version,
                digest=_manifest_digest(manifest.content()),
                context="training",
                counts={
                    f"{name}.{label}": n
                    for name, split in loaders.splits.items()
                    for label, n in split.counts.items()
                },
            )

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            if run is not None:
                import mlflow

                mlflow.log_metrics(row, step=epoch)

        fitted = fit(config, loaders, device, on_epoch=on_epoch, progress=progress)
        spec = get_spec(config.model_type)
        prep = Preprocessing(config.size, spec.mean, spec.std)
        tap = ImageStatisticsTap(loaders.test, prep)
        # Test images that travel with the model to check its ONNX export, kept on the way.
        sample = SampleTap(tap, prep)
        # predict() only iterates and asks for the length: the taps stand in for the loader.
        test = predict(fitted.model, cast(Any, sample), device, desc="test", progress=progress)
        metrics = compute_metrics(test.targets, test.probabilities, loaders.classes, loss=test.loss)
        baseline = drift.compute_baseline(
            loaders.classes, test.targets, test.probabilities, *tap.statistics()
        )
        test_metrics = {**metrics.as_dict("test_"), "inference_ms_per_image": test.ms_per_image}
        log.info("test: %s", ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()))

        model_uri = None
        if run is not None:
            import mlflow

            mlflow.log_metrics(test_metrics)
            mlflow.log_metrics({"best_epoch": fitted.best_epoch, "epochs_run": len(fitted.history)})
            mlflow.set_tag("stop_reason", fitted.stop_reason)
            # Beside the model, and as a run artifact that monitoring reads by run id.
            mlflow.log_dict(baseline.model_dump(mode="json"), drift.BASELINE_FILE)
            model_uri = tracking.log_model(
                fitted.model.cpu(),
                model_type=config.model_type,
                classes=loaders.classes,
                prep=prep,
                params={"dataset_version": config.dataset_version},
                baseline=baseline,
                sample=sample.sample(),
            )
            mlflow.set_tag(MODEL_URI_TAG, model_uri)
            with tempfile.TemporaryDirectory(prefix="tire-eval-") as tmp:
                write_artifacts(
                    Path(tmp),
                    metrics,
                    test.targets,
                    test.probabilities,
                    sample_images(loaders.splits["test"].records, loaders.cache),
                    history=fitted.history,
                    extra={"inference_ms_per_image": test.ms_per_image},
                    skipped=[{"path": s.path, "reason": s.reason} for s in manifest.skipped],
                )
                mlflow.log_artifacts(tmp, f"evaluation/{config.dataset_version}")
    if run is not None:
        supersede_interrupted(run.info.run_id, tags[JOB_DIGEST_TAG], settings)
    return TrainResult(
        run_id=run.info.run_id if run is not None else None,
        model_uri=model_uri,
        model_type=config.model_type,
        dataset_version=config.dataset_version,
        best_epoch=fitted.best_epoch,
        epochs_run=len(fitted.history),
        stop_reason=fitted.stop_reason,
        test_metrics=test_metrics,
        history=fitted.history,
    )


def _manifest_digest(content: set[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for key, sha in sorted(content):
        digest.update(f"{key}\0{sha}\n".encode())
    return digest.hexdigest()


JOB_DIGEST_TAG = "tire.job_digest"
SUPERSEDED_TAG = "tire.superseded_by"


def job_digest(
    config: TrainConfig, content: set[tuple[str, str]], sweep: SweepMember | None = None
) -> str:
    """What makes two training jobs the same: every hyperparameter, the version's content and,
    for a sweep's member, the sweep and its place in it (so each member finds its own run)."""
    identity: dict[str, Any] = config.model_dump(mode="json")
    if sweep is not None:
        identity["sweep"] = sweep.tags()
    text = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(f"{text}\n{_manifest_digest(content)}".encode()).hexdigest()


def find_finished_run(
    config: TrainConfig, settings: Settings, sweep: SweepMember | None = None
) -> TrainResult | None:
    """The finished run of this very job (same config, same data, same place in the same
    sweep) with a logged model, if any.

    This is what makes a retried training task, or a re-run of a version, train nothing twice.
    """
    import mlflow

    from tirelib import tracking

    manifest = read_manifest(ObjectStore.for_data(settings), config.dataset_version)
    experiment_id = tracking.configure(settings)
    digest = job_digest(config, manifest.content(), sweep)
    with tracking.outages_are_retryable(settings.mlflow_tracking_uri, "looking for a finished run"):
        runs = mlflow.search_runs(
            [experiment_id],
            filter_string=(
                f"tags.`{JOB_DIGEST_TAG}` = '{digest}' and attributes.status = 'FINISHED'"
            ),
            order_by=["attributes.start_time DESC"],
            max_results=1,
            output_format="list",
        )
    if not runs or MODEL_URI_TAG not in runs[0].data.tags:
        return None
    run = runs[0]
    metrics = run.data.metrics
    return TrainResult(
        run_id=run.info.run_id,
        model_uri=run.data.tags[MODEL_URI_TAG],
        model_type=config.model_type,
        dataset_version=config.dataset_version,
        best_epoch=int(metrics.get("best_epoch", 0)),
        epochs_run=int(metrics.get("epochs_run", 0)),
        stop_reason=run.data.tags.get("stop_reason", ""),
        test_metrics={
            k: v
            for k, v in metrics.items()
            if k.startswith("test_") or k == "inference_ms_per_image"
        },
    )


def supersede_interrupted(run_id: str, digest: str, settings: Settings) -> list[str]:
    """Mark the runs of the same job that never finished ``KILLED``, tagged with ``run_id``.

    An outage or a killed worker in the middle of training leaves its run ``RUNNING`` or
    ``FAILED``; the retry trains in a new run. Once that one has finished, the job keeps a
    single finished run, and the interrupted ones say which run replaced them. Best effort: an
    MLflow outage here is logged, as the training itself succeeded.
    """
    from mlflow import MlflowClient

    from tirelib import tracking
    from tirelib.errors import RegistryUnavailableError

    client = MlflowClient(settings.mlflow_tracking_uri)
    replaced = []
    try:
        with tracking.outages_are_retryable(
            settings.mlflow_tracking_uri, "closing interrupted runs"
        ):
            experiment_id = client.get_run(run_id).info.experiment_id
            runs = client.search_runs(
                [experiment_id],
                filter_string=(
                    f"tags.`{JOB_DIGEST_TAG}` = '{digest}' and attributes.status != 'FINISHED'"
                ),
                max_results=100,
            )
            for earlier in runs:
                if earlier.info.run_id == run_id or earlier.info.status == "KILLED":
                    continue
                client.set_tag(earlier.info.run_id, SUPERSEDED_TAG, run_id)
                client.set_terminated(earlier.info.run_id, status="KILLED")
                replaced.append(earlier.info.run_id)
    except RegistryUnavailableError as error:
        log.warning("could not close the interrupted runs of this job: %s", error)
    if replaced:
        log.info("run %s replaces interrupted run(s) %s of the same job", run_id, replaced)
    return replaced


__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "EarlyStopping",
    "SweepMember",
    "TrainConfig",
    "TrainResult",
    "find_finished_run",
    "fit",
    "job_digest",
    "load_data",
    "make_config",
    "train",
    "train_one_epoch",
]

"""Training throughput: tirelib's loop against a bare PyTorch loop, on the same work.

What runs. Every loop trains the same network (``cnn`` by default, built as ``fit`` builds it:
channels-last), from the same seed, with tirelib's default optimizer and learning-rate schedule
(AdamW, one-cycle stepped per batch), the same batch size and the same in-memory tensors
(random images: a loop's cost does not depend on what they show):

- **bare loop**: forward, loss, backward, optimizer step, scheduler step. Nothing else.
- **bare loop + validation**: the same, and after each epoch one forward pass over the
  validation images, counting the right answers, as any loop that picks its best epoch must.
- **tirelib** (``tirelib.train.fit``, as ``tirelib train`` runs it): per epoch the training pass
  and a validation pass with every metric the run logs (loss, accuracy, precision, recall, F1,
  ROC-AUC), early-stopping bookkeeping, a copy of the best weights, and the epoch's metrics
  logged to a real MLflow tracking store (SQLite in a temporary folder).

What is counted. Throughput is training images per second of the whole loop: images x epochs
over the wall time, validation included, for all three. The target (at least 0.9) is tirelib
against the bare loop *with* validation, which does the same work; the ratio against the
train-only loop is printed too, beside the share of tirelib's time spent validating (from
``fit``'s own per-epoch timings), so nothing is hidden. Not counted, for any loop: imports, the
tracking store's creation and a warm-up pass before the first clock (oneDNN builds its kernels
on the first batches), which a run pays once.

Noise. The loops run ``--rounds`` times in turns (bare, bare + validation, tirelib, bare, ...)
and each figure is the median of its rounds, so a neighbour's burst of CPU use does not favour
one loop. The load average at the start is printed with the figures.

Run:  .venv/bin/python bench/training.py [--model cnn] [--images 1024] [--epochs 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tirelib.metrics import compute_metrics  # noqa: F401  (imported before any clock starts)
from tirelib.models import get_model, get_spec
from tirelib.train import (
    Loaders,
    fit,
    make_config,
    make_optimizer,
    make_scheduler,
    pick_device,
    seed_everything,
)

TARGET = 0.9


def bare_loop(
    config: Any,
    train: DataLoader[Any],
    val: DataLoader[Any] | None,
    device: torch.device,
) -> float:
    """The plainest loop, with one accuracy pass over ``val`` per epoch when given.

    Returns the seconds it took, the model's construction included, as in ``fit``.
    """
    start = time.perf_counter()
    seed_everything(config.seed)
    model = get_model(config.model_type).to(device).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer, len(train))
    schedules = torch.optim.lr_scheduler
    per_batch = scheduler if isinstance(scheduler, schedules.OneCycleLR) else None
    # A plateau schedule needs the validation loss, which the bare loop does not compute.
    per_epoch = None if isinstance(scheduler, schedules.ReduceLROnPlateau) else scheduler
    criterion = nn.CrossEntropyLoss()
    for _ in range(config.epochs):
        model.train()
        for images, targets in train:
            images, targets = images.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            criterion(model(images), targets).backward()
            optimizer.step()
            if per_batch is not None:
                per_batch.step()
        if per_epoch is not None and per_batch is None:
            per_epoch.step()
        if val is not None:
            model.eval()
            right = torch.zeros((), dtype=torch.long, device=device)
            with torch.inference_mode():
                for images, targets in val:
                    logits = model(images.to(device))
                    right += (logits.argmax(1) == targets.to(device)).sum()
            right.item()
    return time.perf_counter() - start


def log_epoch(epoch: int, row: dict[str, float]) -> None:
    """What ``tirelib.train.train`` does with each epoch's row."""
    mlflow.log_metrics(row, step=epoch)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--images", type=int, default=1024, help="training images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each loop, in turns")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    for name in ("images", "epochs", "rounds", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    load = os.getloadavg()[0]
    device = pick_device()
    # Early stopping is switched off (patience = epochs), so every loop runs every epoch; its
    # bookkeeping still runs each epoch.
    config = make_config(
        dataset_version="bench",
        model_type=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        patience=args.epochs,
        augment=False,
    )
    size = get_spec(args.model).image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, size, size, generator=generator)
    targets = torch.randint(0, 2, (args.images,), generator=generator)
    val_count = max(args.images // 8, 1)
    train_data = TensorDataset(images, targets)
    val_data = TensorDataset(images[:val_count], targets[:val_count])

    def loader(data: TensorDataset, shuffle: bool) -> DataLoader[Any]:
        seeded = torch.Generator().manual_seed(config.seed)
        return DataLoader(
            data, batch_size=args.batch_size, shuffle=shuffle, generator=seeded if shuffle else None
        )

    def loaders() -> Loaders:
        return Loaders(
            loader(train_data, True), loader(val_data, False), loader(val_data, False),
            ["good", "defective"], {}, None,  # type: ignore[arg-type]
        )  # fmt: skip

    print(
        f"{args.model} at {size} px, {args.images} training and {val_count} validation images, "
        f"batch {args.batch_size}, {args.epochs} epochs, {args.rounds} rounds, {device}, "
        f"{torch.get_num_threads()} threads; load average at start {load:.2f}"
    )
    seconds: dict[str, list[float]] = {"bare": [], "bare+val": [], "tirelib": []}
    validating: list[float] = []
    with tempfile.TemporaryDirectory(prefix="tire-bench-") as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        mlflow.set_experiment("bench")
        # Warm-up, not timed: one epoch of a small slice through every code path.
        warm = make_config(**{**config.model_dump(), "epochs": 1})
        small = TensorDataset(images[: args.batch_size * 2], targets[: args.batch_size * 2])
        warm_loader = DataLoader(small, batch_size=args.batch_size)
        bare_loop(warm, warm_loader, warm_loader, device)
        with mlflow.start_run():
            fit(warm, Loaders(warm_loader, warm_loader, warm_loader, ["good", "defective"],
                {}, None), device, progress=False)  # type: ignore[arg-type]  # fmt: skip

        loops: dict[str, Callable[[], float]] = {
            "bare": lambda: bare_loop(config, loader(train_data, True), None, device),
            "bare+val": lambda: bare_loop(
                config, loader(train_data, True), loader(val_data, False), device
            ),
        }
        for round_ in range(args.rounds):
            for name, run in loops.items():
                seconds[name].append(run())
            with mlflow.start_run(run_name=f"round-{round_}"):
                start = time.perf_counter()
                fitted = fit(
                    config,
                    loaders(),
                    device,
                    on_epoch=log_epoch,
                    progress=False,
                )
                elapsed = time.perf_counter() - start
            seconds["tirelib"].append(elapsed)
            validating.append(sum(s["validate"] for s in fitted.seconds) / elapsed)

    rate = {
        name: args.images * args.epochs / statistics.median(values)
        for name, values in seconds.items()
    }
    titles = {
        "bare": "bare loop (train only)",
        "bare+val": "bare loop + validation pass per epoch",
        "tirelib": "tirelib fit (metrics, MLflow, early stop)",
    }
    print(f"\n| loop | images/s (median of {args.rounds}) | rounds (s) | ratio to bare + val |")
    print("| --- | ---: | --- | ---: |")
    for name, title in titles.items():
        runs = ", ".join(f"{s:.1f}" for s in seconds[name])
        print(f"| {title} | {rate[name]:.1f} | {runs} | {rate[name] / rate['bare+val']:.2f} |")
    ratio = rate["tirelib"] / rate["bare+val"]
    verdict = "meets" if ratio >= TARGET else "MISSES"
    print(
        f"\ntirelib / bare loop + validation: {ratio:.2f} ({verdict} the target of at least "
        f"{TARGET}); tirelib / train-only bare loop: {rate['tirelib'] / rate['bare']:.2f}; "
        f"validation is {statistics.median(validating):.0%} of tirelib's time"
    )


if __name__ == "__main__":
    main()

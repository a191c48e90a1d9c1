"""Training throughput: tirelib's loop (tracking and metrics on) against a bare PyTorch loop.

Both train the same model (``cnn`` by default) with the same optimizer and batch size over the
same in-memory tensors, so the difference is what tirelib adds per epoch: validation metrics,
early-stopping bookkeeping, best-weights copies and MLflow logging (to a real tracking store,
SQLite-backed, in a temporary folder).

Run:  .venv/bin/python bench/training.py [--model cnn] [--images 1024] [--epochs 3]
Prints images/s for both and the ratio tirelib / bare. Target: at least 0.9.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import mlflow
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tirelib.models import get_model, get_spec
from tirelib.train import Loaders, fit, make_config, pick_device


def bare_loop(
    model: nn.Module, loader: DataLoader, epochs: int, lr: float, device: torch.device
) -> float:
    """The plainest loop: forward, loss, backward, step. Returns images/s."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    model.train()
    seen = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for images, targets in loader:
            images, targets = images.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            criterion(model(images), targets).backward()
            optimizer.step()
            seen += targets.shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = pick_device()
    size = get_spec(args.model).image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, size, size, generator=generator)
    targets = torch.randint(0, 2, (args.images,), generator=generator)
    train_data = TensorDataset(images, targets)
    val_data = TensorDataset(images[: args.images // 8], targets[: args.images // 8])

    def loader(data: TensorDataset, shuffle: bool) -> DataLoader:
        return DataLoader(data, batch_size=args.batch_size, shuffle=shuffle, generator=generator)

    print(
        f"{args.model} at {size} px, {args.images} images, batch {args.batch_size}, "
        f"{args.epochs} epochs, {device}"
    )
    torch.manual_seed(0)
    bare = bare_loop(
        get_model(args.model).to(device), loader(train_data, True), args.epochs, 1e-3, device
    )

    config = make_config(
        dataset_version="bench", model_type=args.model, epochs=args.epochs, augment=False
    )
    loaders = Loaders(
        loader(train_data, True), loader(val_data, False), loader(val_data, False),
        ["good", "defective"], {}, None,  # type: ignore[arg-type]
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tire-bench-") as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        mlflow.set_experiment("bench")
        with mlflow.start_run():
            start = time.perf_counter()
            fit(
                config,
                loaders,
                device,
                on_epoch=lambda epoch, row: mlflow.log_metrics(row, step=epoch),
                progress=False,
            )
            elapsed = time.perf_counter() - start
    # tirelib's loop trains on the same images and also validates each epoch: count only the
    # training images, so validation is part of the cost being measured.
    ours = args.images * args.epochs / elapsed
    ratio = ours / bare
    verdict = "meets" if ratio >= 0.9 else "MISSES"
    print(f"{'bare PyTorch loop':<40} {bare:>8.1f} images/s")
    print(f"{'tirelib loop (metrics, MLflow, early stop)':<40} {ours:>8.1f} images/s")
    print(f"ratio: {ratio:.2f} of the bare loop ({verdict} the target of at least 0.9)")


if __name__ == "__main__":
    main()

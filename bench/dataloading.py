"""Data loading: tirelib's cached dataset against the earlier system's loader, on the same images.

The baseline is the earlier system's loader: one S3 ``get_object`` per item per epoch inside
``__getitem__``. tirelib downloads each image once, in parallel and checksummed, into a
content-addressed cache and decodes from there. Both feed the same ``DataLoader`` (batch 32,
shuffled, same transform) over the same 2,000 images in a real local S3 server (SeaweedFS).

Run:  .venv/bin/python bench/dataloading.py [--images 2000] [--size 128]
Prints images/s per loader and epoch and the ratios tirelib / earlier. Targets: epoch 2 at least
10x the earlier loader, epoch 1 not slower.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from tirelib.data import Record, TireImageDataset, class_order, read_manifest, upload_version
from tirelib.settings import Settings, load_settings
from tirelib.stack import Stack, free_port, seaweedfs_component
from tirelib.storage import ContentCache, ObjectStore
from tirelib.synth import generate


class EarlierS3Dataset(Dataset[tuple[torch.Tensor, int]]):
    """The earlier system's loader: every item fetched from S3 every epoch."""

    def __init__(
        self, store: ObjectStore, records: list[Record], classes: list[str], transform: Any
    ) -> None:
        self.store = store
        self.records = records
        self.index = {c: i for i, c in enumerate(classes)}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        record = self.records[i]
        body = self.store.client.get_object(Bucket=self.store.bucket, Key=record.key)["Body"].read()
        image = Image.open(io.BytesIO(body)).convert("RGB")
        return self.transform(image), self.index[record.label]


def _epoch(loader: DataLoader[Any]) -> int:
    seen = 0
    for images, _ in loader:
        seen += images.shape[0]
    return seen


@contextmanager
def _local_s3(home: Path) -> Iterator[Settings]:
    """A SeaweedFS server of the local stack on free loopback ports, stopped at the end."""
    port = free_port()
    settings = load_settings(
        home=home, s3_port=port, s3_endpoint_url=f"http://127.0.0.1:{port}", mlflow_port=free_port()
    )
    stack = Stack(settings, [seaweedfs_component(settings)])
    stack.up()
    try:
        yield settings
    finally:
        stack.down()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=load_settings().s3_max_workers)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    transform = v2.Compose(
        [v2.PILToTensor(), v2.Resize((64, 64)), v2.ToDtype(torch.float32, scale=True)]
    )

    with (
        tempfile.TemporaryDirectory(prefix="tire-bench-") as tmp,
        _local_s3(Path(tmp) / "home") as settings,
    ):
        store = ObjectStore.for_data(settings)
        generate(Path(tmp) / "src", args.images, seed=1, size=args.size)
        upload_version(store, Path(tmp) / "src", "bench", progress=False)
        records = read_manifest(store, "bench").records
        classes = class_order(r.label for r in records)
        print(
            f"{len(records)} images of {args.size} px in SeaweedFS, "
            f"batch {args.batch_size}, shuffled"
        )

        results: dict[tuple[str, int], float] = {}
        earlier = EarlierS3Dataset(store, records, classes, transform)
        loader = DataLoader(earlier, batch_size=args.batch_size, shuffle=True)
        for epoch in (1, 2):
            start = time.perf_counter()
            seen = _epoch(loader)
            results[("earlier", epoch)] = seen / (time.perf_counter() - start)

        cache = ContentCache(Path(tmp) / "cache")
        ours = TireImageDataset(records, classes, cache, transform)
        loader = DataLoader(ours, batch_size=args.batch_size, shuffle=True)
        for epoch in (1, 2):
            start = time.perf_counter()
            if epoch == 1:
                ours.prepare(store, max_workers=args.workers, progress=False)
            seen = _epoch(loader)
            results[("tirelib", epoch)] = seen / (time.perf_counter() - start)

    print(f"{'loader':<36} {'epoch':>5} {'images/s':>10}")
    for (name, epoch), rate in results.items():
        label = (
            "earlier (get_object per item)"
            if name == "earlier"
            else "tirelib (cache, parallel fetch)"
        )
        print(f"{label:<36} {epoch:>5} {rate:>10.0f}")
    for epoch, target in ((1, 1.0), (2, 10.0)):
        ratio = results[("tirelib", epoch)] / results[("earlier", epoch)]
        verdict = "meets" if ratio >= target else "MISSES"
        print(
            f"ratio epoch {epoch}: {ratio:.1f}x the earlier loader "
            f"({verdict} the target of at least {target:g}x)"
        )


if __name__ == "__main__":
    main()

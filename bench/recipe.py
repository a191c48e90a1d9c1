"""The default training recipe against the one before it, on the demo's dataset version.

``make demo`` uploads 800 synthetic tires drawn at 128 px with seed 7, half of them defective,
and the pipeline splits the version by content hash (70/15/15) and trains it with the
defaults of ``tirelib.config.TrainConfig``. This benchmark makes the same version the same way
(``tirelib.synth.generate``, uploaded to a local SeaweedFS), then trains it as the pipeline's
``train`` task does (``tirelib.train.train``, without MLflow tracking) with each recipe and each
seed, in turns (old, new; then new, old; ...), so neither recipe always runs on a quieter CPU:

- **old**: the defaults before this recipe: ``cnn`` at 64 px, Adam at 1e-3, cosine schedule,
  no weight decay, 10 epochs, batch 32, the ``crop`` augmentation (random resized crop, flips,
  rotation, colour jitter), early stopping after 3 epochs without progress.
- **new**: today's defaults (``TrainConfig()``; printed at the start): ``cnn128`` at 128 px,
  AdamW at 3e-3 with a one-cycle schedule, weight decay 0.05, 10 epochs, batch 16, the
  ``dihedral`` augmentation, early stopping after 5 epochs without progress.

Both run with this version of the training loop; only the hyperparameters differ. The data are
never made easier: the generator, its seed and the version's size are the demo's.

Wall time is the whole ``train`` call: reading the split into memory from the local cache
(filled before any clock starts, as the pipeline's ``validate_data`` step fills it), every epoch
with its validation, and the test pass. CPU time is printed beside it: on a shared machine it
moves less than wall time. The load average at the start is printed with the figures.

Run:  .venv/bin/python bench/recipe.py [--seeds 42 43 44]
Prints test accuracy, F1 and seconds per recipe and seed, the means, and the ratio of mean wall
times new / old. Targets: the new recipe's test accuracy at least 0.95 on every seed, in no
more wall time than the old one (ratio at most 1.0).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tirelib.config import TrainConfig, make_config
from tirelib.data import ensure_splits, upload_version
from tirelib.settings import Settings, load_settings
from tirelib.stack import Stack, free_port, seaweedfs_component
from tirelib.storage import ContentCache, ObjectStore
from tirelib.synth import generate
from tirelib.train import load_data, train

# The demo's dataset (tirelib/cli/demo.py): count, seed, size and defect ratio.
DEMO_COUNT, DEMO_SEED, DEMO_SIZE, DEMO_DEFECT_RATIO = 800, 7, 128, 0.5
VERSION = f"demo-{DEMO_SEED}-{DEMO_COUNT}"
OLD_RECIPE: dict[str, Any] = {
    "model_type": "cnn",
    "optimizer_type": "adam",
    "learning_rate": 1e-3,
    "scheduler": "cosine",
    "weight_decay": 0.0,
    "epochs": 10,
    "batch_size": 32,
    "image_size": 64,
    "augment": True,
    "augmentation": "crop",
    "patience": 3,
}
TARGET_ACCURACY = 0.95


@dataclass(frozen=True)
class Outcome:
    recipe: str
    seed: int
    accuracy: float
    f1: float
    wall_s: float
    cpu_s: float
    epochs_run: int


@contextmanager
def _local_s3(home: Path) -> Iterator[Settings]:
    """A SeaweedFS server of the local stack on free loopback ports, stopped at the end."""
    port = free_port()
    settings = load_settings(
        home=home,
        s3_port=port,
        s3_endpoint_url=f"http://127.0.0.1:{port}",
        mlflow_port=free_port(),
        cache_dir=home / "cache",
    )
    stack = Stack(settings, [seaweedfs_component(settings)])
    stack.up()
    try:
        yield settings
    finally:
        stack.down()


def train_once(recipe: str, config: TrainConfig, settings: Settings) -> Outcome:
    wall, cpu = time.perf_counter(), time.process_time()
    result = train(config, settings, track=False, progress=False)
    return Outcome(
        recipe,
        config.seed,
        result.test_metrics["test_accuracy"],
        result.test_metrics["test_f1"],
        time.perf_counter() - wall,
        time.process_time() - cpu,
        result.epochs_run,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument(
        "--epochs", type=int, help="both recipes for this many epochs: a check that it runs"
    )
    args = parser.parse_args()
    if any(seed < 0 for seed in args.seeds):
        parser.error("--seeds must be integers of at least 0")
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    load = os.getloadavg()[0]
    recipes = {
        "old": {**OLD_RECIPE},
        "new": {},  # today's defaults
    }
    new = make_config(dataset_version=VERSION)
    shown = ("model_type", "optimizer_type", "learning_rate", "scheduler", "weight_decay",
             "epochs", "batch_size", "image_size", "augmentation", "patience")  # fmt: skip
    print(
        f"demo version: {DEMO_COUNT} synthetic tires at {DEMO_SIZE} px, seed {DEMO_SEED}; "
        f"seeds {args.seeds}; {torch.get_num_threads()} threads; "
        f"load average at start {load:.2f}"
    )
    print("old recipe:", ", ".join(f"{k}={OLD_RECIPE[k]}" for k in shown))
    print("new recipe:", ", ".join(f"{k}={getattr(new, k)}" for k in shown))

    outcomes: list[Outcome] = []
    with (
        tempfile.TemporaryDirectory(prefix="tire-recipe-") as tmp,
        _local_s3(Path(tmp) / "home") as settings,
    ):
        store = ObjectStore.for_data(settings)
        source = Path(tmp) / "synthetic"
        generate(source, DEMO_COUNT, seed=DEMO_SEED, size=DEMO_SIZE, defect_ratio=DEMO_DEFECT_RATIO)
        upload_version(store, source, VERSION, progress=False)
        splits = ensure_splits(store, VERSION)
        print("splits:", ", ".join(f"{name} {len(s.records)}" for name, s in splits.items()))
        # Fill the local cache before any clock starts (the pipeline's validate_data does).
        load_data(new, store, ContentCache(settings.resolved_cache_dir), progress=False)

        for turn, seed in enumerate(args.seeds):
            order = ["old", "new"] if turn % 2 == 0 else ["new", "old"]
            for name in order:
                values = {**recipes[name], **({"epochs": args.epochs} if args.epochs else {})}
                config = make_config(dataset_version=VERSION, seed=seed, **values)
                outcome = train_once(name, config, settings)
                outcomes.append(outcome)
                print(
                    f"  {name} seed {seed}: accuracy {outcome.accuracy:.4f}, f1 {outcome.f1:.4f}, "
                    f"{outcome.wall_s:.1f} s wall, {outcome.cpu_s:.1f} s CPU, "
                    f"{outcome.epochs_run} epochs",
                    flush=True,
                )

    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    print("| recipe | seed | test accuracy | test F1 | epochs | wall s | CPU s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    means: dict[str, dict[str, float]] = {}
    for name in recipes:
        mine = [o for o in outcomes if o.recipe == name]
        for o in sorted(mine, key=lambda o: o.seed):
            print(
                f"| {name} | {o.seed} | {o.accuracy:.4f} | {o.f1:.4f} | {o.epochs_run} | "
                f"{o.wall_s:.1f} | {o.cpu_s:.1f} |"
            )
        means[name] = {
            field: statistics.mean(getattr(o, field) for o in mine)
            for field in ("accuracy", "f1", "wall_s", "cpu_s")
        }
        m = means[name]
        print(
            f"| {name} | mean | {m['accuracy']:.4f} | {m['f1']:.4f} | | {m['wall_s']:.1f} | "
            f"{m['cpu_s']:.1f} |"
        )
    wall_ratio = means["new"]["wall_s"] / means["old"]["wall_s"]
    cpu_ratio = means["new"]["cpu_s"] / means["old"]["cpu_s"]
    lowest = min(o.accuracy for o in outcomes if o.recipe == "new")
    print(
        f"\nnew / old wall time: {wall_ratio:.2f} (CPU time {cpu_ratio:.2f}); "
        f"new recipe's lowest test accuracy {lowest:.4f} "
        f"({'meets' if lowest >= TARGET_ACCURACY else 'MISSES'} {TARGET_ACCURACY}), "
        f"mean {means['new']['accuracy']:.4f} against {means['old']['accuracy']:.4f}"
    )


if __name__ == "__main__":
    main()

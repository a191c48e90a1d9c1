"""Training without servers: configuration checks, early stopping, the loop's behaviour, the CLI."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from tirelib.cli import app, translate_legacy
from tirelib.config import Augmentation
from tirelib.errors import ConfigurationError
from tirelib.models import get_model
from tirelib.preprocessing import AUGMENTATIONS, Preprocessing, train_transform
from tirelib.train import (
    EarlyStopping,
    Loaders,
    fit,
    make_config,
    pick_device,
    train_one_epoch,
)

pytestmark = pytest.mark.unit


# --- configuration -------------------------------------------------------------------------


def test_defaults_resolve_the_models_input_size() -> None:
    assert make_config(dataset_version="v1").model_type == "cnn128"
    assert make_config(dataset_version="v1").image_size == 128
    assert make_config(dataset_version="v1", model_type="cnn").image_size == 64
    assert make_config(dataset_version="v1", model_type="efficientnet").image_size == 224
    assert make_config(dataset_version="v1", model_type="efficientnet").model_type == (
        "efficientnet_b0"
    )
    assert make_config(dataset_version="v1", optimizer_type="Adam").optimizer_type == "adam"


def test_weight_decay_defaults_to_adamws_own_and_none_for_the_others() -> None:
    assert make_config(dataset_version="v1").weight_decay == 0.05
    assert make_config(dataset_version="v1", optimizer_type="sgd").weight_decay == 0.0
    assert make_config(dataset_version="v1", optimizer_type="adam").weight_decay == 0.0
    assert make_config(dataset_version="v1", weight_decay=0.2).weight_decay == 0.2


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"optimizer_type": "adagrad"}, "'adam', 'adamw', 'sgd' or 'rmsprop'"),
        ({"model_type": "vgg19"}, "choose one of: cnn, cnn128, efficientnet_b0"),
        ({"learning_rate": 0}, "learning_rate=0: Input should be greater than 0"),
        ({"learning_rate": -0.1}, "greater than 0"),
        ({"batch_size": 0}, "batch_size=0: Input should be greater than or equal to 1"),
        ({"epochs": 0}, "epochs=0"),
        ({"dataset_version": "../etc"}, "invalid version name"),
        ({"scheduler": "linear"}, "'none', 'cosine', 'onecycle', 'step' or 'plateau'"),
        ({"min_accuracy": 1.5}, "min_accuracy=1.5"),
        ({"colour": "red"}, "colour='red': unknown key; allowed: epochs, learning_rate"),
    ],
)
def test_bad_values_are_named_with_what_is_allowed(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid training configuration") as error:
        make_config(**{"dataset_version": "v1", **values})
    assert message in str(error.value)


@pytest.mark.parametrize("policy", get_args(Augmentation))
def test_each_augmentation_policy_gives_the_models_input(policy: str) -> None:
    assert get_args(Augmentation) == AUGMENTATIONS
    prep = Preprocessing(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    image = Image.fromarray(np.full((128, 96, 3), 200, dtype=np.uint8))
    torch.manual_seed(0)
    views = [train_transform(prep, policy=policy)(image) for _ in range(4)]
    assert all(v.shape == (3, 64, 64) and v.dtype == torch.float32 for v in views)
    # A plain grey image stays within the jitter of its normalised value, (200/255 - 0.5) / 0.25.
    assert all(abs(float(v.mean()) - 1.137) < 0.8 for v in views)


def test_an_unknown_augmentation_is_refused_with_the_allowed_ones() -> None:
    with pytest.raises(ConfigurationError, match=r"augmentation='mixup'.*'dihedral' or 'crop'"):
        make_config(dataset_version="v1", augmentation="mixup")


# --- early stopping ------------------------------------------------------------------------


def _run(stopper: EarlyStopping, losses: list[float], accuracies: list[float]) -> int | None:
    for epoch, (loss, accuracy) in enumerate(zip(losses, accuracies, strict=True), start=1):
        if stopper.step(loss, accuracy):
            return epoch
    return None


def test_stops_after_patience_epochs_without_improvement() -> None:
    stopper = EarlyStopping(patience=3)
    epoch = _run(stopper, [1.0, 0.9, 0.95, 0.96, 0.97, 0.5], [0.5, 0.6, 0.55, 0.55, 0.55, 0.9])
    assert epoch == 5
    assert "no improvement" in stopper.reason


def test_better_accuracy_alone_counts_as_improvement() -> None:
    stopper = EarlyStopping(patience=2)
    assert _run(stopper, [0.5, 0.6, 0.6, 0.6], [0.6, 0.7, 0.8, 0.9]) is None


def test_changes_within_delta_are_not_improvements() -> None:
    stopper = EarlyStopping(patience=2, delta=0.05)
    assert _run(stopper, [1.0, 0.98, 0.97], [0.5, 0.52, 0.53]) == 3


def test_stops_as_soon_as_both_targets_are_met() -> None:
    stopper = EarlyStopping(patience=10, min_loss=0.3, min_accuracy=0.9)
    # Epoch 2 meets the loss target only, epoch 3 the accuracy target only, epoch 4 both.
    epoch = _run(stopper, [0.5, 0.25, 0.35, 0.2, 0.1], [0.8, 0.85, 0.95, 0.92, 0.99])
    assert epoch == 4
    assert "targets met" in stopper.reason


def test_one_target_alone_is_enough_when_only_one_is_set() -> None:
    assert _run(EarlyStopping(patience=10, min_accuracy=0.9), [1, 1, 1], [0.5, 0.91, 1]) == 2
    assert _run(EarlyStopping(patience=10, min_loss=0.2), [0.5, 0.4, 0.1], [0.5, 0.5, 0.5]) == 3


# --- the loop ------------------------------------------------------------------------------


def _toy_loaders(seed: int = 0) -> Loaders:
    """Class 1 images carry a bright square; class 0 do not. Learnable in a few epochs."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(96, 3, 32, 32, generator=generator) * 0.5
    labels = torch.arange(96) % 2
    images[labels == 1, :, 8:20, 8:20] += 0.5
    data = TensorDataset(images, labels)
    train = DataLoader(data, batch_size=16, shuffle=True, generator=generator)
    val = DataLoader(data, batch_size=32)
    return Loaders(train, val, val, ["good", "defective"], {}, None)  # type: ignore[arg-type]


def test_training_lowers_the_loss_and_restores_the_best_epoch() -> None:
    config = make_config(dataset_version="toy", model_type="cnn", epochs=6, learning_rate=0.01)
    result = fit(config, _toy_loaders(), pick_device(), progress=False)
    losses = [row["val_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert result.history[result.best_epoch - 1]["val_loss"] == min(losses)
    assert set(result.history[0]) >= {
        "train_loss",
        "val_loss",
        "val_accuracy",
        "val_precision",
        "val_recall",
        "val_f1",
        "learning_rate",
    }


def test_the_same_seed_gives_the_same_history() -> None:
    config = make_config(dataset_version="toy", model_type="tinyvgg", epochs=2, seed=3)
    first = fit(config, _toy_loaders(), pick_device(), progress=False).history
    second = fit(config, _toy_loaders(), pick_device(), progress=False).history
    assert first == second


def test_early_stopping_ends_training_before_the_last_epoch() -> None:
    config = make_config(
        dataset_version="toy", model_type="cnn", epochs=20, learning_rate=0.01, min_accuracy=0.6
    )
    result = fit(config, _toy_loaders(), pick_device(), progress=False)
    assert len(result.history) < 20
    assert "targets met" in result.stop_reason
    assert result.stop_reason.startswith(f"stopped early after epoch {len(result.history)}:")


def test_a_rule_firing_on_the_last_epoch_is_not_an_early_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A loss target any model meets: the rule fires after the first epoch, here also the last.
    config = make_config(dataset_version="toy", model_type="cnn", epochs=1, min_loss=1e6)
    with caplog.at_level("INFO", logger="tirelib.train"):
        result = fit(config, _toy_loaders(), pick_device(), progress=False)
    assert len(result.history) == 1
    assert result.stop_reason.startswith("ran all 1 epoch (targets met")
    assert "stopped early" not in caplog.text
    assert "ran all 1 epoch (targets met" in caplog.text

    # With epochs to spare, the same rule is an early stop and says so.
    longer = make_config(dataset_version="toy", model_type="cnn", epochs=3, min_loss=1e6)
    early = fit(longer, _toy_loaders(), pick_device(), progress=False)
    assert len(early.history) == 1
    assert early.stop_reason.startswith("stopped early after epoch 1: targets met")


def test_one_cycle_steps_every_batch_warming_up_then_annealing() -> None:
    config = make_config(
        dataset_version="toy",
        model_type="tinyvgg",
        epochs=3,
        learning_rate=0.01,
        scheduler="onecycle",
    )
    history = fit(config, _toy_loaders(), pick_device(), progress=False).history
    rates = [row["learning_rate"] for row in history]
    # Six batches an epoch: the first epoch starts at a 25th of the peak, the second starts
    # past the peak (30% of 18 steps), the third lower again.
    assert rates[0] == pytest.approx(0.01 / 25)
    assert rates[1] > rates[2] > rates[0]


def test_the_epoch_loss_is_the_mean_over_images_read_once_per_epoch() -> None:
    # A rate of 0 leaves the weights alone, so the loss of each batch can be computed again;
    # 96 images in batches of 36 leave a short last batch, which must weigh less.
    torch.manual_seed(0)
    model = get_model("tinyvgg")
    images = torch.rand(96, 3, 32, 32)
    labels = torch.arange(96) % 2
    loader = DataLoader(TensorDataset(images, labels), batch_size=36)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    mean = train_one_epoch(model, loader, optimizer, criterion, torch.device("cpu"), None)
    with torch.no_grad():
        expected = sum(criterion(model(x), y).item() * len(y) for x, y in loader) / 96
    assert mean == pytest.approx(expected, rel=1e-5)


def test_fit_times_its_epochs_and_returns_the_usual_memory_layout() -> None:
    config = make_config(dataset_version="toy", model_type="cnn", epochs=2)
    result = fit(config, _toy_loaders(), pick_device(), progress=False)
    assert [set(row) for row in result.seconds] == [{"train", "validate"}] * 2
    assert all(value > 0 for row in result.seconds for value in row.values())
    # Trained channels-last, saved and exported as the ordinary contiguous layout.
    weights = [p for p in result.model.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous() for p in weights)


# --- the command line ----------------------------------------------------------------------


def test_the_earlier_spelling_is_translated() -> None:
    argv = ["Train", "--dataset_version", "split_1", "--model_type", "cnn", "--learning_rate=0.01"]
    assert translate_legacy(argv) == [
        "train",
        "--dataset-version",
        "split_1",
        "--model-type",
        "cnn",
        "--learning-rate=0.01",
    ]
    assert translate_legacy(["data", "list"]) == ["data", "list"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizer-type", "adagrad"], "'adam', 'adamw', 'sgd' or 'rmsprop'"),
        (["--model-type", "vgg"], "choose one of"),
        (["--learning-rate", "0"], "greater than 0"),
        (["--batch-size", "0"], "batch_size=0"),
    ],
)
def test_cli_refuses_bad_hyperparameters_with_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from tirelib.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dataset-version", "v1", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_models_lists_every_architecture() -> None:
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    for name in ["cnn", "tinyvgg", "resnet18", "resnet50", "efficientnet_b2"]:
        assert name in result.output
    assert "efficientnet -> efficientnet_b0" in result.output

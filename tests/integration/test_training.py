"""Training and evaluation against a real MLflow server (PostgreSQL backend) and real S3.

Training is the slow part, so the module trains once (:func:`world`): a ``cnn`` for two epochs
and a ``tinyvgg`` for one, on one uploaded version. Each test reads those runs with an
experiment and a registered model of its own (:func:`env`); a test that trains through the
command line counts the runs of its own experiment.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from tests.cli import tirelib
from tests.conftest import S3Server, module_env
from tirelib.data import read_split, upload_version
from tirelib.drift import (
    BASELINE_FILE,
    BRIGHTNESS_BUCKETS,
    CONTRAST_BUCKETS,
    Baseline,
    histogram,
    image_statistics,
)
from tirelib.evaluate import MODEL_URI_TAG, evaluate_model, evaluate_run
from tirelib.settings import Settings, get_settings, reset_settings
from tirelib.storage import ContentCache, ObjectStore
from tirelib.synth import generate
from tirelib.train import TrainResult, make_config, train

pytestmark = pytest.mark.integration

VERSION = "tiny-1"
EPOCHS = {"cnn": 2, "tinyvgg": 1}


@dataclass(frozen=True)
class World:
    settings: Settings
    runs: dict[str, TrainResult]  # by model type, trained for EPOCHS[model type] on VERSION


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server, mlflow_server: str
) -> Iterator[World]:
    """One uploaded version and one finished run per model type (a module-scoped environment)."""
    root = tmp_path_factory.mktemp("training")
    with module_env(root, s3_server, mlflow_server, "training") as settings:
        generate(root / "synth", 120, seed=5, size=64)
        upload_version(ObjectStore.for_data(settings), root / "synth", VERSION, progress=False)
        runs = {
            model_type: train(
                make_config(
                    dataset_version=VERSION, model_type=model_type, epochs=epochs, batch_size=16
                ),
                settings,
                progress=False,
            )
            for model_type, epochs in EPOCHS.items()
        }
        yield World(settings, runs)


@pytest.fixture
def env(world: World, tracked_env: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """``tracked_env`` (an experiment and a model of this test's own) on the module's data."""
    monkeypatch.setenv("TIRE_DATA_BUCKET", world.settings.data_bucket)
    monkeypatch.setenv("TIRE_CACHE_DIR", str(world.settings.resolved_cache_dir))
    reset_settings()
    return get_settings()


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.mark.parametrize("model_type", EPOCHS)
def test_a_run_has_params_metrics_artifacts_and_a_servable_model(
    world: World, env: Settings, model_type: str
) -> None:
    epochs = EPOCHS[model_type]
    result = world.runs[model_type]
    client = MlflowClient(env.mlflow_tracking_uri)
    run = client.get_run(result.run_id)

    params = run.data.params
    for name, value in {
        "model_type": model_type,
        "dataset_version": VERSION,
        "epochs": str(epochs),
        "learning_rate": "0.003",
        "batch_size": "16",
        "optimizer_type": "adamw",
        "scheduler": "onecycle",
        "weight_decay": "0.05",
        "augmentation": "dihedral",
        "image_size": "64",
        "seed": "42",
        "patience": "5",
    }.items():
        assert params[name] == value, name
    history = client.get_metric_history(result.run_id, "val_loss")
    assert [m.step for m in history] == list(range(1, epochs + 1))
    for name in ["test_accuracy", "test_f1", "test_roc_auc", "inference_ms_per_image"]:
        assert name in run.data.metrics
    assert run.data.tags["dataset_version"] == VERSION
    assert run.data.tags[MODEL_URI_TAG] == result.model_uri
    assert run.inputs.dataset_inputs[0].dataset.name.endswith(f"/{VERSION}")

    files = _artifacts(client, result.run_id)
    for name in [
        "confusion_matrix.png",
        "roc_pr_curves.png",
        "training_curves.png",
        "sample_predictions.png",
        "classification_report.json",
        "classification_report.md",
        "skipped_files.json",
    ]:
        assert f"evaluation/{VERSION}/{name}" in files

    # Loaded back from the server, the model scores the test split exactly as it did in memory.
    evaluation = evaluate_model(result.model_uri, VERSION, env)
    assert evaluation.metrics.accuracy == result.test_metrics["test_accuracy"]
    assert evaluation.metrics.loss == pytest.approx(result.test_metrics["test_loss"], abs=1e-5)


def test_the_logged_model_predicts_from_raw_image_bytes(world: World, env: Settings) -> None:
    result = world.runs["cnn"]
    model = mlflow.pyfunc.load_model(result.model_uri)
    store = ObjectStore.for_data(env)
    records = read_split(store, VERSION, "test").records[:5]
    cache = ContentCache(env.resolved_cache_dir)
    frame = pd.DataFrame({"image": [cache.path(r.sha256).read_bytes() for r in records]})
    predictions = model.predict(frame)
    assert list(predictions.columns) == ["good", "defective", "label"]
    assert np.allclose(predictions[["good", "defective"]].sum(axis=1), 1.0, atol=1e-5)
    inner = model.unwrap_python_model()
    direct = inner.predict_proba(inner.prep.batch([inner.prep.from_bytes(b) for b in frame.image]))
    assert np.allclose(predictions[["good", "defective"]].to_numpy(), direct, atol=1e-6)

    # The drift baseline travels with the model, and with the run as baseline.json.
    baseline = inner.baseline
    assert baseline is not None
    logged = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/{BASELINE_FILE}")
    assert Baseline.model_validate(logged) == baseline
    assert baseline.test_accuracy == pytest.approx(result.test_metrics["test_accuracy"])
    test_split = read_split(store, VERSION, "test").records
    assert baseline.images == len(test_split) == sum(baseline.confidence_counts)
    # Brightness and contrast are those of the test images, resized, before normalisation.
    prep = inner.prep
    batch = prep.batch([prep.from_bytes(cache.path(r.sha256).read_bytes()) for r in test_split])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (prep.mean, prep.std))
    brightness, contrast = image_statistics((batch * std + mean).clamp(0, 1).numpy())
    assert baseline.brightness_counts == histogram(brightness, BRIGHTNESS_BUCKETS)
    assert baseline.contrast_counts == histogram(contrast, CONTRAST_BUCKETS)


def test_evaluate_logs_to_the_run_on_another_version(
    world: World, env: Settings, tmp_path: Path
) -> None:
    result = world.runs["tinyvgg"]
    assert result.run_id is not None
    generate(tmp_path / "more", 90, seed=9, size=64)
    upload_version(ObjectStore.for_data(env), tmp_path / "more", "tiny-2", progress=False)
    # The run resumes in its own experiment: the settings it was trained with.
    evaluation = evaluate_run(result.run_id, world.settings, dataset_version="tiny-2")
    run = MlflowClient(env.mlflow_tracking_uri).get_run(result.run_id)
    assert run.data.metrics["eval.tiny-2.test_accuracy"] == evaluation.metrics.accuracy
    assert run.data.metrics["test_accuracy"] == result.test_metrics["test_accuracy"]


def test_the_earlier_command_spelling_trains(env: Settings) -> None:
    done = tirelib(
        "Train",
        "--dataset_version",
        VERSION,
        "--model_type",
        "cnn",
        "--optimizer_type",
        "adam",
        "--epochs",
        "1",
        "--learning_rate",
        "0.01",
        "--batch_size",
        "32",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test: loss" in done.stdout
    runs = MlflowClient(env.mlflow_tracking_uri).search_runs(
        [mlflow.get_experiment_by_name(env.experiment).experiment_id]
    )
    assert [r.data.params["learning_rate"] for r in runs] == ["0.01"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset-version", "no-such-version"], "not found"),
        (["--dataset-version", VERSION, "--optimizer-type", "adagrad"], "'rmsprop'"),
        (["--dataset-version", VERSION, "--batch-size", "0"], "batch_size=0"),
    ],
)
def test_bad_input_stops_before_any_run(env: Settings, args: list[str], message: str) -> None:
    done = tirelib("train", *args)
    assert done.returncode == 2
    assert message in done.stderr
    experiment = mlflow.get_experiment_by_name(env.experiment)
    if experiment is not None:
        runs = MlflowClient(env.mlflow_tracking_uri).search_runs([experiment.experiment_id])
        assert runs == []

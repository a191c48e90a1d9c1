"""Training and evaluation against a real MLflow server (PostgreSQL backend) and real S3."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

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
from tirelib.settings import Settings
from tirelib.storage import ContentCache, ObjectStore
from tirelib.synth import generate
from tirelib.train import make_config, train

pytestmark = pytest.mark.integration

VERSION = "tiny-1"


@pytest.fixture
def tiny_version(tracked_env: Settings, tmp_path: Path) -> str:
    generate(tmp_path / "synth", 120, seed=5, size=64)
    upload_version(ObjectStore.for_data(tracked_env), tmp_path / "synth", VERSION, progress=False)
    return VERSION


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.mark.parametrize(("model_type", "epochs"), [("cnn", 2), ("tinyvgg", 1)])
def test_a_run_has_params_metrics_artifacts_and_a_servable_model(
    tracked_env: Settings, tiny_version: str, model_type: str, epochs: int
) -> None:
    config = make_config(
        dataset_version=tiny_version, model_type=model_type, epochs=epochs, batch_size=16
    )
    result = train(config, tracked_env, progress=False)
    client = MlflowClient(tracked_env.mlflow_tracking_uri)
    run = client.get_run(result.run_id)

    params = run.data.params
    for name, value in {
        "model_type": model_type,
        "dataset_version": tiny_version,
        "epochs": str(epochs),
        "learning_rate": "0.001",
        "batch_size": "16",
        "optimizer_type": "adam",
        "image_size": "64",
        "seed": "42",
        "patience": "3",
    }.items():
        assert params[name] == value, name
    history = client.get_metric_history(result.run_id, "val_loss")
    assert [m.step for m in history] == list(range(1, epochs + 1))
    for name in ["test_accuracy", "test_f1", "test_roc_auc", "inference_ms_per_image"]:
        assert name in run.data.metrics
    assert run.data.tags["dataset_version"] == tiny_version
    assert run.data.tags[MODEL_URI_TAG] == result.model_uri
    assert run.inputs.dataset_inputs[0].dataset.name.endswith(f"/{tiny_version}")

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
        assert f"evaluation/{tiny_version}/{name}" in files

    # Loaded back from the server, the model scores the test split exactly as it did in memory.
    evaluation = evaluate_model(result.model_uri, tiny_version, tracked_env)
    assert evaluation.metrics.accuracy == result.test_metrics["test_accuracy"]
    assert evaluation.metrics.loss == pytest.approx(result.test_metrics["test_loss"], abs=1e-5)


def test_the_logged_model_predicts_from_raw_image_bytes(
    tracked_env: Settings, tiny_version: str
) -> None:
    config = make_config(dataset_version=tiny_version, model_type="cnn", epochs=1)
    result = train(config, tracked_env, progress=False)
    model = mlflow.pyfunc.load_model(result.model_uri)
    store = ObjectStore.for_data(tracked_env)
    records = read_split(store, tiny_version, "test").records[:5]
    cache = ContentCache(tracked_env.resolved_cache_dir)
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
    test_split = read_split(store, tiny_version, "test").records
    assert baseline.images == len(test_split) == sum(baseline.confidence_counts)
    # Brightness and contrast are those of the test images, resized, before normalisation.
    prep = inner.prep
    batch = prep.batch([prep.from_bytes(cache.path(r.sha256).read_bytes()) for r in test_split])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (prep.mean, prep.std))
    brightness, contrast = image_statistics((batch * std + mean).clamp(0, 1).numpy())
    assert baseline.brightness_counts == histogram(brightness, BRIGHTNESS_BUCKETS)
    assert baseline.contrast_counts == histogram(contrast, CONTRAST_BUCKETS)


def test_evaluate_logs_to_the_run_on_another_version(
    tracked_env: Settings, tiny_version: str, tmp_path: Path
) -> None:
    result = train(
        make_config(dataset_version=tiny_version, model_type="tinyvgg", epochs=1),
        tracked_env,
        progress=False,
    )
    generate(tmp_path / "more", 90, seed=9, size=64)
    upload_version(ObjectStore.for_data(tracked_env), tmp_path / "more", "tiny-2", progress=False)
    evaluation = evaluate_run(result.run_id, tracked_env, dataset_version="tiny-2")
    run = MlflowClient(tracked_env.mlflow_tracking_uri).get_run(result.run_id)
    assert run.data.metrics["eval.tiny-2.test_accuracy"] == evaluation.metrics.accuracy
    assert run.data.metrics["test_accuracy"] == result.test_metrics["test_accuracy"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tirelib", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
        check=False,
    )


def test_the_earlier_command_spelling_trains(tracked_env: Settings, tiny_version: str) -> None:
    done = _cli(
        "Train",
        "--dataset_version",
        tiny_version,
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
    runs = MlflowClient(tracked_env.mlflow_tracking_uri).search_runs(
        [mlflow.get_experiment_by_name(tracked_env.experiment).experiment_id]
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
def test_bad_input_stops_before_any_run(
    tracked_env: Settings, tiny_version: str, args: list[str], message: str
) -> None:
    done = _cli("train", *args)
    assert done.returncode == 2
    assert message in done.stderr
    experiment = mlflow.get_experiment_by_name(tracked_env.experiment)
    if experiment is not None:
        runs = MlflowClient(tracked_env.mlflow_tracking_uri).search_runs([experiment.experiment_id])
        assert runs == []

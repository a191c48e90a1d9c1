"""MLflow helpers: where to track, lineage tags, dataset inputs, and logging the model.

Nothing here runs at import: entry points call :func:`configure` once.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec
from PIL import Image

from tirelib.preprocessing import Preprocessing
from tirelib.pyfunc import INPUT_COLUMN, TireClassifier, write_model_files
from tirelib.settings import Settings

log = logging.getLogger(__name__)

# Airflow exports these to every task process; they tie a run to the DAG run that made it.
_AIRFLOW_CONTEXT = {
    "AIRFLOW_CTX_DAG_ID": "airflow.dag_id",
    "AIRFLOW_CTX_DAG_RUN_ID": "airflow.run_id",
    "AIRFLOW_CTX_TASK_ID": "airflow.task_id",
    "AIRFLOW_CTX_TRY_NUMBER": "airflow.try_number",
}


def configure(settings: Settings) -> str:
    """Point MLflow at the tracking server and the experiment; return the experiment id."""
    if not sys.stderr.isatty():  # progress bars would flood task logs
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    experiment = mlflow.set_experiment(settings.experiment)
    return str(experiment.experiment_id)


def git_commit() -> str | None:
    """The commit of the code that runs: ``TIRE_GIT_COMMIT`` (images, CI), else ``git``."""
    if commit := os.environ.get("TIRE_GIT_COMMIT"):
        return commit
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def lineage_tags() -> dict[str, str]:
    """Where a run came from: the git commit and, inside Airflow, the DAG, run and task ids."""
    tags = {tag: os.environ[var] for var, tag in _AIRFLOW_CONTEXT.items() if os.environ.get(var)}
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
    return tags


def log_dataset(
    *, bucket: str, version: str, digest: str, context: str, counts: Mapping[str, int]
) -> None:
    """Record the dataset version as an MLflow dataset input of the active run."""
    source = resolve_dataset_source(f"s3://{bucket}/splits/{version}/")
    # MetaDataset is concrete at run time; its stubs leave ``profile`` abstract.
    dataset = MetaDataset(source=source, name=f"{bucket}/{version}", digest=digest[:16])  # type: ignore[abstract]
    tags = {f"count.{label}": str(n) for label, n in counts.items()}
    mlflow.log_input(dataset, context=context, tags=tags)


def _example_png(size: int) -> bytes:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def signature(classes: Sequence[str]) -> ModelSignature:
    columns: list[ColSpec | TensorSpec] = [ColSpec("double", c) for c in classes]
    inputs = Schema([ColSpec("binary", INPUT_COLUMN)])
    outputs = Schema([*columns, ColSpec("string", "label")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_model(
    network: torch.nn.Module,
    *,
    model_type: str,
    classes: Sequence[str],
    prep: Preprocessing,
    name: str = "model",
    params: Mapping[str, Any] | None = None,
) -> str:
    """Log the network as a pyfunc that decodes image bytes itself; return ``models:/<id>``."""
    import tirelib

    with tempfile.TemporaryDirectory(prefix="tire-model-") as tmp:
        artifacts = write_model_files(
            Path(tmp), network, model_type=model_type, classes=classes, prep=prep
        )
        example = pd.DataFrame({INPUT_COLUMN: [_example_png(min(prep.image_size, 64))]})
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=TireClassifier(),
            artifacts=artifacts,
            # The package travels with the model, so loading needs no tirelib install.
            code_paths=[str(Path(tirelib.__file__).parent)],
            signature=signature(classes),
            input_example=example,
            pip_requirements=_requirements(),
            params=dict(params or {}),
        )
    return f"models:/{info.model_id}"


def _requirements() -> list[str]:
    from importlib.metadata import version

    names = ["torch", "torchvision", "mlflow", "pillow", "numpy", "pandas", "pydantic-settings"]
    return [f"{name}=={version(name)}" for name in names]

"""MLflow helpers: where to track, lineage tags, dataset inputs, logging the model, and errors.

Nothing here runs at import: entry points call :func:`configure` once.

MLflow's client retries transient HTTP failures itself; what still comes out is classified by
:func:`server_unreachable` (a server that could not be reached or could not answer: worth a
retry) apart from an answer that refuses the request (an unknown run or model: final).
:func:`outages_are_retryable` turns the first kind into
:class:`~tirelib.errors.RegistryUnavailableError` and lets every other error through unchanged.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import requests
import torch
import urllib3.exceptions
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException, RestException
from mlflow.models import ModelSignature
from mlflow.tracking.context.registry import resolve_tags
from mlflow.types import ColSpec, Schema, TensorSpec
from PIL import Image

from tirelib.drift import Baseline
from tirelib.errors import RegistryUnavailableError, is_transient_http_status
from tirelib.preprocessing import Preprocessing
from tirelib.pyfunc import INPUT_COLUMN, TireClassifier, write_model_files
from tirelib.runtime import TestSample
from tirelib.settings import Settings
from tirelib.urls import mask_credentials, masked_url

log = logging.getLogger(__name__)

# Airflow exports these to every task process; they tie a run to the DAG run that made it.
_AIRFLOW_CONTEXT = {
    "AIRFLOW_CTX_DAG_ID": "airflow.dag_id",
    "AIRFLOW_CTX_DAG_RUN_ID": "airflow.run_id",
    "AIRFLOW_CTX_TASK_ID": "airflow.task_id",
    "AIRFLOW_CTX_TRY_NUMBER": "airflow.try_number",
}


HTTP_DEFAULTS = {
    # Four retries with backoff 1 wait about 0 + 2 + 4 + 8 s: a restarting server is ridden
    # out, a stopped one is reported within ~15 s (MLflow's own defaults wait ~4 minutes).
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
"""MLflow's own HTTP settings as tirelib defaults them; values already in the environment win."""


def apply_http_defaults() -> None:
    """Set :data:`HTTP_DEFAULTS` where the environment does not; every entry point that talks
    to MLflow calls this (through :func:`configure` or the registry's client)."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def configure(settings: Settings) -> str:
    """Point MLflow at the tracking server and the experiment; return the experiment id."""
    apply_http_defaults()
    if not sys.stderr.isatty():  # progress bars would flood task logs
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    with outages_are_retryable(
        settings.mlflow_tracking_uri, f"opening experiment {settings.experiment!r}"
    ):
        experiment = mlflow.set_experiment(settings.experiment)
    return str(experiment.experiment_id)


# --- errors --------------------------------------------------------------------------------

# What MLflow's REST client says once its own retries are spent (connection refused or reset,
# timeouts, 5xx and 429 answers), or for an answer without a JSON body.
_TRANSPORT_FAILURE = re.compile(r"API request to \S+ failed with (timeout )?exception")
# "... failed with error code 503 != 200": an answer that was not JSON, with its status.
_STATUS_IN_MESSAGE = re.compile(r"failed with error code (\d{3})\b")
_UNREACHABLE = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.RetryError,
    urllib3.exceptions.MaxRetryError,
    urllib3.exceptions.NewConnectionError,
    urllib3.exceptions.ProtocolError,
    ConnectionError,
    TimeoutError,
)


def http_status(error: BaseException) -> int | None:
    """The HTTP status a tracking server answered with, when ``error`` carries one."""
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return int(error.response.status_code)
    if isinstance(error, RestException):  # a JSON error body: its code maps to a status
        return int(error.get_http_status_code())
    match = (
        _STATUS_IN_MESSAGE.search(str(error.message))
        if isinstance(error, MlflowException)
        else None
    )
    return int(match.group(1)) if match else None


def server_unreachable(error: BaseException) -> bool:
    """Whether an MLflow client error means the server could not be reached or could not answer.

    True for connection failures and timeouts, and for answers with a 5xx or 429 status (a
    server whose database is down answers 500); False for an answer that refuses the request
    (no such run or model, a bad parameter: 4xx) and for errors raised without asking a server.
    The chain of causes is followed, as MLflow wraps the transport's errors.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        status = http_status(current)
        if status is not None:
            return is_transient_http_status(status)
        if isinstance(current, _UNREACHABLE):
            return True
        # Also inside the summary of failed artifact downloads, which keeps no cause.
        if isinstance(current, MlflowException) and _TRANSPORT_FAILURE.search(str(current.message)):
            return True
        current = current.__cause__ or current.__context__
    return False


def unavailable_error(
    error: BaseException, tracking_uri: str, doing: str
) -> RegistryUnavailableError:
    """The retryable error for ``error`` (see :func:`server_unreachable`), naming the server."""
    detail = mask_credentials(str(getattr(error, "message", None) or error))
    return RegistryUnavailableError(
        f"cannot reach the MLflow tracking server at {masked_url(tracking_uri)} while {doing} "
        f"(MLflow's own retries are spent; is it running?): {detail[:500]}"
    )


@contextmanager
def outages_are_retryable(tracking_uri: str, doing: str) -> Iterator[None]:
    """Raise :class:`RegistryUnavailableError` for an unreachable server; other errors pass.

    ``doing`` completes "while ..." in the message (``"loading models:/m/1"``). Wrap the
    MLflow calls of a step in it; a caller that also turns MLflow's refusals into errors of its
    own catches :class:`MlflowException` outside it.
    """
    try:
        yield
    except Exception as error:
        if server_unreachable(error):
            raise unavailable_error(error, tracking_uri, doing) from error
        raise


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
    """Where a run came from: the git commit and, inside Airflow, the DAG, run and task ids.

    MLflow's own tags that hold a credential (a git remote ``https://user:token@...``) are
    given masked: a tag passed to ``start_run`` replaces the one MLflow would infer.
    """
    tags = {
        name: masked
        for name, value in resolve_tags().items()
        if (masked := mask_credentials(str(value))) != value
    }
    tags.update(
        {tag: os.environ[var] for var, tag in _AIRFLOW_CONTEXT.items() if os.environ.get(var)}
    )
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
    baseline: Baseline | None = None,
    sample: TestSample | None = None,
) -> str:
    """Log the network as a pyfunc that decodes image bytes itself; return ``models:/<id>``.

    ``baseline`` (the drift baseline of the test split) travels with the model, and so do the
    network exported to ONNX and ``sample`` (test images that check the export, see
    :mod:`tirelib.runtime`)."""
    import tirelib

    with tempfile.TemporaryDirectory(prefix="tire-model-") as tmp:
        artifacts = write_model_files(
            Path(tmp),
            network,
            model_type=model_type,
            classes=classes,
            prep=prep,
            baseline=baseline,
            sample=sample,
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

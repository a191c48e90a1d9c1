"""The model server as integration tests run it: ``tirelib serve`` as a real process on a free
loopback port, ready when ``/readyz`` answers 200, stopped by its own pid.

:func:`running_server` starts one for any model URI (a registry alias, or a folder);
:func:`save_model_folder` writes a small untrained model that it can serve without MLflow.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import mlflow
import torch

from tirelib import tracking
from tirelib.drift import Baseline
from tirelib.models import get_model, get_spec
from tirelib.preprocessing import Preprocessing
from tirelib.pyfunc import TireClassifier, write_model_files
from tirelib.stack import HttpCheck, ManagedProcess, free_port


@contextmanager
def running_server(
    state_dir: Path,
    args: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 180,
) -> Iterator[ManagedProcess]:
    """``tirelib serve --port <free> *args``, ready; stopped by its pid afterwards.

    Yields the process: ``.url`` to call it, ``.pid`` to measure it.

    ``env`` is added to this process's environment (``TIRE_SERVE_*`` settings, credentials).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = ManagedProcess(
        "serve",
        [sys.executable, "-m", "tirelib", "serve", "--port", str(port), *args],
        state_dir=state_dir,
        ready=HttpCheck(f"{url}/readyz"),
        env={**os.environ, **(env or {})},
        url=url,
        ports=(port,),
    )
    process.start()
    try:
        process.wait_ready(ready_timeout)
        yield process
    finally:
        process.stop(timeout=20)


def save_model_folder(
    folder: Path,
    *,
    classes: Sequence[str] = ("good", "defective"),
    image_size: int = 32,
    baseline: Baseline | None = None,
    network: torch.nn.Module | None = None,
) -> Path:
    """A ``cnn`` (``network``, untrained when not given) saved as the pyfunc the registry holds;
    ``--model-uri <folder>`` serves it (as version 1, pinned), with ``baseline`` as its drift
    baseline when given."""
    torch.manual_seed(0)
    spec = get_spec("cnn")
    if network is None:
        network = get_model("cnn", num_classes=len(classes))
    artifacts = write_model_files(
        folder.parent / f"{folder.name}-files",
        network.eval(),
        model_type="cnn",
        classes=classes,
        prep=Preprocessing(image_size, spec.mean, spec.std),
        baseline=baseline,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no input example: none is needed here
        mlflow.pyfunc.save_model(
            path=str(folder),
            python_model=TireClassifier(),
            artifacts=artifacts,
            signature=tracking.signature(list(classes)),
            pip_requirements=[],
        )
    return folder

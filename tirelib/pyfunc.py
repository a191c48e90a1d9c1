"""The logged model: network weights, preprocessing and class names, as an MLflow pyfunc.

Any consumer (tirelib's server, ``mlflow models serve``, a batch job) that loads the model gets the
same prediction from the same image bytes, because decoding and resizing live here, beside the
network. Weights are a state dict loaded with ``weights_only=True``: nothing is unpickled.
The model also carries its drift baseline (``baseline.json``, a :class:`~tirelib.drift.Baseline`),
which the server exports beside the live statistics, the network exported to ONNX
(``model.onnx``) and a bounded sample of its test split (``test_sample.npz``), with which the
server checks the export before it serves with ONNX Runtime (:mod:`tirelib.runtime`).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel, PythonModelContext
from pydantic import ValidationError

from tirelib.drift import BASELINE_FILE, Baseline
from tirelib.errors import DataError
from tirelib.models import get_model
from tirelib.preprocessing import Preprocessing, softmax
from tirelib.runtime import ONNX_FILE, SAMPLE_FILE, TestSample, export_onnx

log = logging.getLogger(__name__)

INPUT_COLUMN = "image"


def write_model_files(
    directory: Path,
    network: torch.nn.Module,
    *,
    model_type: str,
    classes: Sequence[str],
    prep: Preprocessing,
    baseline: Baseline | None = None,
    sample: TestSample | None = None,
    onnx: bool = True,
) -> dict[str, str]:
    """Write the weights, the config, the baseline and the test sample (when given) and, with
    ``onnx``, the network exported to ONNX (skipped with a warning when the export fails), as
    the pyfunc loads them; return them as pyfunc ``artifacts``."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / "weights.pt"
    config = directory / "model_config.json"
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    torch.save(state, weights)
    config.write_text(
        json.dumps(
            {
                "model_type": model_type,
                "classes": list(classes),
                "preprocessing": prep.to_dict(),
            },
            indent=1,
        )
    )
    artifacts = {"weights": str(weights), "config": str(config)}
    if baseline is not None:
        path = directory / BASELINE_FILE
        path.write_text(baseline.model_dump_json(indent=1))
        artifacts["baseline"] = str(path)
    if onnx and export_onnx(network, prep.image_size, directory / ONNX_FILE):
        artifacts["onnx"] = str(directory / ONNX_FILE)
    if sample is not None:
        sample.save(directory / SAMPLE_FILE)
        artifacts["test_sample"] = str(directory / SAMPLE_FILE)
    return artifacts


class TireClassifier(PythonModel):
    """Input: a DataFrame with a binary ``image`` column (JPEG/PNG bytes, or base64 text).

    Output: one probability column per class, in class order, and ``label``, the likeliest class.
    """

    classes: list[str]
    model_type: str
    prep: Preprocessing
    network: torch.nn.Module
    # The drift baseline stored at training; None for a model logged before baselines were.
    baseline: Baseline | None = None
    # The ONNX export (bytes, read at load: the files may be gone once loaded) and the test
    # sample that checks it; None for a model logged without them.
    onnx_model: bytes | None = None
    test_sample: TestSample | None = None

    def load_context(self, context: PythonModelContext) -> None:
        artifacts = context.artifacts
        self.load(
            Path(artifacts["config"]),
            Path(artifacts["weights"]),
            *(Path(artifacts[k]) if artifacts.get(k) else None for k in ("baseline", "onnx")),
            sample_path=Path(artifacts["test_sample"]) if artifacts.get("test_sample") else None,
        )

    def load(
        self,
        config_path: Path,
        weights_path: Path,
        baseline_path: Path | None = None,
        onnx_path: Path | None = None,
        *,
        sample_path: Path | None = None,
    ) -> None:
        """Load the config and weights; the baseline, the ONNX export and the test sample from
        the paths given, else from their files beside the config when they are there."""
        config = json.loads(config_path.read_text())
        self.classes = list(config["classes"])
        self.model_type = config["model_type"]
        self.prep = Preprocessing.from_dict(config["preprocessing"])
        network = get_model(self.model_type, num_classes=len(self.classes))
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
        self.network = network.eval()
        self.baseline = read_baseline(baseline_path or config_path.with_name(BASELINE_FILE))
        onnx_path = onnx_path or config_path.with_name(ONNX_FILE)
        self.onnx_model = onnx_path.read_bytes() if onnx_path.is_file() else None
        self.test_sample = read_test_sample(sample_path or config_path.with_name(SAMPLE_FILE))

    def predict_proba(self, batch: torch.Tensor) -> np.ndarray:
        """Class probabilities for a preprocessed NCHW batch."""
        with torch.inference_mode():
            result: np.ndarray = softmax(self.network(batch)).numpy()
        return result

    def predict(
        self,
        context: PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input:
            raise DataError(f"expected a DataFrame with an {INPUT_COLUMN!r} column of image bytes")
        tensors = [self.prep.from_bytes(_as_bytes(v)) for v in model_input[INPUT_COLUMN]]
        probabilities = self.predict_proba(self.prep.batch(tensors))
        frame = pd.DataFrame(probabilities, columns=self.classes)
        frame["label"] = [self.classes[i] for i in probabilities.argmax(axis=1)]
        return frame


def read_baseline(path: Path) -> Baseline | None:
    """The baseline stored in ``path``; None when there is no such file, or it is unreadable
    (a model serves without one: only monitoring loses its reference)."""
    if not path.is_file():
        return None
    try:
        return Baseline.model_validate_json(path.read_text())
    except (OSError, ValidationError) as error:
        log.warning("ignoring the model's unreadable drift baseline %s: %s", path.name, error)
        return None


def read_test_sample(path: Path) -> TestSample | None:
    """The test sample stored in ``path``; None when there is none or it is unreadable (the
    server then serves with PyTorch and says why)."""
    if not path.is_file():
        return None
    try:
        return TestSample.load(path)
    except (OSError, ValueError, KeyError) as error:
        log.warning("ignoring the model's unreadable test sample %s: %s", path.name, error)
        return None


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except ValueError as error:
            raise DataError("an image given as text must be base64-encoded bytes") from error
    raise DataError(f"an image must be bytes or base64 text, got {type(value).__name__}")

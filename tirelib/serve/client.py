"""A REST client of the model server (TensorFlow Serving's API), and the earlier system's report on
a served model: a whole test split sent through the API in batches, scored and timed.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import numpy as np

from tirelib.errors import DataError, TirelibError
from tirelib.metrics import ClassificationMetrics, compute_metrics
from tirelib.settings import Settings
from tirelib.urls import mask_credentials

log = logging.getLogger(__name__)


class ServingError(TirelibError):
    """The model server could not be reached or refused a request."""


class ServingClient:
    """Calls ``<url>/v1/models/<model>…`` as any TF Serving REST client does."""

    def __init__(self, url: str, *, model: str = "tire", timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise ServingError(
                mask_credentials(f"{method} {self.url}{path} failed: {error}")
            ) from error
        if response.status_code != 200:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise ServingError(
                mask_credentials(
                    f"{method} {self.url}{path} answered {response.status_code}: {message[:500]}"
                )
            )
        return response.json()

    def metadata(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/models/{self.model}/metadata")
        return result

    def predict_encoded(self, images: Sequence[bytes]) -> np.ndarray:
        """Class probabilities for encoded images (JPEG, PNG, …), sent as ``{"b64": …}``."""
        body = {"instances": [{"b64": base64.b64encode(data).decode()} for data in images]}
        result = self._call("POST", f"/v1/models/{self.model}:predict", json=body)
        return np.asarray(result["predictions"], dtype=np.float64)


@dataclass
class ServedEvaluation:
    """A served model's scores on one version's test split."""

    url: str
    model_version: str
    dataset_version: str
    metrics: ClassificationMetrics
    ms_per_image: float
    plot: Path | None

    def summary(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "model_version": self.model_version,
            "dataset_version": self.dataset_version,
            "metrics": {
                **self.metrics.as_dict("test_"),
                "inference_ms_per_image": self.ms_per_image,
            },
            "plot": str(self.plot) if self.plot else None,
        }


def evaluate_served(
    url: str,
    dataset_version: str,
    settings: Settings,
    *,
    model: str = "tire",
    batch_size: int = 100,
    plot_path: Path | None = None,
    progress: bool | None = None,
) -> ServedEvaluation:
    """Send ``dataset_version``'s test split to the server at ``url`` in batches of
    ``batch_size`` images; score the answers, time them (round trip per image), and draw the
    sample predictions to ``plot_path``."""
    from tirelib import reports
    from tirelib.data import ensure_splits
    from tirelib.evaluate import sample_images
    from tirelib.progress import progress_bar
    from tirelib.storage import ContentCache, ObjectStore

    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    store = ObjectStore.for_data(settings)
    test = ensure_splits(store, dataset_version)["test"]
    records = list(test.records)
    if not records:
        raise DataError(f"version {dataset_version!r} has an empty test split")
    cache = ContentCache(settings.resolved_cache_dir)
    cache.fetch(
        store,
        ((r.key, r.sha256) for r in records),
        max_workers=settings.s3_max_workers,
        progress=progress,
    )
    with ServingClient(url, model=model) as client:
        meta = client.metadata()
        classes = list(meta["metadata"]["tire"]["classes"])
        version = str(meta["model_spec"]["version"])
        if classes != list(test.classes):
            raise DataError(
                f"the served model predicts {classes} but version {dataset_version!r} has "
                f"classes {test.classes}"
            )
        parts, seconds = [], 0.0
        starts = range(0, len(records), batch_size)
        for start in progress_bar(starts, desc="served", unit="batch", enabled=progress):
            chunk = records[start : start + batch_size]
            payload = [cache.path(r.sha256).read_bytes() for r in chunk]
            began = time.perf_counter()
            parts.append(client.predict_encoded(payload))
            seconds += time.perf_counter() - began
    probabilities = np.concatenate(parts)
    targets = np.array([test.classes.index(r.label) for r in records], dtype=np.int64)
    metrics = compute_metrics(targets, probabilities, test.classes)
    if plot_path is not None:
        reports.plot_sample_predictions(
            sample_images(records, cache), targets, probabilities, classes, plot_path
        )
    ms = 1000 * seconds / len(records)
    log.info("%d images of %s scored by %s version %s", len(records), dataset_version, url, version)
    return ServedEvaluation(url, version, dataset_version, metrics, ms, plot_path)

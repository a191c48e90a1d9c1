"""The served model: load a version, warm it up, swap it in atomically, watch the alias.

:class:`ModelHolder` keeps one reference, :attr:`ModelHolder.current`, to an immutable
:class:`ServedModel`. A request reads it once and keeps that object to the end, so a swap (one
assignment) never changes the model under a request in flight. A new version is loaded beside
the old one, checked with a forward pass, and only then swapped in; a version that fails to load
never replaces a working one: the status shows the error, a counter counts it and Slack hears.

What runs the network is chosen at load (:func:`tirelib.runtime.choose_backend`): ONNX Runtime
when the version's ONNX export matches PyTorch on its test images, else PyTorch; the served model
says which and why (:attr:`ServedModel.backend`, :attr:`ServedModel.backend_reason`).

Where versions come from is a :class:`ModelSource`: :class:`RegistrySource` reads the MLflow
model registry (``models:/<name>@<alias>`` is followed, ``models:/<name>/<version>`` is pinned);
:class:`StaticSource` serves a classifier already in memory (tests, notebooks).
"""

from __future__ import annotations

import logging
import re
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from tirelib import notify
from tirelib.drift import Baseline
from tirelib.errors import TirelibError
from tirelib.preprocessing import Preprocessing, softmax, softmax_rows
from tirelib.pyfunc import TireClassifier
from tirelib.runtime import Backend, BackendError, Network, Quantize, choose_backend
from tirelib.urls import mask_credentials

if TYPE_CHECKING:
    from tirelib.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)

State = Literal["LOADING", "AVAILABLE", "UNAVAILABLE"]
# Probabilities of the rewritten network may differ from the original's by float rounding only.
_REWRITE_TOLERANCE = 1e-4
_MAX_RETRY_S = 600.0
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")


class ModelLoadError(TirelibError):
    """A model version could not be found, loaded or warmed up."""


# --------------------------------------------------------------------------- the loaded model


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for, but torch sees no CUDA device")
    return torch.device(name)


def _probabilities(network: Network, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return softmax(network(images))


def optimize_network(network: nn.Module, example: torch.Tensor) -> nn.Module:
    """``network`` rewritten for inference when the rewrite gives the same probabilities.

    Every BatchNorm is folded into the convolution before it (in eval mode it is an affine map),
    dropout is dropped, and on the CPU the convolutions run on oneDNN's blocked layout with
    weights packed once (``torch.fx``'s ``optimize_for_inference``): fewer passes over memory, the
    same numbers up to float rounding. The result is kept only if its probabilities on
    ``example`` (the served image size) match the original's; a network that cannot be traced
    is returned unchanged.
    """
    from torch.fx.experimental.optimization import fuse, optimize_for_inference

    cpu = example.device.type == "cpu" and torch.backends.mkldnn.is_available()
    try:
        with warnings.catch_warnings():
            # oneDNN's packed modules are TorchScript ones, which torch now calls deprecated.
            warnings.simplefilter("ignore", FutureWarning)
            rewritten = optimize_for_inference(network) if cpu else fuse(network, inplace=False)
        # Two batch sizes: the batch dimension must stay free.
        difference = max(
            float((_probabilities(network, x) - _probabilities(rewritten, x)).abs().max())
            for x in (example, example[:1])
        )
    # Tracing and layout passes fail in many ways on networks they do not fit (dynamic control
    # flow, unsupported modules or dtypes); the original network is always a safe answer.
    except (RuntimeError, TypeError, ValueError, NotImplementedError, AttributeError,
            AssertionError) as error:  # fmt: skip
        log.info("serving the network as it is: it cannot be rewritten (%s)", error)
        return network
    if not difference <= _REWRITE_TOLERANCE:
        log.warning(
            "serving the network as it is: the rewrite moved a probability by %g", difference
        )
        return network
    return rewritten


def _baseline(value: object) -> Baseline | None:
    """A model's drift baseline, or None (an older model has none; an unreadable one is logged)."""
    if value is None or isinstance(value, Baseline):
        return value
    try:
        return Baseline.model_validate(value)
    except ValidationError as error:
        log.warning("the model's baseline is unreadable, so none is exported: %s", error)
        return None


@dataclass(frozen=True, eq=False)
class ServedModel:
    """One loaded version, ready to predict. Immutable: a new version is a new object."""

    version: str
    uri: str
    model_type: str
    classes: tuple[str, ...]
    prep: Preprocessing
    network: Network  # the PyTorch network, or an ONNX Runtime session called like one
    device: torch.device
    baseline: Baseline | None = None
    loaded_at: float = field(default_factory=time.time)
    backend: str = "torch"  # torch or onnxruntime
    backend_reason: str = ""  # why: the check's result, or why ONNX Runtime is not used
    quantization: str = "none"  # int8 when ONNX Runtime runs the export quantized

    @classmethod
    def build(
        cls,
        classifier: TireClassifier,
        *,
        version: str,
        uri: str,
        device: torch.device | None = None,
        optimize: bool = True,
        backend: Backend = "auto",
        quantize: Quantize = "none",
        max_accuracy_drop: float = 0.01,
        threads: int | None = None,
    ) -> ServedModel:
        """Choose the backend, prepare ``classifier``'s network for inference and warm it up
        with a forward pass. ``threads`` are ONNX Runtime's (default: torch's setting).

        Raises :class:`ModelLoadError` when the network's output does not fit its classes, or
        when backend ``onnxruntime`` was asked for and cannot serve this version.
        """
        device = device or torch.device("cpu")
        classes = tuple(classifier.classes)
        prep = classifier.prep
        reference = classifier.network.eval().to(device)
        example = torch.rand(2, 3, prep.image_size, prep.image_size, device=device)
        try:
            choice = choose_backend(
                wanted=backend,
                onnx_model=getattr(classifier, "onnx_model", None),
                sample=getattr(classifier, "test_sample", None),
                reference=reference,
                prep=prep,
                threads=threads or torch.get_num_threads(),
                device=device,
                quantize=quantize,
                max_accuracy_drop=max_accuracy_drop,
            )
        except BackendError as error:
            raise ModelLoadError(str(error)) from error
        log.info("version %s runs on %s: %s", version, choice.backend, choice.reason)
        network: Network = reference
        try:
            if choice.network is not None:
                network = choice.network
            elif optimize:
                network = optimize_network(reference, example)
            probabilities = _probabilities(network, example)  # the warm-up
        except RuntimeError as error:
            raise ModelLoadError(
                f"the network fails on a batch of {prep.image_size} px images: {error}"
            ) from error
        if tuple(probabilities.shape) != (2, len(classes)):
            raise ModelLoadError(
                f"the network gives outputs of shape {list(probabilities.shape)} for 2 images, "
                f"but the model has {len(classes)} classes {list(classes)}"
            )
        if not bool(torch.isfinite(probabilities).all()):
            raise ModelLoadError("the network gives NaN or infinite outputs")
        return cls(
            version=version,
            uri=uri,
            model_type=classifier.model_type,
            classes=classes,
            prep=prep,
            network=network,
            device=device,
            # Models logged before baselines existed have none: the gauges are then cleared.
            baseline=_baseline(getattr(classifier, "baseline", None)),
            backend=choice.backend,
            backend_reason=choice.reason,
            quantization="int8" if choice.quantized else "none",
        )

    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        """Class probabilities (float32, one row per image) for a preprocessed NCHW batch."""
        with torch.inference_mode():
            logits = self.network(images.to(self.device, non_blocking=True))
            # [N, classes] is tiny: numpy, in this thread (a torch op here may wait on its
            # thread pool or the GIL longer than it computes)
            return softmax_rows(logits.float().cpu().numpy())


# --------------------------------------------------------------------------- where models come from


class ModelSource(Protocol):
    """Tells which version is wanted now and loads a version."""

    @property
    def uri(self) -> str:
        """What is served, for messages (``models:/name@production``)."""
        ...

    @property
    def watches(self) -> bool:
        """Whether the wanted version can change (an alias), so it is polled."""
        ...

    @property
    def alias(self) -> str | None:
        """The alias followed (``production``), which requests may name as a version label."""
        ...

    def resolve(self) -> str:
        """The version wanted now."""
        ...

    def version_uri(self, version: str) -> str: ...

    def load(self, version: str) -> TireClassifier: ...


class RegistrySource:
    """Versions from the MLflow model registry, or one fixed model URI.

    ``models:/<name>@<alias>`` follows the alias; ``models:/<name>/<version>`` is that version,
    pinned; any other URI MLflow can load (``runs:/…``, ``models:/<model id>``, a folder) is
    served as version ``1``, pinned.
    """

    def __init__(self, uri: str, *, tracking_uri: str | None = None) -> None:
        import mlflow

        from tirelib.tracking import apply_http_defaults

        apply_http_defaults()  # a registry that is down is reported in seconds, not minutes
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self._uri = uri
        self.name: str | None = None
        self._alias: str | None = None
        self.version: str | None = None
        if match := _ALIAS_URI.match(uri):
            self.name, self._alias = match["name"], match["alias"]
        elif match := _VERSION_URI.match(uri):
            self.name, self.version = match["name"], match["version"]

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def watches(self) -> bool:
        return self._alias is not None

    @property
    def alias(self) -> str | None:
        return self._alias

    def resolve(self) -> str:
        if self._alias is None:
            return self.version or "1"
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        assert self.name is not None  # set together with the alias
        try:
            found = MlflowClient().get_model_version_by_alias(self.name, self._alias)
        except MlflowException as error:
            raise ModelLoadError(f"cannot resolve {self._uri}: {error.message}") from error
        return str(found.version)

    def version_uri(self, version: str) -> str:
        if self.name is None:
            return self._uri
        return f"models:/{self.name}/{version}"

    def load(self, version: str) -> TireClassifier:
        import mlflow.pyfunc

        uri = self.version_uri(version)
        saved_path = list(sys.path)
        with tempfile.TemporaryDirectory(prefix="tire-serve-") as tmp:
            try:
                loaded = mlflow.pyfunc.load_model(uri, dst_path=tmp)
            finally:
                # load_model prepends the model's bundled code folder to sys.path on every load;
                # tirelib is imported already, so the folder (deleted below) is not needed.
                sys.path[:] = saved_path
        model = loaded.unwrap_python_model()
        if not isinstance(model, TireClassifier):
            raise ModelLoadError(
                f"{uri} is not a tire classifier (its python model is {type(model).__name__})"
            )
        return model


class StaticSource:
    """One classifier already in memory, served as ``version``."""

    def __init__(self, classifier: TireClassifier, *, version: str = "1", uri: str = "") -> None:
        self.classifier = classifier
        self.version = version
        self._uri = uri or f"memory:/{classifier.model_type}"

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def watches(self) -> bool:
        return False

    @property
    def alias(self) -> str | None:
        return None

    def resolve(self) -> str:
        return self.version

    def version_uri(self, version: str) -> str:
        return self._uri

    def load(self, version: str) -> TireClassifier:
        return self.classifier


# --------------------------------------------------------------------------- alerts


def notify_slack(webhook_url: str | None, text: str, *, timeout: float = 5.0) -> bool:
    """Post ``text`` to a Slack incoming webhook; whether Slack took it. Never raises."""
    if not webhook_url:
        return False
    return notify.post_webhook(webhook_url, text, timeout=timeout)


# --------------------------------------------------------------------------- the holder


@dataclass(frozen=True)
class VersionState:
    """A version's line in ``GET /v1/models/<name>``."""

    version: str
    state: State
    error_message: str = ""

    @property
    def error_code(self) -> str:
        return "UNKNOWN" if self.error_message else "OK"


@dataclass
class _Failure:
    attempts: int
    retry_at: float


class ModelHolder:
    """The model being served, and the watcher that swaps in a new version when it is wanted."""

    def __init__(
        self,
        source: ModelSource,
        *,
        name: str = "tire",
        device: torch.device | None = None,
        optimize: bool = True,
        backend: Backend = "auto",
        quantize: Quantize = "none",
        max_accuracy_drop: float = 0.01,
        threads: int | None = None,
        poll_interval_s: float = 5.0,
        metrics: ServeMetrics | None = None,
        notify: Callable[[str], object] | None = None,
    ) -> None:
        self.source = source
        self.name = name
        self.device = device or torch.device("cpu")
        self.optimize = optimize
        self.backend: Backend = backend
        self.quantize: Quantize = quantize
        self.max_accuracy_drop = max_accuracy_drop
        self.threads = threads
        self.poll_interval_s = poll_interval_s
        self.metrics = metrics
        self.notify = notify
        self._current: ServedModel | None = None
        self._states: dict[str, VersionState] = {}
        self._failures: dict[str, _Failure] = {}
        self._lock = threading.Lock()  # guards _states and the poll itself, not _current
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._attempted = threading.Event()
        self._thread: threading.Thread | None = None
        self.problem: str | None = None  # why the wanted version is not known (alias missing…)

    @property
    def current(self) -> ServedModel | None:
        """The model to use for a new request (read it once, keep it for the request)."""
        return self._current

    def status(self) -> list[VersionState]:
        with self._lock:
            states = list(self._states.values())
        return sorted(states, key=lambda s: (len(s.version), s.version), reverse=True)

    def state_of(self, version: str) -> VersionState | None:
        with self._lock:
            return self._states.get(version)

    def _set_state(self, state: VersionState) -> None:
        with self._lock:
            self._states[state.version] = state

    # -- polling

    def poll_once(self) -> bool:
        """Look up the wanted version and swap it in if it is new; return whether it swapped."""
        with self._poll_lock:
            return self._poll()

    def _poll(self) -> bool:
        try:
            version = self.source.resolve()
        except (TirelibError, OSError) as error:
            self._problem(mask_credentials(str(error)))
            return False
        current = self._current
        if current is not None and current.version == version:
            self._problem(None)
            return False
        failure = self._failures.get(version)
        if failure is not None and time.monotonic() < failure.retry_at:
            return False
        self._problem(None)
        return self._load(version, previous=current)

    def _problem(self, message: str | None) -> None:
        if message != self.problem and message is not None:
            log.warning("%s", message)
        self.problem = message

    def _load(self, version: str, *, previous: ServedModel | None) -> bool:
        uri = self.source.version_uri(version)
        log.info("loading %s (version %s)", uri, version)
        self._set_state(VersionState(version, "LOADING"))
        started = time.perf_counter()
        try:
            classifier = self.source.load(version)
            served = ServedModel.build(
                classifier,
                version=version,
                uri=uri,
                device=self.device,
                optimize=self.optimize,
                backend=self.backend,
                quantize=self.quantize,
                max_accuracy_drop=self.max_accuracy_drop,
                threads=self.threads,
            )
        except Exception as error:
            # Whatever a new version raises is recorded, counted and alerted, and the working
            # version stays: that is the point of the holder.
            self._failed(version, uri, error, previous)
            return False
        self._current = served  # the swap: one reference assignment
        with self._lock:
            if previous is not None:
                self._states.pop(previous.version, None)
            self._states[version] = VersionState(version, "AVAILABLE")
        self._failures.pop(version, None)
        if self.metrics is not None:
            self.metrics.model_loaded(
                version=version,
                model_type=served.model_type,
                name=self.name,
                baseline=served.baseline,
                classes=served.classes,
            )
        was = f" (was version {previous.version})" if previous is not None else ""
        log.info(
            "serving %s version %s%s: %s on %s%s, classes %s, loaded in %.1f s",
            self.name, version, was, served.model_type, served.backend,
            " (int8)" if served.quantization == "int8" else "", list(served.classes),
            time.perf_counter() - started,
        )  # fmt: skip
        return True

    def _failed(
        self, version: str, uri: str, error: Exception, previous: ServedModel | None
    ) -> None:
        # Shown by the status endpoint and sent to Slack: MLflow's text quotes the tracking URI.
        message = mask_credentials(f"{type(error).__name__}: {error}")
        log.error("version %s of %s failed to load: %s", version, self.name, message, exc_info=True)
        self._set_state(VersionState(version, "UNAVAILABLE", message))
        failure = self._failures.get(version)
        attempts = 1 if failure is None else failure.attempts + 1
        delay = min(self.poll_interval_s * 2**attempts, _MAX_RETRY_S)
        self._failures[version] = _Failure(attempts, time.monotonic() + delay)
        if self.metrics is not None:
            self.metrics.model_failed()
        if attempts == 1 and self.notify is not None:
            keeps = (
                f"still serving version {previous.version}"
                if previous is not None
                else "no version is being served"
            )
            self.notify(
                f":warning: model server '{self.name}': version {version} ({uri}) failed to "
                f"load and was not swapped in; {keeps}. {message[:500]}"
            )

    # -- the watcher thread

    def start(self) -> None:
        """Load the wanted version in a background thread, then keep watching the source."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="tire-model-watcher", daemon=True)
        self._thread.start()

    def wait_first_attempt(self, timeout: float) -> bool:
        """Wait until the first load attempt ended; return whether a model is loaded."""
        self._attempted.wait(timeout)
        return self._current is not None

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # the watcher must outlive any one bad poll
                log.exception("checking %s failed; trying again later", self.source.uri)
            self._attempted.set()
            if not self.source.watches and self._current is not None:
                return  # pinned, and loaded: nothing can change
            self._stop.wait(self.poll_interval_s)

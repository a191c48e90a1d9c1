"""The network's runtimes: PyTorch, and ONNX Runtime when it gives the same answers.

When a model is logged, its network is also exported to ONNX (:func:`export_onnx`, a dynamic
batch axis) and a bounded sample of its test split travels with it (:class:`TestSample`: the
resized pixels as ``uint8`` and the true labels), so whoever loads the model can check the export
before using it. A failed export is a warning: the model then has no ONNX file and is served by
PyTorch.

When the server loads a version, :func:`choose_backend` decides what runs it. ONNX Runtime is
used only when the version has an ONNX file and its probabilities on the test sample are within
:data:`PARITY_TOLERANCE` of PyTorch's; otherwise PyTorch serves, and the choice says why. With
int8 quantization asked for, the export is quantized statically (calibrated on the sample) and
its accuracy on the sample is compared with PyTorch's instead: the accuracy may drop by at most
the bound given.
"""

from __future__ import annotations

import copy
import io
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from tirelib.errors import TirelibError
from tirelib.preprocessing import Preprocessing, softmax

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "onnxruntime"]
Quantize = Literal["none", "int8"]
BACKENDS: tuple[Backend, ...] = ("auto", "torch", "onnxruntime")

ONNX_FILE = "model.onnx"
SAMPLE_FILE = "test_sample.npz"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
OPSET = 17
PARITY_TOLERANCE = 1e-4
"""Largest absolute difference of a probability allowed between ONNX Runtime and PyTorch."""
MAX_SAMPLE_IMAGES = 256
MAX_SAMPLE_BYTES = 16 * 2**20
"""The test sample's bound: at most this many images and bytes of pixels (111 at 224 px)."""
CALIBRATION_IMAGES = 32
"""Images of the sample that calibrate int8 quantization's activation ranges."""
_CHUNK = 32  # images per forward pass of a check: bounded memory whatever the sample


class BackendError(TirelibError):
    """The backend asked for cannot serve this version (no ONNX file, outputs that differ...)."""


# --------------------------------------------------------------------------- at logging


def export_onnx(network: nn.Module, image_size: int, path: Path) -> bool:
    """Write ``network`` (on the CPU, in eval mode) to ``path`` as ONNX, batch axis dynamic.

    Returns whether it did; a network the exporter cannot handle is a warning, not an error, so
    training never fails for it. The TorchScript-based exporter (``dynamo=False``) is used: it
    needs no package beyond torch and exports a small network in about a second, where the
    ``torch.export``-based one takes 15 to 25 seconds here (and needs onnxscript).
    """
    example = torch.rand(2, 3, image_size, image_size)
    began = time.perf_counter()
    try:
        # A copy: the caller's network keeps its device and training mode.
        network = copy.deepcopy(network).cpu().eval()
        with warnings.catch_warnings():
            # torch calls the TorchScript-based exporter deprecated; it still ships and works.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                network,
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET,
            )
    # The exporter fails in many ways on networks it does not fit (unsupported operators,
    # dynamic control flow, custom modules); the model is then served by PyTorch only.
    except Exception as error:
        log.warning(
            "the network could not be exported to ONNX, so it will be served by PyTorch: %s: %s",
            type(error).__name__, error,
        )  # fmt: skip
        path.unlink(missing_ok=True)
        return False
    log.info("exported the network to ONNX in %.1f s", time.perf_counter() - began)
    return True


def sample_limit(image_size: int) -> int:
    """How many images of ``image_size`` pixels square the test sample keeps."""
    per_image = 3 * image_size * image_size
    return max(1, min(MAX_SAMPLE_IMAGES, MAX_SAMPLE_BYTES // per_image))


@dataclass(frozen=True)
class TestSample:
    """Test images as the network sees them before normalisation (resized, NCHW ``uint8``)
    and their true labels (class indices)."""

    __test__ = False  # not a pytest class

    pixels: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.pixels.ndim != 4 or self.pixels.shape[1] != 3 or self.pixels.dtype != np.uint8:
            raise ValueError(
                f"test sample pixels must be uint8 [N, 3, H, W], got {self.pixels.dtype} "
                f"{list(self.pixels.shape)}"
            )
        if self.labels.shape != (len(self.pixels),):
            raise ValueError(
                f"test sample has {len(self.pixels)} images but labels of shape "
                f"{list(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.pixels)

    def images(self, prep: Preprocessing) -> torch.Tensor:
        """The normalised NCHW float32 batch the network takes."""
        return prep.finish(torch.from_numpy(self.pixels).float().div_(255.0))

    def save(self, path: Path) -> None:
        np.savez_compressed(path, pixels=self.pixels, labels=self.labels)

    @classmethod
    def load(cls, path: Path) -> TestSample:
        with np.load(path, allow_pickle=False) as data:
            return cls(np.asarray(data["pixels"]), np.asarray(data["labels"], dtype=np.int64))

    @classmethod
    def from_bytes(cls, data: bytes) -> TestSample:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return cls(np.asarray(arrays["pixels"]), np.asarray(arrays["labels"], dtype=np.int64))


class SampleTap:
    """Iterates over a loader of normalised ``(images, targets)`` batches and keeps the first
    ``limit`` images (pixels back in ``uint8``) and labels on the way: no image is decoded twice.
    """

    def __init__(
        self, loader: Iterable[Any], prep: Preprocessing, limit: int | None = None
    ) -> None:
        self.loader = loader
        self.limit = sample_limit(prep.image_size) if limit is None else limit
        self._mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(prep.std).view(1, 3, 1, 1)
        self._pixels: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._kept = 0

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        self._pixels.clear()
        self._labels.clear()
        self._kept = 0
        for images, targets in self.loader:
            if self._kept < self.limit:
                take = min(self.limit - self._kept, len(images))
                pixels = images[:take].float() * self._std + self._mean
                scaled = pixels.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
                self._pixels.append(scaled.numpy())
                self._labels.append(np.asarray(targets[:take], dtype=np.int64))
                self._kept += take
            yield images, targets

    def sample(self) -> TestSample | None:
        """The images kept by the last pass; None when it saw none."""
        if not self._pixels:
            return None
        return TestSample(np.concatenate(self._pixels), np.concatenate(self._labels))


# --------------------------------------------------------------------------- ONNX Runtime


def make_session(
    model: bytes, *, threads: int, device: torch.device | None = None
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session for ``model``: ``threads`` intra-op threads (the server's thread
    setting) that sleep when idle, one inter-op thread, every graph optimisation. On a CUDA
    device, ONNX Runtime's CUDA provider when this install has it (``onnxruntime-gpu``), else
    :class:`BackendError`."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings go to stderr, not to logging
    # Idle intra-op threads sleep instead of spinning: in the server they share the cores with
    # the event loop and the decoding threads, which a spinning pool would starve.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device is not None and device.type == "cuda":
        available = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise BackendError(
                "the server runs on CUDA but this onnxruntime has no CUDA provider "
                f"(it has {available}); install onnxruntime-gpu or use --device cpu"
            )
        providers.insert(0, "CUDAExecutionProvider")
    return onnxruntime.InferenceSession(model, options, providers=providers)


class OnnxNetwork:
    """An ONNX Runtime session called like the network: an NCHW float batch in, logits out."""

    def __init__(self, session: onnxruntime.InferenceSession, *, quantized: bool = False) -> None:
        self.session = session
        self.quantized = quantized

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().cpu().float().contiguous().numpy()
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})
        return torch.from_numpy(logits)


Network = Callable[[torch.Tensor], torch.Tensor]


def probabilities(network: Network, images: torch.Tensor) -> np.ndarray:
    """Class probabilities of ``images``, :data:`_CHUNK` images per forward pass."""
    rows = []
    with torch.inference_mode():
        for start in range(0, len(images), _CHUNK):
            rows.append(softmax(network(images[start : start + _CHUNK]).cpu()).numpy())
    return np.concatenate(rows)


def quantize_int8(model: bytes, calibration: np.ndarray) -> bytes:
    """``model`` quantized to int8 with ONNX Runtime's static quantization (QDQ format,
    per-channel int8 weights, uint8 activations whose ranges come from ``calibration``, an NCHW
    float32 batch)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(
                [{INPUT_NAME: calibration[i : i + 8]} for i in range(0, len(calibration), 8)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(prefix="tire-quantize-") as tmp:
        folder = Path(tmp)
        (folder / "model.onnx").write_bytes(model)
        # Shape inference and graph fusions first, as ONNX Runtime's guide advises.
        quant_pre_process(
            str(folder / "model.onnx"), str(folder / "prepared.onnx"), skip_symbolic_shape=True
        )
        quantize_static(
            str(folder / "prepared.onnx"),
            str(folder / "int8.onnx"),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
        return (folder / "int8.onnx").read_bytes()


# --------------------------------------------------------------------------- choosing


@dataclass(frozen=True)
class BackendChoice:
    """What runs a version, and why: ``network`` is the ONNX Runtime network when it was
    chosen, None for PyTorch."""

    backend: Literal["torch", "onnxruntime"]
    reason: str
    network: OnnxNetwork | None = None

    @property
    def quantized(self) -> bool:
        return self.network is not None and self.network.quantized


def _runtime_errors() -> tuple[type[BaseException], ...]:
    """What ONNX Runtime raises for a model it cannot load or run (its own classes derive from
    ``Exception`` directly)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = (
        "Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
        "InvalidProtobuf", "NotImplemented", "InvalidGraph", "EPFail",
    )  # fmt: skip
    found = tuple(getattr(state, name) for name in names if hasattr(state, name))
    return (RuntimeError, ValueError, OSError, *found)


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == labels).mean())


def choose_backend(
    *,
    wanted: Backend,
    onnx_model: bytes | None,
    sample: TestSample | None,
    reference: Network,
    prep: Preprocessing,
    threads: int,
    device: torch.device,
    quantize: Quantize = "none",
    max_accuracy_drop: float = 0.01,
) -> BackendChoice:
    """Decide what runs a version (see the module's docstring).

    ``auto`` uses ONNX Runtime on the CPU whenever its outputs match (it is the faster of the
    two there: ``bench/serving_backends.py``) and PyTorch on CUDA. ``onnxruntime`` raises
    :class:`BackendError` where ``auto`` would fall back. ``reference`` is the PyTorch network.
    """
    if wanted == "torch":
        return BackendChoice("torch", "backend torch was asked for")
    forced = wanted == "onnxruntime"

    def fallback(why: str) -> BackendChoice:
        if forced:
            raise BackendError(f"backend onnxruntime was asked for, but {why}")
        log.warning("serving with torch: %s", why)
        return BackendChoice("torch", why)

    if device.type != "cpu" and not forced:
        return BackendChoice("torch", f"auto serves with torch on {device.type}")
    if onnx_model is None:
        return fallback("the version has no ONNX export (it was logged without one)")
    if sample is None or not len(sample):
        return fallback("the version carries no test images to check its ONNX export against")
    try:
        errors = _runtime_errors()
    except ImportError:
        return fallback("onnxruntime is not installed")
    images = sample.images(prep)
    count = len(images)
    try:
        session = make_session(onnx_model, threads=threads, device=device)
        network = OnnxNetwork(session)
        got = probabilities(network, images)
    except BackendError as error:
        return fallback(str(error))
    except errors as error:
        return fallback(f"onnxruntime cannot run the ONNX export: {error}")
    want = probabilities(reference, images.to(device))
    if got.shape != want.shape:
        return fallback(
            f"the ONNX export gives outputs of shape {list(got.shape)}, PyTorch {list(want.shape)}"
        )
    difference = float(np.abs(got - want).max())
    matches = difference <= PARITY_TOLERANCE  # False for NaN too
    rule = "; auto prefers it on the CPU" if not forced else ""

    refused = ""
    if quantize == "int8":
        torch_accuracy = _accuracy(want, sample.labels)
        began = time.perf_counter()
        try:
            quantized = OnnxNetwork(
                make_session(
                    quantize_int8(onnx_model, images[:CALIBRATION_IMAGES].numpy()),
                    threads=threads,
                    device=device,
                ),
                quantized=True,
            )
            int8_accuracy = _accuracy(probabilities(quantized, images), sample.labels)
        # Quantization is optional: whatever it raises (onnx's checker, the quantizer's own
        # asserts on graphs it does not know) leaves the float32 export to decide.
        except Exception as error:
            refused = f"int8 quantization failed ({type(error).__name__}: {error})"
        else:
            change = int8_accuracy - torch_accuracy
            measured = (
                f"int8 accuracy {int8_accuracy:.4f} on {count} test images, PyTorch's "
                f"{torch_accuracy:.4f} (change {change:+.4f}, allowed drop {max_accuracy_drop:g}; "
                f"quantized in {time.perf_counter() - began:.1f} s)"
            )
            log.info("%s", measured)
            if -change <= max_accuracy_drop:
                return BackendChoice("onnxruntime", measured + rule, quantized)
            refused = f"int8 refused: {measured}"
        if forced:
            raise BackendError(f"backend onnxruntime with int8 was asked for, but {refused}")
        log.warning("%s", refused)
        refused += "; "

    if not matches:
        return fallback(
            f"{refused}onnxruntime's probabilities differ from PyTorch's by up to "
            f"{difference:.2g} on {count} test images (allowed {PARITY_TOLERANCE:g})"
        )
    return BackendChoice(
        "onnxruntime",
        f"{refused}outputs match PyTorch's on {count} test images (max |difference| "
        f"{difference:.1e} <= {PARITY_TOLERANCE:g}){rule}",
        network,
    )

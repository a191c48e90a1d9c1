"""ONNX Runtime beside PyTorch: the export written with the model, the test sample kept on the
way through the test loader, the parity check at load and what happens when it fails."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tirelib import runtime
from tirelib.errors import ConfigurationError
from tirelib.models import IMAGENET_MEAN, IMAGENET_STD, get_model
from tirelib.preprocessing import Preprocessing
from tirelib.pyfunc import TireClassifier, write_model_files
from tirelib.runtime import ONNX_FILE, SAMPLE_FILE, SampleTap, TestSample
from tirelib.serve.config import load_serve_config
from tirelib.serve.model import ModelLoadError, ServedModel

pytestmark = pytest.mark.unit

CLASSES = ["good", "defective"]
SIZE = 32
PREP = Preprocessing(SIZE, IMAGENET_MEAN, IMAGENET_STD)


def network(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = get_model("cnn", num_classes=len(CLASSES)).eval()
    assert isinstance(model, nn.Sequential)
    with torch.no_grad():  # spread the probabilities, so that other weights show in them
        last(model).weight.mul_(50)
    return model


def last(model: nn.Sequential) -> nn.Linear:
    layer = model[-1]
    assert isinstance(layer, nn.Linear)
    return layer


def make_sample(net: nn.Module, count: int = 24) -> TestSample:
    """Random images labelled with ``net``'s own predictions: its accuracy on them is 1."""
    pixels = np.random.default_rng(1).integers(0, 256, (count, 3, SIZE, SIZE), dtype=np.uint8)
    sample = TestSample(pixels, np.zeros(count, dtype=np.int64))
    with torch.inference_mode():
        labels = net(sample.images(PREP)).argmax(1).numpy()
    return TestSample(pixels, labels.astype(np.int64))


@dataclass(frozen=True)
class Saved:
    folder: Path
    artifacts: dict[str, str]
    network: nn.Module

    def classifier(self) -> TireClassifier:
        model = TireClassifier()
        model.load(Path(self.artifacts["config"]), Path(self.artifacts["weights"]))
        return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """A cnn written as the logged model is: weights, config, ONNX export, test sample."""
    net = network(0)
    folder = tmp_path_factory.mktemp("model")
    artifacts = write_model_files(
        folder, net, model_type="cnn", classes=CLASSES, prep=PREP, sample=make_sample(net)
    )
    return Saved(folder, artifacts, net)


@pytest.fixture(scope="module")
def other_onnx(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The ONNX export of the network with its last layer negated: every answer flips."""
    other = network(0)
    with torch.no_grad():
        last(other).weight.neg_()
        last(other).bias.neg_()
    path = tmp_path_factory.mktemp("other") / ONNX_FILE
    assert runtime.export_onnx(other, SIZE, path)
    return path.read_bytes()


def build(
    model: TireClassifier, backend: runtime.Backend = "auto", **options: object
) -> ServedModel:
    """The served model; torch's rewrite for inference is left out (it has tests of its own)."""
    return ServedModel.build(
        model,
        version="1",
        uri="memory:/cnn",
        backend=backend,
        optimize=False,
        **options,  # type: ignore[arg-type]
    )


def torch_probabilities(net: nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(net(images), 1).numpy()


# --- at logging ------------------------------------------------------------------------------


def test_the_model_files_carry_the_onnx_export_and_the_test_sample(saved: Saved) -> None:
    assert Path(saved.artifacts["onnx"]) == saved.folder / ONNX_FILE
    assert Path(saved.artifacts["test_sample"]) == saved.folder / SAMPLE_FILE
    model = saved.classifier()
    assert model.onnx_model is not None and model.onnx_model[:2] == b"\x08\x08"  # a ModelProto
    assert model.test_sample is not None and len(model.test_sample) == 24
    assert not saved.network.training  # the export worked on a copy: the network is as it was


def test_a_failed_export_is_a_warning_and_the_model_has_no_onnx_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise torch.onnx.errors.UnsupportedOperatorError("aten::magic", 17, 17)

    monkeypatch.setattr(torch.onnx, "export", refuse)
    with caplog.at_level(logging.WARNING, logger="tirelib.runtime"):
        artifacts = write_model_files(
            tmp_path, network(0), model_type="cnn", classes=CLASSES, prep=PREP
        )
    assert "onnx" not in artifacts and not (tmp_path / ONNX_FILE).exists()
    assert "could not be exported to ONNX" in caplog.text and "aten::magic" in caplog.text
    model = TireClassifier()
    model.load(Path(artifacts["config"]), Path(artifacts["weights"]))
    served = build(model)
    assert served.backend == "torch"
    assert "no ONNX export" in served.backend_reason


def test_the_sample_tap_keeps_the_first_images_as_the_network_saw_them() -> None:
    torch.manual_seed(0)
    images = PREP.finish(torch.rand(10, 3, SIZE, SIZE))
    targets = torch.arange(10) % 2
    loader = [(images[:4], targets[:4]), (images[4:8], targets[4:8]), (images[8:], targets[8:])]
    tap = SampleTap(loader, PREP, limit=6)
    seen = [batch for batch, _ in tap]
    assert len(tap) == 3 and all(a is b for a, (b, _) in zip(seen, loader, strict=True))
    sample = tap.sample()
    assert sample is not None and len(sample) == 6
    assert sample.labels.tolist() == targets[:6].tolist()
    # uint8 pixels: within half a step of 1/255 of the original, once normalised again.
    step = 0.5 / 255 / min(IMAGENET_STD)
    assert float((sample.images(PREP) - images[:6]).abs().max()) <= step + 1e-6
    assert SampleTap([], PREP).sample() is None


def test_the_sample_is_bounded_in_images_and_bytes() -> None:
    assert runtime.sample_limit(32) == runtime.MAX_SAMPLE_IMAGES
    assert runtime.sample_limit(224) * 3 * 224 * 224 <= runtime.MAX_SAMPLE_BYTES
    assert runtime.sample_limit(224) >= 100
    assert runtime.sample_limit(10_000) == 1


# --- at load -------------------------------------------------------------------------------


def test_auto_serves_a_matching_export_with_onnxruntime(saved: Saved) -> None:
    served = build(saved.classifier())
    assert served.backend == "onnxruntime" and served.quantization == "none"
    assert "outputs match PyTorch's on 24 test images" in served.backend_reason
    for count in (1, 5):  # the batch axis is free
        images = PREP.finish(torch.rand(count, 3, SIZE, SIZE))
        got = served.predict_proba(images)
        assert got.shape == (count, 2) and got.dtype == np.float32
        assert np.abs(got - torch_probabilities(saved.network, images)).max() <= 1e-4
    forced = build(saved.classifier(), "onnxruntime")
    assert forced.backend == "onnxruntime"
    assert build(saved.classifier(), "torch").backend == "torch"


def test_a_mismatched_export_falls_back_to_torch_and_says_why(
    saved: Saved, other_onnx: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    model = saved.classifier()
    model.onnx_model = other_onnx
    with caplog.at_level(logging.WARNING, logger="tirelib.runtime"):
        served = build(model)
    assert served.backend == "torch"
    assert "differ from PyTorch's by up to" in served.backend_reason
    assert "on 24 test images (allowed 0.0001)" in served.backend_reason
    assert served.backend_reason in caplog.text
    images = PREP.finish(torch.rand(3, 3, SIZE, SIZE))
    want = torch_probabilities(saved.network, images)
    assert np.abs(served.predict_proba(images) - want).max() <= 1e-4
    with pytest.raises(ModelLoadError, match=r"backend onnxruntime was asked for, but .* differ"):
        build(model, "onnxruntime")


@pytest.mark.parametrize(
    ("missing", "reason"),
    [
        ("onnx_model", "the version has no ONNX export"),
        ("test_sample", "the version carries no test images to check its ONNX export"),
    ],
)
def test_a_version_without_export_or_sample_falls_back_and_forced_fails(
    saved: Saved, missing: str, reason: str
) -> None:
    model = saved.classifier()
    setattr(model, missing, None)
    served = build(model)
    assert served.backend == "torch" and reason in served.backend_reason
    with pytest.raises(ModelLoadError, match=f"backend onnxruntime was asked for, but {reason}"):
        build(model, "onnxruntime")


def test_an_export_onnxruntime_cannot_load_falls_back(saved: Saved) -> None:
    model = saved.classifier()
    model.onnx_model = b"these bytes are not an ONNX model"
    served = build(model)
    assert served.backend == "torch"
    assert "onnxruntime cannot run the ONNX export" in served.backend_reason


def test_int8_is_used_within_the_accuracy_bound_and_refused_beyond(
    saved: Saved, other_onnx: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = build(saved.classifier(), quantize="int8", max_accuracy_drop=1.0)
    assert (served.backend, served.quantization) == ("onnxruntime", "int8")
    assert "int8 accuracy" in served.backend_reason and "allowed drop 1" in served.backend_reason
    assert served.predict_proba(PREP.finish(torch.rand(2, 3, SIZE, SIZE))).shape == (2, 2)

    # An int8 model whose every answer flips: its accuracy drops from 1 (the labels are
    # PyTorch's answers) to 0, so the float32 export serves, and the reason says both.
    monkeypatch.setattr(runtime, "quantize_int8", lambda model, calibration: other_onnx)
    served = build(saved.classifier(), quantize="int8", max_accuracy_drop=0.0)
    assert (served.backend, served.quantization) == ("onnxruntime", "none")
    assert served.backend_reason.startswith("int8 refused: int8 accuracy")
    assert "int8 accuracy 0.0000 on 24 test images, PyTorch's 1.0000" in served.backend_reason
    assert "outputs match PyTorch's" in served.backend_reason
    with pytest.raises(ModelLoadError, match="with int8 was asked for, but int8 refused"):
        build(saved.classifier(), "onnxruntime", quantize="int8", max_accuracy_drop=0.0)


def test_the_reference_network_is_left_as_it_was(saved: Saved) -> None:
    model = saved.classifier()
    before = copy.deepcopy(model.network.state_dict())
    build(model)
    after = model.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_backend_settings_are_checked() -> None:
    assert load_serve_config().backend == "auto"
    assert load_serve_config(quantize="int8").quantize == "int8"
    with pytest.raises(ConfigurationError, match=r"TIRE_SERVE_BACKEND='tensorrt'.*'onnxruntime'"):
        load_serve_config(backend="tensorrt")
    with pytest.raises(ConfigurationError, match="needs backend auto or onnxruntime, not torch"):
        load_serve_config(backend="torch", quantize="int8")
    with pytest.raises(ConfigurationError, match="TIRE_SERVE_MAX_ACCURACY_DROP=2"):
        load_serve_config(max_accuracy_drop=2)

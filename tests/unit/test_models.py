"""The model registry: every architecture builds and trains a step; names are checked."""

from __future__ import annotations

import pytest
import torch

from tirelib.errors import ConfigurationError
from tirelib.models import count_parameters, get_model, get_spec, list_models, register_model

pytestmark = pytest.mark.unit

EXPECTED = {
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "resnet18",
    "resnet50",
    "tinyvgg",
    "cnn",
    "cnn128",
}


def test_the_registry_has_the_eight_architectures() -> None:
    assert set(list_models()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forward_and_backward_on_a_tiny_input(name: str) -> None:
    torch.manual_seed(0)
    model = get_model(name, num_classes=2)
    model.train()
    images = torch.rand(2, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (2, 2)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads if g is not None)
    assert count_parameters(model) > 1000


def test_cnn128_at_128_px_does_the_work_of_cnn_at_64_px() -> None:
    """The strided first convolution sees four times the pixels for the same arithmetic."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(name: str) -> int:
        size = get_spec(name).image_size
        with FlopCounterMode(display=False) as counter:
            get_model(name).eval()(torch.rand(1, 3, size, size))
        return counter.get_total_flops()

    assert get_spec("cnn128").image_size == 2 * get_spec("cnn").image_size
    assert flops("cnn128") == pytest.approx(flops("cnn"), rel=0.01)


def test_cnn_keeps_the_layout_of_the_weights_logged_before() -> None:
    """Logged models are rebuilt by name and given their state dict: the names and shapes of
    ``cnn``'s weights must not change."""
    shapes = {k: tuple(v.shape) for k, v in get_model("cnn").state_dict().items()}
    assert shapes["0.weight"] == (32, 3, 3, 3)
    assert shapes["19.weight"] == (2, 128)
    assert len(shapes) == 26
    # cnn128: the same convolutions, a head over the average and the maximum of each channel.
    wide = {k: tuple(v.shape) for k, v in get_model("cnn128").state_dict().items()}
    assert wide.pop("18.weight") == (2, 256)
    assert {k: v for k, v in shapes.items() if not k.startswith("19.")} == {
        k: v for k, v in wide.items() if not k.startswith("18.")
    }


def test_the_earlier_name_efficientnet_means_b0() -> None:
    assert get_spec("efficientnet").name == "efficientnet_b0"
    assert get_spec("EfficientNet_B0").image_size == 224


def test_an_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigurationError, match="choose one of: cnn, cnn128, efficientnet_b0"):
        get_model("vgg19")


def test_duplicates_are_refused() -> None:
    spec = get_spec("cnn")
    with pytest.raises(ValueError, match="already registered"):
        register_model(spec)(lambda **_: torch.nn.Identity())


def test_own_models_have_no_pretrained_weights() -> None:
    with pytest.raises(ConfigurationError, match="from scratch"):
        get_model("cnn", pretrained=True)


def test_pretrained_weights_that_cannot_be_fetched_fail_loudly(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached there
    import torch.hub

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConfigurationError, match="could not fetch the pretrained ImageNet weights"):
        get_model("resnet18", pretrained=True)


def test_pretrained_replaces_the_head(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """With the weights file in the cache, the body is loaded and the head has num_classes."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    reference = torchvision.models.resnet18(weights=None)
    target = tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), target)
    model = get_model("resnet18", num_classes=3, pretrained=True)
    assert model.fc.out_features == 3
    assert torch.equal(model.conv1.weight, reference.conv1.weight)

"""One registry of model builders, keyed by name, in the manner of torchvision's ``get_model``.

Every builder takes keyword-only arguments (``num_classes``, ``pretrained``) and every entry
carries its :class:`ModelSpec`: default input size and the normalisation its weights expect, so
the serving transform is built from the same numbers as the training one.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tirelib.errors import ConfigurationError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """What a model needs to know about its input."""

    name: str
    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    torchvision_name: str | None = None  # set for architectures built by torchvision


Builder = Callable[..., "nn.Module"]
_BUILDERS: dict[str, tuple[ModelSpec, Builder]] = {}
# The earlier system's names.
ALIASES = {"efficientnet": "efficientnet_b0"}


def register_model(spec: ModelSpec) -> Callable[[Builder], Builder]:
    """Register ``builder`` under ``spec.name``; a name can be registered once."""

    def wrap(builder: Builder) -> Builder:
        if spec.name in _BUILDERS:
            raise ValueError(f"a model named {spec.name!r} is already registered")
        _BUILDERS[spec.name] = (spec, builder)
        return builder

    return wrap


def list_models() -> list[str]:
    return sorted(_BUILDERS)


def resolve_name(name: str) -> str:
    """The registry name for ``name`` (aliases included), or a ConfigurationError listing all."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in _BUILDERS:
        raise ConfigurationError(
            f"unknown model type {name!r}; choose one of: {', '.join(list_models())}"
            f" (aliases: {', '.join(f'{a}={t}' for a, t in ALIASES.items())})"
        )
    return key


def get_spec(name: str) -> ModelSpec:
    return _BUILDERS[resolve_name(name)][0]


def get_model(name: str, *, num_classes: int = 2, pretrained: bool = False) -> nn.Module:
    """Build model ``name`` with a head of ``num_classes`` outputs.

    ``pretrained`` loads torchvision's ImageNet weights and replaces the head; when they cannot
    be fetched it fails loudly rather than training from scratch without saying so.
    """
    if num_classes < 2:
        raise ConfigurationError(f"num_classes must be at least 2, got {num_classes}")
    _, builder = _BUILDERS[resolve_name(name)]
    return builder(num_classes=num_classes, pretrained=pretrained)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- torchvision architectures -------------------------------------------------------------


def _torchvision(spec: ModelSpec, num_classes: int, pretrained: bool) -> nn.Module:
    import torchvision
    from torch import nn

    assert spec.torchvision_name is not None
    if not pretrained:
        return torchvision.models.get_model(
            spec.torchvision_name, weights=None, num_classes=num_classes
        )
    weights = torchvision.models.get_model_weights(spec.torchvision_name).DEFAULT
    try:
        model = torchvision.models.get_model(spec.torchvision_name, weights=weights)
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        raise ConfigurationError(
            f"could not fetch the pretrained ImageNet weights {weights} for {spec.name}: {error}. "
            "Train without --pretrained, or put the weights file in $TORCH_HOME/hub/checkpoints."
        ) from error
    # Replace the classification head; keep the pretrained body.
    if isinstance(getattr(model, "fc", None), nn.Linear):
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:
        head = model.classifier[-1]
        assert isinstance(head, nn.Linear)
        model.classifier[-1] = nn.Linear(head.in_features, num_classes)
    return model


def _register_torchvision(name: str, image_size: int) -> None:
    spec = ModelSpec(name, image_size, torchvision_name=name)

    def build(*, num_classes: int, pretrained: bool) -> nn.Module:
        return _torchvision(spec, num_classes, pretrained)

    build.__name__ = name
    register_model(spec)(build)


for _name, _size in [
    ("efficientnet_b0", 224),
    ("efficientnet_b1", 240),
    ("efficientnet_b2", 260),
    ("resnet18", 224),
    ("resnet50", 224),
]:
    _register_torchvision(_name, _size)


# --- the project's own small networks ------------------------------------------------------


def _torchvision_models() -> list[str]:
    return [name for name, (spec, _) in sorted(_BUILDERS.items()) if spec.torchvision_name]


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ConfigurationError(
            f"{name} has no pretrained weights; train it from scratch (drop --pretrained) "
            f"or choose a torchvision model: {', '.join(_torchvision_models())}"
        )


@register_model(ModelSpec("tinyvgg", 64))
def tinyvgg(*, num_classes: int, pretrained: bool = False, hidden: int = 10) -> nn.Module:
    """TinyVGG (CNN Explainer's network): two blocks of two 3x3 convolutions, a linear head."""
    from torch import nn

    _no_pretrained("tinyvgg", pretrained)

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )

    return nn.Sequential(
        block(3, hidden),
        block(hidden, hidden),
        nn.AdaptiveAvgPool2d(8),
        nn.Flatten(),
        nn.Linear(hidden * 8 * 8, num_classes),
    )


@functools.cache
def _avg_max_pool() -> type[nn.Module]:
    """The class of a global average and max pooling, side by side (built on first use, so
    this module imports no torch)."""
    import torch
    from torch import nn

    class AvgMaxPool(nn.Module):
        """``[N, C, H, W]`` to ``[N, 2C]``: each channel's mean, then its maximum. The maximum
        keeps the response to a small defect that the mean over the whole tire dilutes."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)

    return AvgMaxPool


def _small_cnn(num_classes: int, dropout: float, *, stem_stride: int, max_pool: bool) -> nn.Module:
    """Four conv-BN-ReLU-pool blocks (32, 64, 128, 128 channels), global pooling, dropout and
    a linear head; the first convolution strides by ``stem_stride``, and ``max_pool`` adds the
    global maximum to the global average."""
    from torch import nn

    layers: list[nn.Module] = []
    channels = [3, 32, 64, 128, 128]
    for index, (cin, cout) in enumerate(itertools.pairwise(channels)):
        stride = stem_stride if index == 0 else 1
        layers += [
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
    pool = [_avg_max_pool()()] if max_pool else [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    features = channels[-1] * (2 if max_pool else 1)
    return nn.Sequential(*layers, *pool, nn.Dropout(dropout), nn.Linear(features, num_classes))


@register_model(ModelSpec("cnn", 64))
def cnn(*, num_classes: int, pretrained: bool = False, dropout: float = 0.3) -> nn.Module:
    """A small CNN: four conv-BN-ReLU-pool blocks, global pooling, dropout, a linear head."""
    _no_pretrained("cnn", pretrained)
    return _small_cnn(num_classes, dropout, stem_stride=1, max_pool=False)


@register_model(ModelSpec("cnn128", 128))
def cnn128(*, num_classes: int, pretrained: bool = False, dropout: float = 0.3) -> nn.Module:
    """``cnn`` for 128 px images, the default: a strided first convolution, and the global
    maximum pooled beside the average.

    The blocks work on the sizes they have in ``cnn`` at 64 px, at about the same cost per
    image, but the first layer sees every pixel and learns what to keep, where a resize to
    64 px would blur a crack one or two pixels wide into the rubber around it; the maximum
    lets one strong local response (a defect) decide. On the demo's tires it is the more
    accurate of the two and learns in fewer epochs (``bench/recipe.py``).
    """
    _no_pretrained("cnn128", pretrained)
    return _small_cnn(num_classes, dropout, stem_stride=2, max_pool=True)

"""Image preprocessing shared by training, evaluation, the logged model and the server.

One :class:`Preprocessing` turns an image, given as encoded bytes, a PIL image or an HWC array,
into the normalised tensor the network expects. The evaluation transform *is* this object, and
the logged model carries its numbers, so serving cannot drift from training.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.nn import functional

from tirelib.errors import DataError, ImageTooLargeError

# Guard against decompression bombs and absurd inputs before any pixel is decoded.
MAX_IMAGE_PIXELS = 4096 * 4096
# Pillow's modes of 16-bit grayscale (PNG, TIFF): values up to 65535, which convert("RGB") clips
# at 255. Pillow reads 16-bit RGB(A) PNGs as 8-bit RGB(A) already, correctly scaled.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_NOT_AN_IMAGE = "not an image: the bytes are no known image format (JPEG, PNG, …)"


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """The size an image's header declares, read without Pillow's decompression bomb check
    (which refuses to open the image at all): only for saying what was refused."""
    Image.init()
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        accepted = accept is None or accept(data[:16])
        if not accepted or isinstance(accepted, str):  # a str: Pillow's warning, not a match
            continue
        try:
            with factory(io.BytesIO(data), "") as image:
                return image.size
        except (OSError, SyntaxError, ValueError, IndexError, TypeError):
            continue
    return None


def open_image(
    data: bytes, *, draft: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[Image.Image, tuple[int, int]]:
    """The image in ``data`` opened lazily (its header read, no pixel decoded), and the size its
    header declares.

    With ``draft``, a JPEG is set to decode at the smallest of its reduced scales (1/2, 1/4, 1/8)
    that keeps both sides at least ``draft`` pixels; ``image.size`` is then the size it decodes
    at, a fraction of the declared one. Raises :class:`DataError` when the bytes are no image and
    :class:`ImageTooLargeError` for a decompression bomb (a header declaring more pixels than
    Pillow decodes), naming the declared size and ``max_pixels``, the most allowed.
    """
    if not data:
        raise DataError("empty image: zero bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        size = _declared_size(data)
        what = f"{size[0]}x{size[1]} pixels ({size[0] * size[1]:,})" if size else str(error)
        raise ImageTooLargeError(
            f"the image's header declares {what}, over the budget of {max_pixels:,} pixels "
            "per image; it was not decoded"
        ) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(_NOT_AN_IMAGE) from error
    declared = image.size
    if draft is not None and image.format == "JPEG":
        image.draft("RGB", (draft, draft))
    return image, declared


def load_image(image: Image.Image) -> Image.Image:
    """An image from :func:`open_image`, its pixels decoded now; a :class:`DataError` when the
    bytes do not decode."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"image could not be decoded: {error}") from error
    return image


@dataclass(frozen=True)
class Preprocessing:
    """Scale to [0, 1], resize to a square ``image_size`` (bilinear, antialiased), normalise."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Preprocessing:
        return cls(int(value["image_size"]), tuple(value["mean"]), tuple(value["std"]))

    def finish(self, batch: torch.Tensor) -> torch.Tensor:
        """``batch`` is NCHW floats in [0, 1]: resize, then normalise.

        A batch already ``image_size`` pixels square is not resized: the antialiased bilinear
        resize to the same size is the identity, to the bit.
        """
        if tuple(batch.shape[-2:]) != (self.image_size, self.image_size):
            batch = functional.interpolate(
                batch,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        mean = torch.tensor(self.mean, dtype=batch.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=batch.dtype).view(1, 3, 1, 1)
        return (batch - mean) / std

    def finish_hwc(self, images: np.ndarray) -> torch.Tensor:
        """An NHWC batch of RGB images, uint8 in [0, 255] or float32 in [0, 1], resized and
        normalised: what :meth:`from_pil` and :meth:`from_array` give, for many images at once,
        as one contiguous NCHW tensor.

        The scaling and normalisation run in numpy, in the calling thread: torch would spread
        these small element-wise passes over its thread pool, which waits for CPUs that the
        forward pass (or anything else) holds. The numbers are torch's, to the bit; the resize,
        when one is needed, is torch's own.
        """
        eight_bit = images.dtype == np.uint8
        if images.shape[1:3] != (self.image_size, self.image_size):
            scaled = np.divide(images, 255.0, dtype=np.float32) if eight_bit else images
            resized = functional.interpolate(
                torch.from_numpy(np.require(scaled, np.float32, "W")).permute(0, 3, 1, 2),
                size=(self.image_size, self.image_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            pixels = np.ascontiguousarray(resized.numpy())
        elif eight_bit:  # scaled as float32 into NCHW order, in one pass
            pixels = np.divide(images.transpose(0, 3, 1, 2), 255.0, dtype=np.float32, order="C")
        else:
            pixels = np.array(images.transpose(0, 3, 1, 2), dtype=np.float32, order="C")
        pixels -= np.asarray(self.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        pixels /= np.asarray(self.std, dtype=np.float32).reshape(1, 3, 1, 1)
        return torch.from_numpy(pixels)

    def _finish(self, chw: torch.Tensor) -> torch.Tensor:
        """``chw`` is float in [0, 1]: resize, then normalise."""
        return self.finish(chw.unsqueeze(0)).squeeze(0)

    def from_pil(self, image: Image.Image) -> torch.Tensor:
        if image.mode in SIXTEEN_BIT_MODES:
            # 16-bit grayscale: scaled to [0, 1] by its own range, not clipped at 255.
            gray = np.asarray(image, dtype=np.float32) / 65535.0
            chw = torch.from_numpy(np.clip(gray, 0.0, 1.0, out=gray)).expand(3, -1, -1)
            return self._finish(chw)
        rgb = image.convert("RGB")
        array = np.asarray(rgb, dtype=np.uint8)
        chw = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        return self._finish(chw)

    __call__ = from_pil

    def from_bytes(self, data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
        """Decode a JPEG/PNG/... image; a clear DataError when the bytes are not one.

        A large JPEG decodes at reduced size (see :func:`open_image`); an image that decodes to
        more than ``max_pixels`` is refused with :class:`ImageTooLargeError` before decoding.
        """
        image, declared = open_image(data, draft=self.image_size, max_pixels=max_pixels)
        with image:
            if image.width * image.height > max_pixels:
                raise ImageTooLargeError(
                    f"image of {declared[0]}x{declared[1]} pixels is too large "
                    f"(decodes to {image.width * image.height:,} pixels, at most "
                    f"{max_pixels:,} are allowed)"
                )
            return self.decode(image)

    def decode(self, image: Image.Image) -> torch.Tensor:
        """An image from :func:`open_image`, decoded now, resized and normalised."""
        return self.from_pil(load_image(image))

    def from_array(self, value: Any) -> torch.Tensor:
        """An HWC image (nested lists or an array) of floats in [0, 1], any height and width.

        A 2-D array is a grayscale image; 1 or 4 channels are accepted (alpha is dropped).
        """
        try:
            array = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise DataError(
                "an image must be an HWC array of numbers in [0, 1] "
                "(height x width x 3 channels), ragged or non-numeric values are not allowed"
            ) from error
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise DataError(
                f"an image must have shape [height, width, 3] (HWC), got {list(array.shape)}"
            )
        height, width = array.shape[:2]
        if height < 1 or width < 1:
            raise DataError(f"an image must not be empty, got shape {list(array.shape)}")
        if height * width > MAX_IMAGE_PIXELS:
            raise DataError(
                f"image of {width}x{height} pixels is too large (at most {MAX_IMAGE_PIXELS} pixels)"
            )
        if not np.isfinite(array).all():
            raise DataError("an image contains NaN or infinite values; use floats in [0, 1]")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise DataError(
                f"image values must lie in [0, 1], got the range [{low:g}, {high:g}] "
                "(scale 8-bit pixels by 1/255)"
            )
        if array.shape[2] == 1:
            array = np.repeat(array, 3, axis=2)
        elif array.shape[2] == 4:
            array = array[:, :, :3]
        chw = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        return self._finish(chw)

    def batch(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        if not tensors:
            raise DataError("no images given: the batch is empty")
        return torch.stack(list(tensors))


AUGMENTATIONS: tuple[str, ...] = ("dihedral", "crop")


class RandomTranspose(torch.nn.Module):
    """Swap height and width with probability ``p``: with both flips, all eight symmetries of
    the square (the dihedral group), each exact, with no interpolation."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.transpose(-1, -2) if float(torch.rand(())) < self.p else image


def train_transform(
    prep: Preprocessing, *, augment: bool = True, policy: str = "dihedral"
) -> Callable[[Image.Image], torch.Tensor]:
    """Training transform: a random view of the image, then what :class:`Preprocessing` does.

    ``dihedral`` (the default): resized as for evaluation, then one of the square's eight
    symmetries (flips and quarter turns, exact for a round part photographed from the side),
    a shift of up to 1/32 of the side and brightness/contrast jitter; nothing is cut off or
    blurred, so a small defect stays in the picture. ``crop``: a random resized crop (80-100%
    of the area), flips, a rotation of up to 15 degrees and colour jitter. Without ``augment``
    it is the evaluation transform itself.
    """
    if not augment:
        return prep
    from torchvision.transforms import v2

    size = prep.image_size
    if policy == "dihedral":
        view: list[Any] = [
            v2.Resize((size, size), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            RandomTranspose(),
            v2.RandomCrop(size, padding=max(size // 32, 1), padding_mode="reflect"),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
        ]
    elif policy == "crop":
        view = [
            v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomRotation(15),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1),
        ]
    else:
        raise ValueError(f"unknown augmentation {policy!r}; choose one of {AUGMENTATIONS}")
    return v2.Compose(
        [
            v2.PILToTensor(),
            *view,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(prep.mean), std=list(prep.std)),
        ]
    )


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities in float32 (stable under AMP's float16 logits)."""
    return torch.softmax(logits.float(), dim=1)


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """:func:`softmax` of a float32 ``[N, classes]`` array, in numpy (a new array)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted

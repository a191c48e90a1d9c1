"""A request's images decoded within a pixel budget, so one request's cost is bounded.

Decoding is where a request's cost lies: a 4096 x 4096 PNG of a few megabytes becomes 50 MB of
pixels, and four times that as floats. So the images of a request are decoded in two steps, and a
request that is too large is refused before any pixel is decoded:

1. :func:`admit` reads each encoded image's header (Pillow opens lazily: no pixel yet), sets a
   large JPEG to decode at reduced size (the smallest of JPEG's 1/2, 1/4 and 1/8 scales that still
   covers the model's input size), and checks the pixels each image will decode to against the
   :class:`PixelBudget`, per image and per request; both derive from the model's input size. A
   float image counts its height x width. Over budget is an
   :class:`~tirelib.errors.ImageTooLargeError` (the routes answer 413); a decompression bomb (a
   header declaring 50,000 x 50,000 pixels) is one too.
2. :meth:`Admitted.decode` decodes the encoded images (in a :class:`DecodePool`'s threads when
   they are many pixels) and preprocesses the request's images in batches of one size: scaled,
   checked (floats: finite and in [0, 1]), resized and normalised together.

Between the two, :class:`DecodeGate` bounds the pixels being decoded at once in the whole server,
so concurrent large requests cannot stack up memory: a request that does not fit waits its turn
(a small one never waits), and once the waiting requests hold more than the queue allows, a
request is refused with :class:`DecodeQueueFull` (the routes answer 503 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from tirelib.errors import DataError, ImageTooLargeError
from tirelib.preprocessing import (
    MAX_IMAGE_PIXELS,
    SIXTEEN_BIT_MODES,
    Preprocessing,
    load_image,
    open_image,
)
from tirelib.serve.config import ServeConfig
from tirelib.serve.inputs import Limits, Located, RawImage, _check_sides, pixel_array, to_tensor

SMALL_SHARE = 1 / 16
"""A request holding at most this share of one image's budget never waits at the gate."""
RETRY_AFTER_S = 1
"""What a 503 from a full decode queue tells the client to wait, seconds."""
PARALLEL_PIXELS = 512 * 512
"""Encoded pixels a request holds at least for its images to be decoded in several threads."""


@dataclass(frozen=True)
class PixelBudget:
    """Most decoded pixels in one image and in one request (all its images together)."""

    image: int
    request: int


@dataclass(frozen=True)
class PixelLimits:
    """The budget settings of :class:`~tirelib.serve.config.ServeConfig`, for any model."""

    image_factor: float
    min_image: int
    request_images: int
    decode_images: int
    queue_images: int
    max_side: int

    @classmethod
    def from_config(cls, config: ServeConfig) -> PixelLimits:
        return cls(
            image_factor=config.image_budget_factor,
            min_image=config.min_image_budget,
            request_images=config.request_budget_images,
            decode_images=config.decode_budget_images,
            queue_images=config.decode_queue_images,
            max_side=config.max_image_side,
        )

    def budget(self, input_size: int) -> PixelBudget:
        """The budget for a model whose input is ``input_size`` pixels square.

        ``image_factor`` times the input area, never below ``min_image``, never above what the
        side limit allows (``max_side`` squared) nor what the preprocessing decodes at most.
        """
        derived = max(self.min_image, round(self.image_factor * input_size * input_size))
        image = min(derived, self.max_side * self.max_side, MAX_IMAGE_PIXELS)
        return PixelBudget(image=image, request=image * self.request_images)


@dataclass(frozen=True)
class Cost:
    """What one image will decode to, and why (for the message when it is over budget)."""

    where: str
    width: int
    height: int
    what: str = "an image"

    @property
    def pixels(self) -> int:
        return self.width * self.height


def check_pixels(costs: Sequence[Cost], budget: PixelBudget) -> int:
    """The request's decoded pixels; :class:`ImageTooLargeError` when over ``budget``.

    Encoded and float images alike: every route checks its images here before decoding them.
    """
    total = 0
    for cost in costs:
        if cost.pixels > budget.image:
            raise ImageTooLargeError(
                f"{cost.where}: {cost.what} of {cost.width}x{cost.height} pixels "
                f"({cost.pixels:,}) is over the budget of {budget.image:,} pixels per image; "
                "send it smaller"
            )
        total += cost.pixels
    if total > budget.request:
        raise ImageTooLargeError(
            f"the request's {len(costs)} images hold {total:,} pixels, over the budget of "
            f"{budget.request:,} pixels per request; split the request"
        )
    return total


@dataclass
class _Item:
    where: str
    image: Image.Image | RawImage  # opened (encoded bytes) or as sent (floats)

    @property
    def format(self) -> str | None:
        """The encoded image's format as Pillow names it (``JPEG``); None for a float image."""
        return (self.image.format or "") if isinstance(self.image, Image.Image) else None


@dataclass
class Admitted:
    """A request's images, within budget and not yet decoded (:meth:`decode` does that)."""

    prep: Preprocessing
    limits: Limits
    pixels: int
    items: list[_Item] = field(default_factory=list)

    def decode(self, pool: DecodePool | None = None) -> torch.Tensor:
        """The NCHW batch, prepared as the model was trained (heavy: run it off the loop).

        Encoded images are decoded in ``pool``'s threads; images of the same size are resized
        and normalised together, as one batch, and float images are checked for range and
        finiteness that way too. An image this does not fit (16-bit grayscale, 1 or 4 channels,
        a bad value) goes through the one-image path, which also names what is wrong; the first
        bad image of the request, in order, is the error.
        """
        pixels: dict[int, np.ndarray] = {}  # HWC: uint8 RGB, or float32 in [0, 1]
        finished: dict[int, torch.Tensor] = {}  # through the one-image path
        batches: list[tuple[list[int], torch.Tensor]] = []
        errors: dict[int, DataError] = {}
        encoded = [i for i, item in enumerate(self.items) if isinstance(item.image, Image.Image)]
        size = sum(_pixels(self.items[i].image) for i in encoded)
        for part in (pool or _IN_PLACE).map(self._decode_some, encoded, size):
            for index, result in part:
                if isinstance(result, DataError):
                    errors[index] = result
                elif isinstance(result, torch.Tensor):
                    finished[index] = result
                else:
                    pixels[index] = result
        for index, item in enumerate(self.items):
            sent = item.image
            if isinstance(sent, Image.Image):
                continue
            image = sent
            if isinstance(sent, list):  # read by the general path: nested lists
                try:
                    image = pixel_array(sent)
                except DataError:
                    self._one(index, sent, finished, errors)
                    continue
            array = _float_candidate(image, self.limits)
            if array is None:
                self._one(index, image, finished, errors)
            else:
                pixels[index] = array
        for group in _groups(pixels):
            arrays = [pixels[i] for i in group]
            stacked = _stacked(arrays)
            if stacked.dtype == np.float32 and not _in_range(stacked):
                for index in group:  # the one-image path finds the bad ones and names them
                    self._one(index, pixels[index], finished, errors)
                continue
            batches.append((group, self.prep.finish_hwc(stacked)))
        if errors:
            raise errors[min(errors)]
        if len(batches) == 1 and len(batches[0][0]) == len(self.items):
            return batches[0][1]  # one size, the common case: already in order
        if not self.items:
            return self.prep.batch([])  # "no images given"
        size = self.prep.image_size
        out = np.empty((len(self.items), 3, size, size), dtype=np.float32)
        for group, batch in batches:
            out[group] = batch.numpy()
        for index, tensor in finished.items():
            out[index] = tensor.numpy()
        return torch.from_numpy(out)

    def _one(
        self,
        index: int,
        image: RawImage,
        finished: dict[int, torch.Tensor],
        errors: dict[int, DataError],
    ) -> None:
        """A float image through the one-image path: its tensor, or its error."""
        try:
            finished[index] = to_tensor(self.prep, image, self.limits, self.items[index].where)
        except DataError as error:
            errors[index] = error

    def _decode_some(
        self, indices: Sequence[int]
    ) -> list[tuple[int, np.ndarray | torch.Tensor | DataError]]:
        """Decode the encoded images at ``indices`` (one thread's share): each one's RGB
        pixels, its finished tensor (16-bit grayscale) or its error."""
        results: list[tuple[int, np.ndarray | torch.Tensor | DataError]] = []
        for index in indices:
            item = self.items[index]
            assert isinstance(item.image, Image.Image)
            try:
                image = load_image(item.image)
                if image.mode in SIXTEEN_BIT_MODES:
                    results.append((index, self.prep.from_pil(image)))
                else:
                    rgb = image if image.mode == "RGB" else image.convert("RGB")
                    results.append((index, np.asarray(rgb, dtype=np.uint8)))
            except DataError as error:
                results.append((index, DataError(f"{item.where}: {error}")))
        return results

    def close(self) -> None:
        for item in self.items:
            if isinstance(item.image, Image.Image):
                item.image.close()


Share = Callable[[Sequence[int]], list[Any]]


class DecodePool:
    """Threads that decode a request's encoded images side by side (Pillow's decoders let go
    of the GIL). Images are dealt out in one share per thread, and only when the request holds
    at least :data:`PARALLEL_PIXELS` encoded pixels: a few small images decode faster than they
    are handed to other threads."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tire-decode")

    def map(self, share: Share, indices: list[int], pixels: int = 0) -> Iterator[list[Any]]:
        if self.threads < 2 or len(indices) < 2 or pixels < PARALLEL_PIXELS:
            return _IN_PLACE.map(share, indices)
        count = min(self.threads, len(indices))
        return self._executor.map(share, [indices[k::count] for k in range(count)])

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class _InPlace:
    """Every share decoded in the calling thread."""

    def map(self, share: Share, indices: list[int], pixels: int = 0) -> Iterator[list[Any]]:
        return iter([share(indices)] if indices else [])


_IN_PLACE = _InPlace()


def _float_candidate(image: RawImage, limits: Limits) -> np.ndarray | None:
    """A float image that the batch path takes as it is: an ``[H, W, 3]`` array within the
    side limits (values are checked with its batch); None for the one-image path."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        return None
    height, width = image.shape[:2]
    if not (0 < height <= limits.max_image_side and 0 < width <= limits.max_image_side):
        return None
    if height * width > MAX_IMAGE_PIXELS:
        return None
    return np.asarray(image, dtype=np.float32)


def _pixels(image: Image.Image | RawImage) -> int:
    return image.width * image.height if isinstance(image, Image.Image) else 0


def _groups(pixels: dict[int, np.ndarray]) -> list[list[int]]:
    """The indices of ``pixels`` by size and type, each group in order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index in sorted(pixels):
        array = pixels[index]
        groups.setdefault((*array.shape, array.dtype.num), []).append(index)
    return list(groups.values())


def _stacked(arrays: list[np.ndarray]) -> np.ndarray:
    """Same-sized images as one batch: the array they are views of, when they are its rows in
    order (a tensor sent whole, read into one buffer), else a stacked copy. The batch is only
    read afterwards."""
    first = arrays[0]
    base = first.base
    if (
        isinstance(base, np.ndarray)
        and base.ndim == first.ndim + 1
        and len(base) == len(arrays)
        and base.dtype == first.dtype
        and base.strides[1:] == first.strides
    ):
        start = base.__array_interface__["data"][0]
        step = base.strides[0]
        if all(
            array.base is base
            and array.strides == first.strides
            and array.__array_interface__["data"][0] == start + index * step
            for index, array in enumerate(arrays)
        ):
            return base
    return first[None] if len(arrays) == 1 else np.stack(arrays)


def _in_range(images: np.ndarray) -> bool:
    """Every value finite and in [0, 1] (NaN fails both comparisons)."""
    return bool(images.size) and bool(float(images.min()) >= 0.0 and float(images.max()) <= 1.0)


def _float_size(image: RawImage) -> tuple[int, int]:
    """Height and width of a float image as sent, without converting it (shape errors later)."""
    if isinstance(image, np.ndarray):
        shape = image.shape
        return (int(shape[0]), int(shape[1])) if image.ndim >= 2 else (1, int(image.size))
    if isinstance(image, list) and image:
        first = image[0]
        return len(image), len(first) if isinstance(first, list) else 1
    return 0, 0


def admit(
    prep: Preprocessing, images: Sequence[Located], budget: PixelBudget, limits: Limits
) -> Admitted:
    """Check ``images`` against the budget from their headers and shapes; decode nothing.

    Raises :class:`DataError` (not an image, too many pixels on a side) or
    :class:`ImageTooLargeError` (over the pixel budget, a decompression bomb), naming the image.
    """
    admitted = Admitted(prep, limits, 0)
    costs = []
    try:
        for where, image in images:
            if isinstance(image, bytes):
                try:
                    opened, declared = open_image(
                        image, draft=prep.image_size, max_pixels=budget.image
                    )
                    admitted.items.append(_Item(where, opened))
                    _check_sides(declared[1], declared[0], limits)
                except DataError as error:
                    raise type(error)(f"{where}: {error}") from error
                what = "an image"
                if declared != opened.size:
                    what = f"a {declared[0]}x{declared[1]} JPEG decoded at reduced size"
                costs.append(Cost(where, *opened.size, what=what))
            else:
                admitted.items.append(_Item(where, image))
                height, width = _float_size(image)
                costs.append(Cost(where, width, height, what="a float image"))
        admitted.pixels = check_pixels(costs, budget)
    except BaseException:
        admitted.close()
        raise
    return admitted


class DecodeQueueFull(Exception):
    """Too many pixels already wait to be decoded; the client should retry shortly."""


class DecodeGate:
    """Bounds the pixels being decoded at once in the server, in shares of one image's budget.

    ``capacity`` shares decode at once (a request larger than that alone runs when nothing else
    does); a request that does not fit waits, any waiting request that fits goes first, and a
    request holding at most :data:`SMALL_SHARE` never waits. When the waiting requests already
    hold ``queue`` shares, :meth:`hold` raises :class:`DecodeQueueFull`. Used on the event loop.
    """

    def __init__(self, capacity: float, queue: float) -> None:
        self.capacity = capacity
        self.queue = queue
        self.running = 0.0
        self.waiting = 0.0
        self._changed: asyncio.Condition | None = None

    def _fits(self, share: float) -> bool:
        return self.running == 0 or self.running + share <= self.capacity

    @contextlib.asynccontextmanager
    async def hold(self, share: float) -> AsyncIterator[None]:
        """Hold ``share`` of the decode budget while the block runs; wait for it if needed."""
        if share <= SMALL_SHARE:
            yield
            return
        if self._changed is None:
            self._changed = asyncio.Condition()
        changed = self._changed
        async with changed:
            if not self._fits(share):
                if self.waiting + share > self.queue:
                    raise DecodeQueueFull(
                        f"the server is decoding {self.running:g} and queueing {self.waiting:g} "
                        f"images' worth of pixels (at most {self.queue:g} may wait); retry in "
                        f"{RETRY_AFTER_S} s"
                    )
                self.waiting += share
                try:
                    await changed.wait_for(lambda: self._fits(share))
                finally:
                    self.waiting -= share
            self.running += share
        try:
            yield
        finally:
            async with changed:
                self.running -= share
                changed.notify_all()

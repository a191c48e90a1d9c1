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
2. :meth:`Admitted.decode` decodes and preprocesses the images, one at a time.

Between the two, :class:`DecodeGate` bounds the pixels being decoded at once in the whole server,
so concurrent large requests cannot stack up memory: a request that does not fit waits its turn
(a small one never waits), and once the waiting requests hold more than the queue allows, a
request is refused with :class:`DecodeQueueFull` (the routes answer 503 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from tirelib.errors import DataError, ImageTooLargeError
from tirelib.preprocessing import MAX_IMAGE_PIXELS, Preprocessing, open_image
from tirelib.serve.config import ServeConfig
from tirelib.serve.inputs import Limits, Located, RawImage, _check_sides, to_tensor

SMALL_SHARE = 1 / 16
"""A request holding at most this share of one image's budget never waits at the gate."""
RETRY_AFTER_S = 1
"""What a 503 from a full decode queue tells the client to wait, seconds."""


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

    def decode(self) -> torch.Tensor:
        """The NCHW batch, prepared as the model was trained (heavy: run it off the loop)."""
        tensors = []
        for item in self.items:
            if isinstance(item.image, Image.Image):
                try:
                    tensors.append(self.prep.decode(item.image))
                except DataError as error:
                    raise DataError(f"{item.where}: {error}") from error
            else:
                tensors.append(to_tensor(self.prep, item.image, self.limits, item.where))
        return self.prep.batch(tensors)

    def close(self) -> None:
        for item in self.items:
            if isinstance(item.image, Image.Image):
                item.image.close()


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

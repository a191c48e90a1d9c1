"""Dynamic batching: concurrent requests share one forward pass.

Requests put their preprocessed images in a queue and await a future. One collector task (on the
event loop) takes the oldest request and gathers more until the batch holds ``max_batch_size``
images, or the oldest has waited ``max_wait_s``, or no more requests are likely: none is on its
way (:meth:`DynamicBatcher.arriving`: being read or decoded) and the batch already holds as many
requests as the last one did. So a lone client's request never waits, and concurrent clients,
who come back together after each answer, share a forward pass. A single worker thread runs the
forward pass while requests keep arriving, so a busy server forms larger batches by itself. A
request larger than ``max_batch_size`` is split into several batches and put back together.

A batch never mixes models: each request names the model it started with (the server may swap to
a new version meanwhile), and the collector cuts a batch where the model changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tirelib.errors import ConfigurationError
from tirelib.serve.config import ServeConfig

log = logging.getLogger(__name__)

# The server's own defaults (TIRE_SERVE_MAX_BATCH_SIZE, TIRE_SERVE_MAX_WAIT_MS), declared once.
DEFAULT_MAX_BATCH_SIZE: int = ServeConfig.model_fields["max_batch_size"].default
DEFAULT_MAX_WAIT_S: float = ServeConfig.model_fields["max_wait_ms"].default / 1000

RunBatch = Callable[[Any, torch.Tensor], np.ndarray]
"""``run(model, batch)``: class probabilities, one row per image of ``batch``."""


@dataclass
class _Item:
    model: Any
    images: torch.Tensor
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return int(self.images.shape[0])


class DynamicBatcher:
    """Gathers concurrent :meth:`submit` calls into batches run by ``run`` in a worker thread.

    ``on_batch(size, seconds)`` is called after each forward pass (metrics).
    """

    def __init__(
        self,
        run: RunBatch,
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ConfigurationError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ConfigurationError(f"max_wait_s must not be negative, got {max_wait_s}")
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._items: deque[_Item] = deque()
        self._arriving = 0
        self._last_requests = 1
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the collector on the running event loop and the inference thread."""
        if self.running:
            return
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tire-inference")
        self._task = asyncio.create_task(self._collect(), name="tire-batcher")

    async def stop(self) -> None:
        """Stop collecting; requests still queued or in the running batch fail."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._items:
            item = self._items.popleft()
            if not item.future.done():
                item.future.set_exception(RuntimeError("the server is shutting down"))
        if self._executor is not None:
            # A forward pass still running ends on its own; nothing waits for it any more.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def submit(self, model: Any, images: torch.Tensor) -> np.ndarray:
        """Probabilities for ``images`` (NCHW) from ``model``, computed in some batch."""
        if not self.running or self._wakeup is None:
            raise RuntimeError("the batcher is not running (start() was not awaited)")
        count = int(images.shape[0])
        if count == 0:
            raise ValueError("no images to predict")
        loop = asyncio.get_running_loop()
        futures = []
        for start in range(0, count, self.max_batch_size):
            future: asyncio.Future[np.ndarray] = loop.create_future()
            self._items.append(_Item(model, images[start : start + self.max_batch_size], future))
            futures.append(future)
        self._wakeup.set()
        try:
            parts = [await future for future in futures]
        finally:
            for future in futures:
                future.cancel()  # a caller that went away leaves nothing to compute
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request on its way here (its body is being read, its images decoded).

        A batch waits up to ``max_wait_s`` for requests on their way rather than leave without
        them; with none on the way it leaves at once, so a lone request never waits.
        """
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            if self._wakeup is not None:
                self._wakeup.set()

    # -- the collector

    def _pop(self) -> _Item | None:
        """The oldest item whose caller still waits (a cancelled one has gone away)."""
        while self._items:
            item = self._items.popleft()
            if not item.future.done():
                return item
        return None

    async def _wait(self, timeout: float | None) -> None:
        """Sleep until an item or a change in arrivals, or ``timeout`` seconds (None: forever)."""
        assert self._wakeup is not None
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _collect(self) -> None:
        held: _Item | None = None
        while True:
            first, held = held or self._pop(), None
            if first is None:
                await self._wait(None)
                continue
            batch, size = [first], first.size
            deadline = first.enqueued + self.max_wait_s
            while size < self.max_batch_size:
                item = self._pop()
                if item is None:
                    remaining = deadline - time.monotonic()
                    # More are likely while requests are on their way, or while the batch has
                    # fewer requests than the last one (concurrent clients come back together).
                    likely = self._arriving > 0 or len(batch) < self._last_requests
                    if remaining <= 0 or not likely:
                        break
                    await self._wait(remaining)
                    continue
                if item.model is not first.model or size + item.size > self.max_batch_size:
                    held = item  # starts the next batch
                    break
                batch.append(item)
                size += item.size
            self._last_requests = len(batch)
            await self._run(batch, size)

    async def _run(self, batch: list[_Item], size: int) -> None:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        images = batch[0].images if len(batch) == 1 else torch.cat([i.images for i in batch])
        start = time.perf_counter()
        try:
            probabilities = await loop.run_in_executor(
                self._executor, self.run, batch[0].model, images
            )
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(RuntimeError("the server is shutting down"))
            raise
        except Exception as error:  # handed to every waiting request, which answers it
            log.exception("forward pass of %d images failed", size)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        if self.on_batch is not None:
            self.on_batch(size, time.perf_counter() - start)
        offset = 0
        for item in batch:
            if not item.future.done():
                item.future.set_result(probabilities[offset : offset + item.size])
            offset += item.size

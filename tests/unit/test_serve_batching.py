"""Dynamic batching: gathering, splitting, never mixing models, errors and cancellation."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch

from tirelib.errors import ConfigurationError
from tirelib.serve.batching import DynamicBatcher

pytestmark = pytest.mark.unit


class Recorder:
    """A fake forward pass: each image is a 1-element row holding its id; the answer echoes it.

    Records every batch (model, size) so tests can see how requests were grouped.
    """

    def __init__(self, delay: float = 0.0, fail_on: float | None = None) -> None:
        self.batches: list[tuple[Any, int]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, model: Any, images: torch.Tensor) -> np.ndarray:
        with self.lock:
            self.batches.append((model, int(images.shape[0])))
        if self.delay:
            time.sleep(self.delay)
        ids = images.reshape(len(images), -1)[:, 0].numpy()
        if self.fail_on is not None and self.fail_on in ids:
            raise RuntimeError("the network exploded")
        return np.stack([ids, -ids], axis=1)


def ids(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1)


async def started(recorder: Recorder, **options: Any) -> DynamicBatcher:
    batcher = DynamicBatcher(recorder, **options)
    await batcher.start()
    return batcher


def test_concurrent_requests_share_one_forward_pass() -> None:
    recorder = Recorder()

    async def scenario() -> None:
        batcher = await started(recorder, max_batch_size=32, max_wait_s=0.05)
        results = await asyncio.gather(*(batcher.submit("m", ids(i)) for i in range(8)))
        await batcher.stop()
        for i, result in enumerate(results):
            assert result.tolist() == [[i, -i]]  # every caller gets its own row back

    asyncio.run(scenario())
    assert recorder.batches == [("m", 8)]


def test_batches_respect_the_maximum_size() -> None:
    recorder = Recorder(delay=0.01)

    async def scenario() -> None:
        batcher = await started(recorder, max_batch_size=4, max_wait_s=0.02)
        results = await asyncio.gather(*(batcher.submit("m", ids(i, i + 0.5)) for i in range(10)))
        await batcher.stop()
        for i, result in enumerate(results):
            assert result[:, 0].tolist() == [i, i + 0.5]

    asyncio.run(scenario())
    assert all(size <= 4 for _, size in recorder.batches)
    assert sum(size for _, size in recorder.batches) == 20


def test_a_request_larger_than_a_batch_is_split_and_put_back_in_order() -> None:
    recorder = Recorder()

    async def scenario() -> None:
        batcher = await started(recorder, max_batch_size=32, max_wait_s=0.0)
        result = await batcher.submit("m", ids(*range(100)))
        await batcher.stop()
        assert result[:, 0].tolist() == list(range(100))

    asyncio.run(scenario())
    assert [size for _, size in recorder.batches] == [32, 32, 32, 4]


def test_a_batch_never_mixes_models() -> None:
    recorder = Recorder()
    old, new = object(), object()

    async def scenario() -> None:
        batcher = await started(recorder, max_batch_size=32, max_wait_s=0.05)
        models = [old, new, old, new, old]
        results = await asyncio.gather(*(batcher.submit(m, ids(i)) for i, m in enumerate(models)))
        await batcher.stop()
        assert [r[0, 0] for r in results] == [0, 1, 2, 3, 4]

    asyncio.run(scenario())
    assert {m for m, _ in recorder.batches} == {old, new}
    assert sum(size for _, size in recorder.batches) == 5


def test_a_lone_request_does_not_wait() -> None:
    recorder = Recorder()

    async def scenario() -> None:
        batcher = await started(recorder, max_batch_size=32, max_wait_s=5.0)
        began = time.perf_counter()
        await batcher.submit("m", ids(1))
        elapsed = time.perf_counter() - began
        await batcher.stop()
        assert elapsed < 1.0  # nobody else is on the way: no reason to wait 5 s

    asyncio.run(scenario())


def test_a_batch_waits_for_requests_on_their_way() -> None:
    recorder = Recorder()

    async def late(batcher: DynamicBatcher) -> np.ndarray:
        with batcher.arriving():  # reading and decoding its body
            await asyncio.sleep(0.05)
        return await batcher.submit("m", ids(2))

    async def scenario() -> None:
        batcher = await started(recorder, max_batch_size=32, max_wait_s=1.0)
        second = asyncio.create_task(late(batcher))
        await asyncio.sleep(0)  # the second request has arrived and is being decoded
        first = await batcher.submit("m", ids(1))
        assert first.tolist() == [[1, -1]]
        assert (await second).tolist() == [[2, -2]]
        await batcher.stop()

    asyncio.run(scenario())
    assert recorder.batches == [("m", 2)]


def test_clients_that_came_together_are_waited_for_again() -> None:
    recorder = Recorder()

    async def later(batcher: DynamicBatcher, delay: float, value: float) -> np.ndarray:
        await asyncio.sleep(delay)  # its answer came back, the client sends the next request
        return await batcher.submit("m", ids(value))

    async def scenario() -> None:
        batcher = await started(recorder, max_batch_size=32, max_wait_s=1.0)
        await asyncio.gather(batcher.submit("m", ids(1)), batcher.submit("m", ids(2)))
        results = await asyncio.gather(later(batcher, 0.0, 3), later(batcher, 0.05, 4))
        await batcher.stop()
        assert [r[0, 0] for r in results] == [3, 4]

    asyncio.run(scenario())
    assert [size for _, size in recorder.batches] == [2, 2]


def test_the_wait_for_arrivals_is_bounded_by_max_wait() -> None:
    recorder = Recorder()

    async def scenario() -> None:
        batcher = await started(recorder, max_batch_size=32, max_wait_s=0.05)
        with batcher.arriving():  # a request that takes its time (or never comes)
            began = time.perf_counter()
            await batcher.submit("m", ids(1))
            elapsed = time.perf_counter() - began
        await batcher.stop()
        assert 0.04 <= elapsed < 1.0

    asyncio.run(scenario())


def test_a_failed_forward_pass_fails_its_batch_and_the_batcher_goes_on() -> None:
    recorder = Recorder(fail_on=13.0)

    async def scenario() -> None:
        batcher = await started(recorder, max_batch_size=32, max_wait_s=0.05)
        results = await asyncio.gather(
            batcher.submit("m", ids(13)), batcher.submit("m", ids(1)), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) for r in results)  # the same batch
        after = await batcher.submit("m", ids(2))
        await batcher.stop()
        assert after.tolist() == [[2, -2]]

    asyncio.run(scenario())


def test_a_cancelled_request_is_not_computed() -> None:
    recorder = Recorder(delay=0.1)

    async def scenario() -> None:
        batcher = await started(recorder, max_batch_size=1, max_wait_s=0.0)
        first = asyncio.create_task(batcher.submit("m", ids(1)))
        await asyncio.sleep(0.02)  # the first batch is running
        gone = asyncio.create_task(batcher.submit("m", ids(2)))
        await asyncio.sleep(0.01)
        gone.cancel()  # its caller disconnected while it was queued
        assert (await first).tolist() == [[1, -1]]
        await asyncio.sleep(0.05)
        await batcher.stop()

    asyncio.run(scenario())
    assert [size for _, size in recorder.batches] == [1]


def test_stop_fails_the_requests_still_queued() -> None:
    recorder = Recorder(delay=0.2)

    async def scenario() -> None:
        batcher = await started(recorder, max_batch_size=1, max_wait_s=0.0)
        tasks = [asyncio.create_task(batcher.submit("m", ids(i))) for i in range(3)]
        await asyncio.sleep(0.05)
        await batcher.stop()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        with pytest.raises(RuntimeError, match="not running"):
            await batcher.submit("m", ids(9))

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("options", "message"),
    [({"max_batch_size": 0}, "max_batch_size"), ({"max_wait_s": -1.0}, "max_wait_s")],
)
def test_bad_settings_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        DynamicBatcher(Recorder(), **options)

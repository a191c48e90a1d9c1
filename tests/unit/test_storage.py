"""Object-store helpers without a server: the bounded parallel map."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from botocore.utils import parse_timestamp

from tirelib.storage import bounded_map, fast_timestamp

pytestmark = pytest.mark.unit


def test_bounded_map_keeps_a_window_of_work_however_many_items() -> None:
    taken = 0  # items the map has read from the input
    lock = threading.Lock()
    ahead: list[int] = []

    def items() -> Iterator[int]:
        nonlocal taken
        for item in range(5000):
            with lock:
                taken += 1
            yield item

    results: list[int] = []
    for result in bounded_map(lambda x: x * 2, items(), max_workers=4, window=16):
        with lock:
            ahead.append(taken - len(results))
        results.append(result)
    assert sorted(results) == [2 * i for i in range(5000)]
    assert max(ahead) <= 16  # never more than the window read and not yet given back


def test_bounded_map_stops_at_the_first_error_and_runs_nothing_more() -> None:
    ran: list[int] = []

    def work(item: int) -> int:
        ran.append(item)
        if item == 10:
            raise ValueError("item 10 is bad")
        return item

    with pytest.raises(ValueError, match="item 10"):
        list(bounded_map(work, range(10_000), max_workers=2, window=8))
    assert len(ran) < 100  # not the other 9,990 items


def test_bounded_map_closed_early_runs_nothing_more() -> None:
    ran: list[int] = []
    results = bounded_map(lambda x: ran.append(x), range(10_000), max_workers=2, window=8)
    next(results)
    results.close()
    count = len(ran)
    assert count < 100
    assert len(ran) == count  # the pool is gone: nothing runs after close()


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-30T17:00:00.000Z",  # a listing's LastModified
        "2026-11-30T17:00:00Z",
        "2026-11-30T18:00:00.123456+01:00",
        "Mon, 30 Nov 2026 17:00:00 GMT",  # a header's Last-Modified
        "1700000000",
        1700000000,
    ],
)
def test_fast_timestamps_equal_botocores(value: str | int) -> None:
    moment = fast_timestamp(value)
    assert moment == parse_timestamp(value) and moment.tzinfo is not None  # type: ignore[arg-type]

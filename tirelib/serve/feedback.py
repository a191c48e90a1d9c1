"""What the server remembers of recent predictions, so a client can send their true labels later.

:class:`FeedbackStore` keeps, per request id, the model version that answered and each
instance's predicted class, for the last ``feedback_window_requests`` requests and at most
``feedback_ttl_seconds``; the oldest is forgotten first. An entry costs about 300 bytes plus two
per instance, so the default window (100,000 requests) stays within tens of megabytes.
:func:`judge` checks a feedback body against what was predicted and says what it counts.
"""

from __future__ import annotations

import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tirelib.errors import DataError
from tirelib.serve.limits import excerpt


@dataclass(slots=True)
class Prediction:
    """One answered request, as the feedback route needs it."""

    version: str
    classes: tuple[str, ...]
    predicted: array[int]  # the predicted class's index, per instance
    capture_keys: tuple[str, ...] | None = None  # where its images were captured, if they were
    at: float = 0.0  # the store's clock when it was remembered
    answered: bool = False

    @classmethod
    def of(
        cls,
        version: str,
        classes: Sequence[str],
        predicted: Sequence[int],
        capture_keys: Sequence[str] | None = None,
    ) -> Prediction:
        keys = tuple(capture_keys) if capture_keys is not None else None
        return cls(version, tuple(classes), array("H", predicted), keys)


class FeedbackStore:
    """A bounded map from request id to :class:`Prediction`: by count and by age."""

    def __init__(
        self,
        max_requests: int,
        ttl_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_requests = max_requests
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, Prediction] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, request_id: str, prediction: Prediction) -> None:
        """Keep ``prediction``; a request id seen before now names this newer prediction."""
        now = self._clock()
        prediction.at = now
        with self._lock:
            self._entries.pop(request_id, None)
            self._entries[request_id] = prediction
            self._evict(now)

    def get(self, request_id: str) -> Prediction | None:
        """The prediction of ``request_id``; None when unknown, evicted or expired."""
        now = self._clock()
        with self._lock:
            self._evict(now)
            return self._entries.get(request_id)

    def _evict(self, now: float) -> None:
        entries = self._entries
        while len(entries) > self.max_requests:
            entries.popitem(last=False)
        # Insertion order is time order, so the expired ones are at the front.
        while entries:
            oldest = next(iter(entries.values()))
            if now - oldest.at <= self.ttl_s:
                break
            entries.popitem(last=False)


@dataclass(frozen=True)
class Judged:
    """What one feedback body says: the labelled instances, as (index, true, predicted)."""

    labelled: list[tuple[int, str, str]] = field(default_factory=list)

    @property
    def correct(self) -> int:
        return sum(true == predicted for _, true, predicted in self.labelled)


def judge(prediction: Prediction, labels: Sequence[str | None]) -> Judged:
    """Match ``labels`` (one per instance, None for no label) with what was predicted.

    Raises :class:`DataError` for a wrong count or a label that is not one of the classes.
    """
    expected = len(prediction.predicted)
    if len(labels) != expected:
        raise DataError(
            f"labels has {len(labels):,} items, expected {expected}: one per instance of "
            "the request, in order (null for an instance without a label)"
        )
    known = set(prediction.classes)
    unknown = sorted({label for label in labels if label is not None and label not in known})
    if unknown:
        shown = ", ".join(excerpt(label, 40) for label in unknown[:5])
        raise DataError(
            f"unknown labels [{shown}]; the classes of version {prediction.version} are "
            f"{list(prediction.classes)} (or null for no label)"
        )
    classes = prediction.classes
    return Judged(
        [
            (index, label, classes[prediction.predicted[index]])
            for index, label in enumerate(labels)
            if label is not None
        ]
    )

"""The promotion history: one ``tirelib.history.<seq>`` tag per promotion or rollback on the
registered model, and which of them took effect.

``applied`` is never stored: an event took effect when the next event's ``previous`` names its
version, or, for the last one, when ``production`` does. An event written before an interrupted
alias move therefore reads as not applied, with nothing to clean up.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

PREVIOUS_TAG = "previous_production_version"
ARCHIVE_TAGS = ("archived", "archived_at", "replaced_by", "rolled_back")
HISTORY_PREFIX = "tirelib.history."


@dataclass(frozen=True)
class HistoryEvent:
    """One promotion or rollback. ``applied`` is false for one that was interrupted."""

    seq: int
    action: str
    version: str
    previous: str | None
    at: str
    by: str
    metric: str | None = None
    score: float | None = None
    champion_score: float | None = None
    applied: bool = True

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def applied_flags(events: Sequence[Mapping[str, Any]], production: str | None) -> list[bool]:
    """Which events (oldest first) took effect: each is confirmed by the next one's
    ``previous``, and the last by the ``production`` alias itself."""
    flags = []
    for index, event in enumerate(events):
        version = str(event.get("version"))
        if index + 1 < len(events):
            flags.append(events[index + 1].get("previous") == version)
        else:
            flags.append(production == version)
    return flags


def parse_events(model_tags: Mapping[str, str], production: str | None) -> list[HistoryEvent]:
    """The history events among a registered model's tags, oldest first, ``applied`` derived."""
    raw: list[tuple[int, dict[str, Any]]] = []
    for key, value in model_tags.items():
        if not key.startswith(HISTORY_PREFIX):
            continue
        try:
            raw.append((int(key.removeprefix(HISTORY_PREFIX)), json.loads(value)))
        except ValueError:
            log.warning("ignoring malformed history tag %s=%r", key, value)
    raw.sort(key=lambda item: item[0])
    applied = applied_flags([event for _, event in raw], production)
    return [
        HistoryEvent(
            seq=seq,
            action=str(event.get("action", "?")),
            version=str(event.get("version")),
            previous=event.get("previous"),
            at=str(event.get("at", "")),
            by=str(event.get("by", "")),
            metric=event.get("metric"),
            score=event.get("score"),
            champion_score=event.get("champion_score"),
            applied=flag,
        )
        for (seq, event), flag in zip(raw, applied, strict=True)
    ]


def event_tag(events: Sequence[HistoryEvent], event: Mapping[str, Any]) -> tuple[str, str]:
    """The tag (key, value) that records ``event`` after ``events``."""
    seq = max((e.seq for e in events), default=0) + 1
    return f"{HISTORY_PREFIX}{seq:06d}", json.dumps(dict(event), sort_keys=True)


__all__ = [
    "ARCHIVE_TAGS",
    "HISTORY_PREFIX",
    "PREVIOUS_TAG",
    "HistoryEvent",
    "applied_flags",
    "event_tag",
    "parse_events",
]

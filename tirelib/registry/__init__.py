"""The model registry: which trained runs become versions, and which version serves.

One module per concern:

- :mod:`~tirelib.registry.gate`: thresholds, the gate's decision (MLflow's ``MetricThreshold``),
  and :func:`best_version`, the one function that chooses the best version by a metric;
- :mod:`~tirelib.registry.results`: what each operation answers (JSON for XCom via ``summary()``);
- :mod:`~tirelib.registry.history`: the promotion history kept as tags, and which events applied;
- :mod:`~tirelib.registry.locks`: the model's lock (PostgreSQL advisory lock, or a lock file);
- :mod:`~tirelib.registry.client`: the MLflow calls, with errors classified where they enter;
- :mod:`~tirelib.registry.lifecycle`: register, compare, judge, stage, produce, rollback, info,
  history; its docstring holds the promotion's compare-and-set and commit protocol.
"""

from __future__ import annotations

from tirelib.registry.client import HTTP_DEFAULTS, configure, who
from tirelib.registry.gate import Decision, Thresholds, best_version, decide
from tirelib.registry.history import HistoryEvent, applied_flags
from tirelib.registry.lifecycle import (
    compare,
    history,
    info,
    judge,
    produce,
    register_run,
    rollback,
    stage,
)
from tirelib.registry.locks import LOCK_TIMEOUT_S, model_lock
from tirelib.registry.results import (
    METRIC_TAGS,
    PRODUCTION,
    STAGING,
    Comparison,
    Promotion,
    Registration,
    RegistryInfo,
    Staging,
    VersionInfo,
)
from tirelib.urls import libpq_url

__all__ = [
    "HTTP_DEFAULTS",
    "LOCK_TIMEOUT_S",
    "METRIC_TAGS",
    "PRODUCTION",
    "STAGING",
    "Comparison",
    "Decision",
    "HistoryEvent",
    "Promotion",
    "Registration",
    "RegistryInfo",
    "Staging",
    "Thresholds",
    "VersionInfo",
    "applied_flags",
    "best_version",
    "compare",
    "configure",
    "decide",
    "history",
    "info",
    "judge",
    "libpq_url",
    "model_lock",
    "produce",
    "register_run",
    "rollback",
    "stage",
    "who",
]

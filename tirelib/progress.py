"""Progress bars for long work: a bar on a terminal, nothing (logs instead) elsewhere."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool | None = None,
    leave: bool = False,
) -> Any:
    """A tqdm bar; ``enabled=None`` shows it only on a terminal (not in Airflow's task logs)."""
    disable = (not sys.stderr.isatty()) if enabled is None else not enabled
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=disable)

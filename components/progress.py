"""Progress bars that suit both terminals and log files."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm bar: live on a terminal; without one (CI, DVC, log files) at most one update every 30 s."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)

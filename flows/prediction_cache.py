"""The recent predictions of one serve-api process, so that ``POST /v1/feedback?prediction_id=ID`` needs no image upload.

``/v1/predict`` returns ``prediction_id``: the hex SHA-256 of the image bytes (the id ``contad predict``
writes into ``predictions.jsonl``, ``components.memory.feedback.image_id``). The cache keeps the last
``serve.feedback_cache`` of them (least recently predicted dropped first; 0 = off) with the image
bytes, what was decided and by which model and bank version, and drops the oldest too while their
images hold more than ``serve.feedback_cache_mb`` megabytes (the newest is always kept).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from components.errors import ContadError

MIN_PREFIX = 8


class UnknownPrediction(ContadError):
    """No recent prediction has this id (never made by this service, or dropped from the cache)."""


class AmbiguousPrediction(ContadError):
    """Several recent predictions start with this id prefix."""


@dataclass(frozen=True)
class CachedPrediction:
    """One prediction of the service: the image and what the served model decided on it."""

    data: bytes
    decided: dict[str, Any]  # Verdict.to_dict(): product, score, threshold, decision
    model_version: str | None
    bank_version: str | None


class PredictionCache:
    """The last ``size`` predictions by id, their images at most ``max_bytes`` together (thread-safe; ``size`` 0
    keeps nothing; None: no byte bound)."""

    def __init__(self, size: int, max_bytes: int | None = None) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, CachedPrediction] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, ident: str, entry: CachedPrediction) -> None:
        """Keep ``entry`` as the newest prediction (an image predicted again replaces its older entry)."""
        if self.size <= 0:
            return
        with self._lock:
            old = self._items.pop(ident, None)
            self._bytes -= len(old.data) if old is not None else 0
            self._items[ident] = entry
            self._bytes += len(entry.data)
            while len(self._items) > 1 and (len(self._items) > self.size or (self.max_bytes is not None and self._bytes > self.max_bytes)):
                self._bytes -= len(self._items.popitem(last=False)[1].data)

    def find(self, prefix: str) -> tuple[str, CachedPrediction]:
        """(id, entry) of the one recent prediction whose id starts with ``prefix`` (at least ``MIN_PREFIX`` hex digits)."""
        prefix = prefix.lower()
        if len(prefix) < MIN_PREFIX:
            raise AmbiguousPrediction(f"prediction_id {prefix!r} is too short: give at least {MIN_PREFIX} characters")
        if self.size <= 0:
            raise UnknownPrediction("this service keeps no predictions (serve.feedback_cache=0): post the image itself")
        with self._lock:
            matches = [(ident, entry) for ident, entry in self._items.items() if ident.startswith(prefix)]
        if not matches:
            raise UnknownPrediction(f"prediction_id {prefix} is not among the last {self.size} predictions of this service "
                                    "(serve.feedback_cache): post the image itself")
        if len(matches) > 1:
            raise AmbiguousPrediction(f"prediction_id {prefix} is ambiguous ({len(matches)} recent predictions start with it); give more characters")
        return matches[0]

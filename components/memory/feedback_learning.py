"""Learning a false reject with the least memory growth that makes the deployed detector decide it OK.

A false reject scores above its product's threshold because a few of its patches are far from the
product's memory. Adding *all* of its patches (or a fixed share) also adds normal variety that nearby
defects can match, so the product passes more defects at an unchanged threshold. Instead, each image
adds its patches farthest from the memory in growing steps (``ContinualMethod.extend_task``: the first
step ``FIRST_STEP`` of its patches, each next step half of what it learned so far and at least
``FIRST_STEP``, so it adds at most 1.5 x the share it needs, or ``FIRST_STEP`` more) and stops as soon
as the detector (the calibration's deployed thresholds) decides it OK with ``MARGIN`` to spare, or at
``cap`` (``feedback.patch_share``), the most of an image's patches it may add. The share each image
needed is reported; nothing here chooses a number on evaluation data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from components.decision import Detector, normalise

FIRST_STEP = 0.005  # share of an image's patches added by the first step
GROWTH = 0.5  # every next step adds this multiple of the share learned so far
MARGIN = 0.01  # the image must score at most (1 - MARGIN) x its threshold: decided OK, not on the edge


@dataclass(frozen=True)
class LearnedImage:
    """How one false reject was learned: the share of its patches added, its score before and after, and
    whether it is now decided OK (with the margin)."""

    task: str
    share: float
    rows_added: int
    score_before: float
    score_after: float
    threshold: float
    now_ok: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _ok(score: float, threshold: float) -> bool:
    return score <= threshold - MARGIN * abs(threshold)


def learn_until_ok(detector: Detector, task: str, rgb: np.ndarray, cap: float) -> LearnedImage:
    """Grow ``task``'s memory (in ``detector.method``, in place) by the farthest patches of one normal image
    ``rgb`` (HxWx3 uint8) until ``detector`` decides it OK with the margin, or ``cap`` of its patches are added."""
    image = normalise([rgb], detector.image_size)
    first = detector.decide([rgb])[0]
    score, threshold, learned, rows = first.score, first.threshold, 0.0, 0
    while not _ok(score, threshold) and learned < cap - 1e-12:
        step = min(max(FIRST_STEP, GROWTH * learned), cap - learned)
        rows += int(detector.method.extend_task(task, image, step)["knowledge_added"])
        learned += step
        verdict = detector.decide([rgb])[0]
        score, threshold = verdict.score, verdict.threshold
    return LearnedImage(task, round(learned, 6), rows, first.score, score, threshold, _ok(score, threshold))

"""learn_until_ok: a false reject grows its product's memory by the fewest of its farthest patches that make the
deployed detector decide it OK (with a margin), never beyond the cap."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from components.memory.feedback_learning import FIRST_STEP, MARGIN, learn_until_ok


@dataclass
class _Verdict:
    score: float
    threshold: float


@dataclass
class _Method:
    """Each added share of the image's patches lowers its score by ``drop_per_share`` x share."""

    start: float
    drop_per_share: float
    shares: list[float] = field(default_factory=list)

    def extend_task(self, task: str, images: Any, share: float) -> dict[str, int]:
        assert task == "p" and images.shape[0] == 1
        self.shares.append(share)
        return {"knowledge_added": max(1, round(share * 1000))}

    def score(self) -> float:
        return self.start - self.drop_per_share * sum(self.shares)


@dataclass
class _Detector:
    method: _Method
    threshold: float = 1.0
    image_size: int = 8

    def decide(self, rgbs: list[np.ndarray]) -> list[_Verdict]:
        return [_Verdict(self.method.score(), self.threshold) for _ in rgbs]


RGB = np.zeros((8, 8, 3), np.uint8)


def test_stops_at_the_first_step_that_decides_the_image_ok_with_the_margin() -> None:
    method = _Method(start=1.05, drop_per_share=10.0)  # needs a share of (0.05 + MARGIN) / 10 = 0.006
    learned = learn_until_ok(_Detector(method), "p", RGB, cap=0.1)
    assert learned.now_ok and learned.score_after <= 1.0 - MARGIN
    assert method.shares == [FIRST_STEP, FIRST_STEP]  # 0.005 is not enough, 0.01 is
    assert learned.share == pytest.approx(sum(method.shares)) and learned.share <= max(1.5 * 0.006, 0.006 + FIRST_STEP) + 1e-9
    assert learned.rows_added == sum(max(1, round(s * 1000)) for s in method.shares)
    assert learned.score_before == pytest.approx(1.05)


def test_an_image_already_ok_adds_nothing_and_the_cap_is_never_exceeded() -> None:
    ok = _Method(start=0.5, drop_per_share=10.0)
    assert learn_until_ok(_Detector(ok), "p", RGB, cap=0.1).share == 0.0 and ok.shares == []
    stubborn = _Method(start=3.0, drop_per_share=1.0)  # would need 2 x its patches
    learned = learn_until_ok(_Detector(stubborn), "p", RGB, cap=0.1)
    assert not learned.now_ok and learned.share == pytest.approx(0.1) and sum(stubborn.shares) == pytest.approx(0.1)

"""Drift watch: do the scores of parts decided OK still look like the calibration normals?

Per product, ``DriftWatch`` collects the scores of images decided OK in tumbling windows of
``drift.window`` images. When a window is full it is compared with the product's calibration
sample (held-out training normals + leave-one-out scores, the sample the threshold came from),
restricted to scores at or below the image threshold, because only those can be decided OK. The
statistic is the two-sample Kolmogorov-Smirnov distance ``D``; a window alarms when ``D`` exceeds
the critical value of the test at significance ``drift.alpha`` for the two sample sizes, so on an
undrifted line about ``alpha`` of the windows alarm (measured, not assumed: tests and
benchmarks/RESULTS.md). A lighting change, a blurred lens or a new supplier's parts shift the
scores of good parts before they cross the threshold: this sees it before the false rejects do.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from components.eval.thresholds import Calibration


def ks_distance(sample: np.ndarray, reference: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance: the largest gap between the two empirical CDFs."""
    a, b = np.sort(np.asarray(sample, np.float64)), np.sort(np.asarray(reference, np.float64))
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / a.size
    cdf_b = np.searchsorted(b, grid, side="right") / b.size
    return float(np.max(np.abs(cdf_a - cdf_b)))


def ks_critical(n: int, m: int, alpha: float) -> float:
    """Asymptotic critical value of the two-sample KS distance at significance ``alpha`` (sizes ``n``, ``m``)."""
    return math.sqrt(-math.log(alpha / 2.0) / 2.0) * math.sqrt((n + m) / (n * m))


@dataclass(frozen=True)
class DriftReading:
    """One full window of a product: its KS distance to the calibration sample and whether it alarms."""

    product: str
    window: int  # 1-based index of the product's window
    size: int  # OK scores in the window
    reference_size: int  # calibration normals at or below the threshold
    statistic: float  # KS distance D
    critical: float  # D above this alarms
    alarm: bool
    median_shift: float  # window median - reference median (score units; > 0: good parts score higher)

    def to_dict(self) -> dict[str, float | int | str | bool]:
        return dict(vars(self))


class DriftWatch:
    """Windowed drift statistics of OK-decided scores per product against its calibration sample."""

    def __init__(self, references: dict[str, np.ndarray], thresholds: dict[str, float], window: int, alpha: float, min_reference: int = 10) -> None:
        if window < 5:
            raise ValueError(f"drift.window must be >= 5, got {window}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"drift.alpha must be in (0, 1), got {alpha}")
        self.window, self.alpha = window, alpha
        self.references: dict[str, np.ndarray] = {}
        for product, scores in references.items():
            below = np.sort(np.asarray(scores, np.float64))
            below = below[below <= thresholds[product]]
            if below.size >= min_reference:  # too few calibration normals: nothing to compare with
                self.references[product] = below
        self._pending: dict[str, list[float]] = defaultdict(list)
        self._windows: dict[str, int] = defaultdict(int)
        self.latest: dict[str, DriftReading] = {}

    def watches(self, product: str) -> bool:
        return product in self.references

    def observe(self, product: str, score: float) -> DriftReading | None:
        """Add the score of an image decided OK; the reading when it completes a window of ``product``."""
        if product not in self.references:
            return None
        pending = self._pending[product]
        pending.append(float(score))
        if len(pending) < self.window:
            return None
        sample = np.asarray(pending)
        self._pending[product] = []
        self._windows[product] += 1
        reference = self.references[product]
        statistic = ks_distance(sample, reference)
        critical = ks_critical(sample.size, reference.size, self.alpha)
        reading = DriftReading(product, self._windows[product], int(sample.size), int(reference.size), statistic, critical,
                               statistic > critical, float(np.median(sample) - np.median(reference)))
        self.latest[product] = reading
        return reading


def drift_watch_for(calibration: Calibration, window: int, alpha: float) -> DriftWatch:
    """A ``DriftWatch`` over every task of ``calibration`` at its current target."""
    return DriftWatch({t: s.normal for t, s in calibration.samples.items()}, {t: calibration.for_task(t).image for t in calibration.samples},
                      window, alpha)

"""How far an image AUROC on few test images can stray from 0.5 by luck alone.

A detector whose scores do not separate good from defective parts at all still gets some AUROC on a
finite test set: with ``n_good`` good and ``n_defective`` defective images every ranking of them is
equally likely, and AUROC = U / (n_good * n_defective) follows the Mann-Whitney U null distribution
(mean 0.5, variance (n_good + n_defective + 1) / (12 n_good n_defective)). ``chance_band`` gives the
central ``level`` interval of that distribution: a value inside it cannot tell a detector that
separates nothing from this one -- neither that it detects, nor that it is *inverted* (below 0.5).
On MVTec's 3 good / 11 defective grid test images the 90 % band is 0.18-0.82.

Exact for small sets (the U distribution's counts are the coefficients of the Gaussian binomial
coefficient, built one good image at a time), normal approximation above ``EXACT_MAX_PAIRS`` pairs,
where the two agree to about 0.005.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist

import numpy as np

CHANCE_LEVEL = 0.90
"""Central share of the null AUROC distribution reported as the chance band."""

EXACT_MAX_PAIRS = 4000
"""Above this many (good, defective) pairs the band uses the normal approximation."""


def null_auroc_distribution(n_good: int, n_defective: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, probabilities) of the AUROC of a detector that ranks images at random (no ties).

    ``P(U = u)`` is the coefficient of ``q^u`` in the Gaussian binomial ``[n_good + n_defective choose
    n_good]_q`` over ``C(n_good + n_defective, n_good)``; the polynomial is built as the product of
    ``(1 - q^(n_defective + i)) / (1 - q^i)``, i = 1..n_good (each division exact).
    """
    _check_counts(n_good, n_defective)
    m, n = sorted((n_good, n_defective))  # the distribution is the same with the roles swapped; fewer factors
    poly = np.zeros(m * n + 1, dtype=np.float64)
    poly[0] = 1.0
    for i in range(1, m + 1):
        poly[n + i :] -= poly[: m * n + 1 - (n + i)].copy()  # times (1 - q^(n+i)), highest powers first
        for r in range(i):  # divided by (1 - q^i): a running sum along every residue class mod i
            poly[r::i] = np.cumsum(poly[r::i])
    probabilities = poly / poly.sum()
    return np.arange(m * n + 1) / (m * n), probabilities


def chance_band(n_good: int, n_defective: int, level: float = CHANCE_LEVEL) -> tuple[float, float]:
    """The central ``level`` interval (lo, hi) of the AUROC a non-separating detector gets on this many
    good and defective test images; ``(nan, nan)`` when either count is 0 (AUROC undefined)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_good == 0 or n_defective == 0:
        _check_counts(max(n_good, 1), max(n_defective, 1))
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0
    if n_good * n_defective > EXACT_MAX_PAIRS:
        sd = math.sqrt((n_good + n_defective + 1) / (12.0 * n_good * n_defective))
        half = NormalDist().inv_cdf(1.0 - tail) * sd
        return max(0.0, 0.5 - half), min(1.0, 0.5 + half)
    values, probabilities = null_auroc_distribution(n_good, n_defective)
    cdf = np.cumsum(probabilities)
    lo = values[int(np.searchsorted(cdf, tail - 1e-12))]  # smallest value with P(AUROC <= value) >= tail
    return float(lo), float(1.0 - lo)  # the null distribution is symmetric about 0.5


def within_chance(value: float, n_good: int, n_defective: int, level: float = CHANCE_LEVEL) -> bool:
    """True when ``value`` lies inside the chance band (False for an undefined band or value)."""
    return inside(value, chance_band(n_good, n_defective, level))


def counts_band(counts: Mapping[str, int] | None, level: float = CHANCE_LEVEL) -> tuple[float, float] | None:
    """The chance band of a ``{"good": n, "defective": n}`` record (``metrics.json`` ``test_images``); None when
    the record is missing or lacks good or defective images (no AUROC, no band)."""
    if not counts or not counts.get("good") or not counts.get("defective"):
        return None
    return chance_band(counts["good"], counts["defective"], level)


def inside(value: float | None, band: tuple[float, float] | None) -> bool:
    """True when ``value`` lies inside ``band`` (False for no band, an undefined band or no value)."""
    if value is None or band is None or math.isnan(value) or math.isnan(band[0]):
        return False
    return band[0] <= value <= band[1]


def _check_counts(n_good: int, n_defective: int) -> None:
    if n_good < 0 or n_defective < 0 or int(n_good) != n_good or int(n_defective) != n_defective:
        raise ValueError(f"image counts must be non-negative integers, got {n_good} good and {n_defective} defective")

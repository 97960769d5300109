"""The false-reject bound: a 95 % binomial quantile, exact for small test sets and finite for large ones."""

from __future__ import annotations

import math

from components.eval.thresholds import binomial_upper


def _direct(n: int, rate: float, confidence: float = 0.95) -> int:
    total = 0.0
    for r in range(n + 1):
        total += math.comb(n, r) * rate**r * (1.0 - rate) ** (n - r)
        if total >= confidence:
            return r
    return n


def test_bound_matches_the_direct_sum_and_survives_large_test_sets() -> None:
    for n, rate in ((8, 0.0625), (60, 0.05), (200, 0.01), (500, 0.3), (1, 0.5)):
        assert binomial_upper(n, rate) == _direct(n, rate)
    big = binomial_upper(3000, 0.5)  # math.comb(3000, r) * float overflowed here
    assert 1500 < big < 1500 + 2 * math.sqrt(3000 * 0.25)
    assert binomial_upper(10, 0.0) == 0 and binomial_upper(10, 1.0) == 10

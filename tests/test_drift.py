"""Drift watch statistics: the KS distance, its false-alarm rate on an undrifted line, and detection of a shift."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ks_2samp

from components.eval.drift import DriftWatch, ks_distance

THRESHOLD_Q = 0.99


def _line(rng: np.random.Generator, n: int, factor: float = 1.0) -> np.ndarray:
    return rng.gamma(20.0, 0.05, n) * factor  # normal parts score ~1 after per-product normalisation


def _alarm_rate(watch: DriftWatch, scores: np.ndarray, threshold: float) -> tuple[float, int]:
    readings = [watch.observe("p", s) for s in scores if s <= threshold]  # only OK-decided parts are watched
    full = [r for r in readings if r is not None]
    return sum(r.alarm for r in full) / len(full), len(full)


def test_ks_distance_matches_scipy() -> None:
    rng = np.random.default_rng(1)
    for n, m in ((5, 7), (50, 400), (13, 13)):
        a, b = rng.normal(size=n), rng.normal(0.3, 1.2, size=m)
        assert ks_distance(a, b) == pytest.approx(ks_2samp(a, b).statistic, abs=1e-12)


def test_undrifted_line_alarms_about_alpha_and_a_shift_is_seen() -> None:
    rng = np.random.default_rng(0)
    reference = _line(rng, 400)
    threshold = float(np.quantile(reference, THRESHOLD_Q))
    null_rate, windows = _alarm_rate(DriftWatch({"p": reference}, {"p": threshold}, 50, 0.01), _line(rng, 25_000), threshold)
    assert windows > 400
    assert null_rate <= 0.03  # alpha = 0.01 (asymptotic critical value; measured rate printed in RESULTS)
    shifted_rate, _ = _alarm_rate(DriftWatch({"p": reference}, {"p": threshold}, 50, 0.01), _line(rng, 5_000, 1.15), threshold)
    assert shifted_rate >= 0.8


def test_only_products_with_enough_calibration_normals_are_watched() -> None:
    rng = np.random.default_rng(2)
    watch = DriftWatch({"big": _line(rng, 100), "small": _line(rng, 4)}, {"big": 9.0, "small": 9.0}, 5, 0.05)
    assert watch.watches("big") and not watch.watches("small")
    assert all(watch.observe("small", 1.0) is None for _ in range(20))
    readings = [watch.observe("big", 3.0) for _ in range(5)]  # far above every normal: a drifted window
    assert readings[:4] == [None] * 4 and readings[4] is not None and readings[4].alarm
    assert readings[4].median_shift > 1.5 and watch.latest["big"] == readings[4]
    with pytest.raises(ValueError, match="drift.window"):
        DriftWatch({}, {}, 2, 0.01)


def test_stream_drift_uses_calibration_or_the_streams_own_baseline() -> None:
    from components.config import load_config
    from flows.monitoring import StreamDrift

    cfg = load_config(None, ["drift.window=10", "drift.alpha=0.01"])
    rng = np.random.default_rng(3)
    calibrated = list(_line(rng, 60))
    with_calibration = StreamDrift(cfg, "p", calibrated, float(np.quantile(calibrated, THRESHOLD_Q)), None)
    assert with_calibration.watch is not None
    readings = [with_calibration.observe(s, {}) for s in _line(rng, 30, 1.3) if s <= 1.6]
    assert with_calibration.windows >= 1 and with_calibration.alarms >= 1 and any(r is not None and r.alarm for r in readings)

    fresh = StreamDrift(cfg, "p", [], None, None)  # no calibrated normals: the first 2 x window OK scores are the reference
    assert all(fresh.observe(s, {}) is None for s in _line(rng, 20))
    assert fresh.watch is not None and fresh.windows == 0
    for s in _line(rng, 30):
        fresh.observe(s, {})
    assert fresh.windows == 3 and fresh.alarms == 0
    for s in _line(rng, 20, 1.5):
        fresh.observe(s, {})
    assert fresh.alarms >= 1

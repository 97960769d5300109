"""Exact AUPRO against a brute-force reference (many thresholds, per-region overlap loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from components.eval.aupro import aupro, pro_curve


def brute_force_aupro(maps: np.ndarray, masks: np.ndarray, limit: float, n_thresholds: int = 1000) -> float:
    """Reference: PRO/FPR at many evenly spaced thresholds, region overlap computed region by region."""
    regions = []
    for i in range(masks.shape[0]):
        labels, count = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, labels == r) for r in range(1, count + 1)]
    normal = masks == 0
    thresholds = np.linspace(maps.max() + 1e-6, maps.min() - 1e-6, n_thresholds)
    fprs, pros = [], []
    for t in thresholds:
        above = maps >= t
        fprs.append((above & normal).sum() / normal.sum())
        pros.append(np.mean([above[i][region].mean() for i, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= limit
    x, y = fprs[keep], pros[keep]
    nxt = int(keep.sum())
    if nxt < len(fprs) and x[-1] < limit:  # interpolate the crossing of the limit
        y_lim = y[-1] + (pros[nxt] - y[-1]) * (limit - x[-1]) / (fprs[nxt] - x[-1])
        x, y = np.append(x, limit), np.append(y, y_lim)
    return float(np.trapezoid(y, x) / limit)


def _random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, size = 5, 24
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n - 2):  # the last two images are defect-free
        for _ in range(int(rng.integers(1, 4))):  # several regions per mask
            y, x = rng.integers(0, size - 6, 2)
            h, w = rng.integers(1, 7, 2)
            masks[i, y : y + h, x : x + w] = 1
    maps = rng.random(masks.shape) + masks * rng.uniform(0.2, 1.0)
    return np.round(maps, 2).astype(np.float32), masks  # rounding creates ties


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force(seed: int, limit: float) -> None:
    maps, masks = _random_case(seed)
    assert aupro(maps, masks, limit) == pytest.approx(brute_force_aupro(maps, masks, limit), abs=1e-3)


def test_aupro_perfect_and_inverted_maps() -> None:
    _, masks = _random_case(0)
    assert aupro(masks.astype(np.float32), masks, 0.3) == pytest.approx(1.0)
    assert aupro(-masks.astype(np.float32), masks, 0.3) == pytest.approx(0.0)


def test_pro_weights_every_region_equally() -> None:
    masks = np.zeros((2, 10, 10), dtype=np.uint8)
    masks[0, 0:2, 0:2] = 1  # small region (4 px)
    masks[0, 5:10, 5:10] = 1  # large region (25 px)
    maps = np.zeros_like(masks, dtype=np.float32)
    maps[0, 0:2, 0:2] = 1.0  # only the small region is found
    fpr, pro = pro_curve(maps, masks)
    # At the top threshold one of two regions is fully covered, no false positive: PRO 0.5.
    assert fpr[1] == 0.0 and pro[1] == pytest.approx(0.5)
    assert pro[-1] == pytest.approx(1.0) and fpr[-1] == pytest.approx(1.0)


def test_diagonal_touching_pixels_form_one_region() -> None:
    masks = np.zeros((1, 6, 6), dtype=np.uint8)
    masks[0, 1, 1] = masks[0, 2, 2] = 1  # 8-connected: one region
    maps = np.zeros_like(masks, dtype=np.float32)
    maps[0, 1, 1] = 1.0
    _, pro = pro_curve(maps, masks)
    assert pro[1] == pytest.approx(0.5)  # half of the single region


def test_aupro_undefined_without_defects_or_normals() -> None:
    assert math.isnan(aupro(np.random.rand(2, 4, 4), np.zeros((2, 4, 4)), 0.3))
    assert math.isnan(aupro(np.random.rand(1, 4, 4), np.ones((1, 4, 4)), 0.3))
    with pytest.raises(ValueError):
        aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), 0.0)

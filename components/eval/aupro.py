"""Exact, threshold-free area under the per-region-overlap (PRO) curve up to an FPR limit.

Definitions (Bergmann et al., MVTec AD, IJCV 2021):

- A *region* is one connected component (8-connectivity, as in the official MVTec AD
  evaluation code) of a ground-truth defect mask; an image may hold several.
- At threshold ``t``, ``PRO(t)`` is the mean over all regions of all images of the fraction
  of the region's pixels with score ``>= t``.
- ``FPR(t)`` is the fraction of all defect-free pixels (of every image, including images
  without any defect) with score ``>= t``. Defect-free images thus only contribute to FPR.

The curve is evaluated at every distinct score (ties are counted together), starting at
``(0, 0)``; the area under it for ``FPR in [0, limit]`` is integrated with the trapezoid
rule, the last segment linearly interpolated at ``limit``, and divided by ``limit`` so a
perfect map scores 1.0. Undefined inputs (no region, or no defect-free pixel) give NaN.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from components.eval.ranking import RankedScores, rank_scores

EIGHT_CONNECTED = np.ones((3, 3), dtype=np.int32)


def region_weights(masks: np.ndarray) -> np.ndarray:
    """Per-pixel PRO weight: ``1 / (n_regions * region_size)`` inside a region, 0 elsewhere.

    ``masks``: (N, H, W) {0, 1}. Summing the weights of pixels above a threshold gives PRO.
    """
    masks = np.asarray(masks).astype(bool, copy=False)
    labels = np.zeros(masks.shape, dtype=np.int32)
    n_regions = 0
    for i in range(masks.shape[0]):
        if not masks[i].any():
            continue
        image_labels, count = ndimage.label(masks[i], structure=EIGHT_CONNECTED)
        labels[i] = np.where(image_labels > 0, image_labels + n_regions, 0)
        n_regions += int(count)
    weights = np.zeros(masks.shape, dtype=np.float64)
    if n_regions == 0:
        return weights
    sizes = np.bincount(labels.ravel(), minlength=n_regions + 1).astype(np.float64)
    per_region = np.zeros_like(sizes)
    per_region[1:] = 1.0 / (n_regions * sizes[1:])
    weights = per_region[labels]
    return weights


def pro_curve(
    anomaly_maps: np.ndarray,
    masks: np.ndarray,
    ranked: RankedScores | None = None,
    defect_counts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct score, highest threshold first, with (0, 0) prepended.

    ``ranked`` (the ranking of the maps) and ``defect_counts`` (``ranked.cumulative(masks)``)
    may be passed when already computed. Returns empty arrays when the curve is undefined
    (no region or no defect-free pixel).
    """
    masks = np.asarray(masks).astype(bool, copy=False)
    n_normal = int(masks.size - np.count_nonzero(masks))
    if n_normal == 0 or not masks.any():
        return np.zeros(0), np.zeros(0)
    ranked = ranked if ranked is not None else rank_scores(anomaly_maps)
    defect_counts = defect_counts if defect_counts is not None else ranked.cumulative(masks)
    fpr = (ranked.block_ends + 1 - defect_counts) / n_normal
    pro = ranked.cumulative(region_weights(masks))
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], np.minimum(pro, 1.0)])


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the piecewise-linear curve (x ascending) for ``x in [0, x_max]``."""
    inside = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:inside], y[:inside]
    if inside < x.size and xs[-1] < x_max:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.append(xs, x_max), np.append(ys, y_at)
    return float(np.trapezoid(ys, xs))


def aupro(
    anomaly_maps: np.ndarray,
    masks: np.ndarray,
    fpr_limit: float = 0.3,
    ranked: RankedScores | None = None,
    defect_counts: np.ndarray | None = None,
) -> float:
    """Normalised area under the PRO curve for FPR in [0, fpr_limit]; in [0, 1], NaN if undefined."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    maps = np.asarray(anomaly_maps)
    if maps.shape != np.asarray(masks).shape:
        raise ValueError(f"anomaly maps {maps.shape} and masks {np.asarray(masks).shape} differ in shape")
    fpr, pro = pro_curve(maps, masks, ranked, defect_counts)
    if fpr.size == 0:
        return float("nan")
    return area_up_to(fpr, pro, fpr_limit) / fpr_limit

"""Per-product detection and localisation metrics.

All curve metrics are computed exactly at every distinct score (ties grouped), vectorised:

- AUROC: trapezoid area under the ROC curve starting at (0, 0) (equals scikit-learn's
  ``roc_auc_score``).
- AP: ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds, highest first, ``R_0 = 0``
  (scikit-learn's ``average_precision_score``; no interpolation).
- F1-max: the best F1 over all thresholds.
- AUPRO: see ``components.eval.aupro``.

Image metrics use one score per test image; pixel metrics pool every pixel of every test image
of the product at ``EvalConfig.pixel_resolution`` (None = the maps' own size, the model input
size). A metric that is undefined (one class only, no masks, no routing) is NaN, never an error.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from components.config import EvalConfig
from components.eval.aupro import aupro
from components.eval.ranking import RankedScores, rank_scores
from components.types import ImageBatch, Prediction

METRIC_KEYS: tuple[str, ...] = (
    "image_auroc",
    "image_ap",
    "pixel_auroc",
    "pixel_ap",
    "aupro",
    "image_f1max",
    "pixel_f1max",
)
"""Metric keys of the accuracy matrix and of ``metrics.json``, in display order."""

TASK_METRIC_KEYS: tuple[str, ...] = METRIC_KEYS + ("routing_accuracy",)
"""Keys returned by ``task_metrics``."""

NAN = float("nan")


def _curve_metrics(
    labels: np.ndarray, scores: np.ndarray, ranked: RankedScores | None = None, tps: np.ndarray | None = None
) -> dict[str, float]:
    """AUROC, AP and F1-max of binary ``labels`` against ``scores`` (NaN when one class only).

    ``ranked`` (ranking of ``scores``) and ``tps`` (``ranked.cumulative(labels)``) may be given.
    """
    labels = np.asarray(labels).ravel().astype(bool, copy=False)
    if labels.size != np.asarray(scores).size:
        raise ValueError(f"{labels.size} labels but {np.asarray(scores).size} scores")
    ranked = ranked if ranked is not None else rank_scores(scores)
    tps = tps if tps is not None else ranked.cumulative(labels)
    fps = ranked.block_ends + 1 - tps
    n_pos = int(tps[-1]) if tps.size else 0
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return {"auroc": NAN, "ap": NAN, "f1max": NAN}
    tpr = np.concatenate([[0.0], tps / n_pos])
    fpr = np.concatenate([[0.0], fps / n_neg])
    precision = tps / (tps + fps)
    ap = float(np.sum(np.diff(tpr) * precision))
    f1 = 2.0 * tps / (tps + fps + n_pos)
    return {"auroc": float(np.trapezoid(tpr, fpr)), "ap": ap, "f1max": float(f1.max())}


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; NaN when ``labels`` hold one class only."""
    return _curve_metrics(labels, scores)["auroc"]


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (area under the step precision-recall curve); NaN for one class."""
    return _curve_metrics(labels, scores)["ap"]


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 score over all thresholds; NaN for one class."""
    return _curve_metrics(labels, scores)["f1max"]


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """``image_auroc``, ``image_ap``, ``image_f1max`` of per-image scores."""
    curve = _curve_metrics(labels, np.asarray(scores, dtype=np.float64))
    return {"image_auroc": curve["auroc"], "image_ap": curve["ap"], "image_f1max": curve["f1max"]}


def pixel_metrics(anomaly_maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> dict[str, float]:
    """``pixel_auroc``, ``pixel_ap``, ``pixel_f1max``, ``aupro`` pooled over all pixels (one sort)."""
    maps = np.asarray(anomaly_maps, dtype=np.float32)
    masks = np.asarray(masks).astype(bool, copy=False)
    if maps.shape != masks.shape:
        raise ValueError(f"anomaly maps {maps.shape} and masks {masks.shape} differ in shape")
    ranked = rank_scores(maps)
    defect_counts = ranked.cumulative(masks)
    curve = _curve_metrics(masks, maps, ranked, defect_counts)
    return {
        "pixel_auroc": curve["auroc"],
        "pixel_ap": curve["ap"],
        "pixel_f1max": curve["f1max"],
        "aupro": aupro(maps, masks, fpr_limit, ranked=ranked, defect_counts=defect_counts),
    }


def resize_for_pixel_metrics(
    anomaly_maps: torch.Tensor, masks: torch.Tensor, resolution: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Bring maps (bilinear) and masks (nearest) to ``resolution`` (None = the masks' size)."""
    size = tuple(masks.shape[-2:]) if resolution is None else (resolution, resolution)
    maps = anomaly_maps.detach().float().cpu()
    if tuple(maps.shape[-2:]) != size:
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    mask_t = masks.detach().cpu()
    if tuple(mask_t.shape[-2:]) != size:
        mask_t = F.interpolate(mask_t[:, None].float(), size=size, mode="nearest")[:, 0]
    return maps.numpy(), (mask_t > 0).numpy()


def routing_accuracy(routed_tasks: list[str], products: list[str], task_of_product: dict[str, str]) -> float:
    """Fraction of images routed to the task containing their product; NaN when nothing was routed."""
    if not routed_tasks or len(routed_tasks) != len(products):
        return NAN
    hits = sum(routed == task_of_product.get(product) for routed, product in zip(routed_tasks, products))
    return hits / len(products)


def task_metrics(
    pred: Prediction, batch: ImageBatch, task_of_product: dict[str, str], cfg: EvalConfig
) -> dict[str, float]:
    """All metrics of one product's test set (keys ``TASK_METRIC_KEYS``; NaN when undefined)."""
    n = len(batch)
    if int(pred.image_scores.shape[0]) != n or int(pred.anomaly_maps.shape[0]) != n:
        raise ValueError(
            f"prediction covers {int(pred.image_scores.shape[0])} images, batch has {n}"
        )
    out: dict[str, float] = {key: NAN for key in TASK_METRIC_KEYS}
    if batch.labels is not None:
        labels = batch.labels.detach().cpu().numpy()
        out.update(image_metrics(labels, pred.image_scores.detach().double().cpu().numpy()))
    if batch.masks is not None:
        maps, masks = resize_for_pixel_metrics(pred.anomaly_maps, batch.masks, cfg.pixel_resolution)
        out.update(pixel_metrics(maps, masks, cfg.aupro_fpr_limit))
    out["routing_accuracy"] = routing_accuracy(pred.routed_tasks, batch.products, task_of_product)
    return {key: (NAN if value is None or math.isnan(value) else float(value)) for key, value in out.items()}

"""Binary decision thresholds, taken from held-out TRAINING normals only (never test labels).

The image threshold is the ``cfg.eval.threshold_quantile`` quantile of the image scores of the
held-out normal training images; the pixel threshold the same quantile of all their anomaly-map
pixels. They drive overlay contours and the optional ``*_at_threshold`` metrics.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from components.config import Config
from components.errors import ContadError
from components.eval.evaluate import predict_batch
from components.methods.base import ContinualMethod
from components.types import ImageBatch, Prediction


@dataclass(frozen=True)
class Thresholds:
    """Image- and pixel-level score thresholds and where they came from."""

    image: float
    pixel: float
    quantile: float
    n_images: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def quantile_threshold(normal_scores: np.ndarray | torch.Tensor, quantile: float) -> float:
    """The ``quantile`` of normal scores (linear interpolation)."""
    if not 0.0 < quantile <= 1.0:
        raise ContadError(f"eval.threshold_quantile must be in (0, 1], got {quantile}")
    values = np.asarray(normal_scores.detach().cpu() if isinstance(normal_scores, torch.Tensor) else normal_scores)
    values = values.astype(np.float64).ravel()
    if values.size == 0:
        raise ContadError("no held-out normal scores to take a threshold from (data.heldout_fraction too small?)")
    return float(np.quantile(values, quantile))


def thresholds_from_prediction(prediction: Prediction, quantile: float) -> Thresholds:
    """Thresholds from the prediction on held-out normal training images."""
    return Thresholds(
        image=quantile_threshold(prediction.image_scores, quantile),
        pixel=quantile_threshold(prediction.anomaly_maps, quantile),
        quantile=quantile,
        n_images=int(prediction.image_scores.shape[0]),
    )


def heldout_thresholds(method: ContinualMethod, heldout: ImageBatch, cfg: Config) -> Thresholds:
    """Score the held-out normal training images of the learned tasks and take thresholds.

    ``heldout`` must be training normals: a batch carrying any defective label is refused.
    """
    if heldout.labels is not None and bool((heldout.labels != 0).any()):
        raise ContadError("thresholds must come from held-out normal training images; the batch holds defective labels")
    task_of_product = {p: p for p in heldout.products}
    if method.uses_task_labels:
        task_of_product = {p: next((t for t in method.tasks if p in t.split("+")), p) for p in heldout.products}
    prediction = predict_batch(method, heldout, task_of_product, cfg.eval.batch_size)
    return thresholds_from_prediction(prediction, cfg.eval.threshold_quantile)


def metrics_at_threshold(prediction: Prediction, batch: ImageBatch, thresholds: Thresholds) -> dict[str, float]:
    """Image TPR/FPR/F1 and pixel F1 of test images at fixed thresholds (NaN when undefined)."""
    out = {"image_tpr_at_threshold": math.nan, "image_fpr_at_threshold": math.nan,
           "image_f1_at_threshold": math.nan, "pixel_f1_at_threshold": math.nan}
    if batch.labels is not None:
        truth = batch.labels.cpu().numpy().astype(bool)
        decided = prediction.image_scores.cpu().numpy() >= thresholds.image
        out.update(_binary_rates(truth, decided, "image"))
    if batch.masks is not None and bool(batch.masks.any()):
        truth_px = batch.masks.cpu().numpy().astype(bool)
        decided_px = prediction.anomaly_maps.cpu().numpy() >= thresholds.pixel
        if truth_px.shape == decided_px.shape:
            out["pixel_f1_at_threshold"] = _binary_rates(truth_px, decided_px, "pixel")["pixel_f1_at_threshold"]
    return out


def _binary_rates(truth: np.ndarray, decided: np.ndarray, level: str) -> dict[str, float]:
    tp = int(np.count_nonzero(truth & decided))
    fp = int(np.count_nonzero(~truth & decided))
    pos, neg = int(np.count_nonzero(truth)), int(truth.size - np.count_nonzero(truth))
    f1 = 2 * tp / (tp + fp + pos) if pos else math.nan
    return {
        f"{level}_tpr_at_threshold": tp / pos if pos else math.nan,
        f"{level}_fpr_at_threshold": fp / neg if neg else math.nan,
        f"{level}_f1_at_threshold": f1,
    }

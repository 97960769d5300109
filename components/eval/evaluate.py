"""Run a continual method over test images of every product and score them.

Images are passed to ``method.predict`` in mini-batches with no product label; only methods
declaring ``uses_task_labels`` (the per-task oracle) receive the true task names.
"""

from __future__ import annotations

import logging

import torch

from components.config import Config
from components.errors import ContadError
from components.eval.metrics import task_metrics
from components.methods.base import ContinualMethod
from components.progress import progress_bar
from components.types import ImageBatch, Prediction

log = logging.getLogger(__name__)


def concat_predictions(parts: list[Prediction]) -> Prediction:
    """One ``Prediction`` from consecutive mini-batch predictions (moved to CPU)."""
    return Prediction(
        image_scores=torch.cat([p.image_scores.detach().float().cpu().reshape(-1) for p in parts]),
        anomaly_maps=torch.cat([p.anomaly_maps.detach().float().cpu() for p in parts]),
        routed_tasks=[t for p in parts for t in p.routed_tasks],
    )


def predict_batch(
    method: ContinualMethod, batch: ImageBatch, task_of_product: dict[str, str], batch_size: int
) -> Prediction:
    """Predict ``batch`` in mini-batches of ``batch_size`` images."""
    if batch_size < 1:
        raise ContadError(f"eval.batch_size must be >= 1, got {batch_size}")
    parts = []
    with torch.no_grad():
        for start in range(0, len(batch), batch_size):
            images = batch.images[start : start + batch_size]
            true_tasks = [task_of_product[p] for p in batch.products[start : start + batch_size]] if method.uses_task_labels else None
            depth = batch.depth[start : start + batch_size] if method.uses_depth and batch.depth is not None else None
            parts.append(method.predict(images, true_tasks=true_tasks, depth=depth))  # a depth method checks that it got its point clouds
    prediction = concat_predictions(parts)
    if prediction.image_scores.shape[0] != len(batch) or prediction.anomaly_maps.shape[0] != len(batch):
        raise ContadError(f"method {method.name!r} returned {prediction.image_scores.shape[0]} scores for {len(batch)} images")
    return prediction


def evaluate_tasks(
    method: ContinualMethod, batches: dict[str, ImageBatch], task_of_product: dict[str, str], cfg: Config
) -> tuple[dict[str, dict[str, float]], dict[str, Prediction]]:
    """Metrics per product (``task_metrics`` keys) and the predictions (for overlays)."""
    unknown = sorted(set(batches) - set(task_of_product))
    if unknown:
        raise ContadError(f"products {unknown} have test images but no task in task_of_product {task_of_product}")
    metrics: dict[str, dict[str, float]] = {}
    predictions: dict[str, Prediction] = {}
    for product, batch in progress_bar(batches.items(), desc="evaluate", unit="product", leave=False):
        prediction = predict_batch(method, batch, task_of_product, cfg.eval.batch_size)
        metrics[product] = task_metrics(prediction, batch, task_of_product, cfg.eval)
        predictions[product] = prediction
        log.info(
            "%s: image AUROC %.3f, pixel AUROC %.3f, AUPRO %.3f, routing %.2f (%d images)",
            product,
            metrics[product]["image_auroc"],
            metrics[product]["pixel_auroc"],
            metrics[product]["aupro"],
            metrics[product]["routing_accuracy"],
            len(batch),
        )
    return metrics, predictions

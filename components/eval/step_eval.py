"""Evaluation of a saved method state on the manifest's images, as the deployed detector scores them.

Every function reads the state's own configuration (``stored_config``) and its calibration: threshold-free
test metrics per product, OK/NG metrics at the per-task thresholds, the false-reject rate on the reserved
normals of products without test images, and a few examples per product for the report figures.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd
import torch

from components.config import Config
from components.data.loading import depth_of, load_images, reserve_normals, test_batch
from components.data.manifest import untested_products
from components.eval.continual import RESERVED_FRR
from components.eval.evaluate import evaluate_tasks, predict_batch
from components.eval.operating_points import operating_point_metrics
from components.eval.thresholds import Calibration, decision_metrics, read_calibration
from components.methods.base import ContinualMethod
from components.methods.loading import load_method, stored_config
from components.types import ImageBatch, Prediction

log = logging.getLogger(__name__)


def evaluate_learned(cfg: Config, method_dir: Path, manifest: pd.DataFrame, task_of_product: dict[str, str]) -> dict[str, dict[str, float]]:
    """Metrics of every product in ``task_of_product`` (all learned so far); images carry no product label.

    Products without test images get only ``RESERVED_FRR`` (``evaluate_reserved``), no AUROC.
    """
    cfg = stored_config(cfg, Path(method_dir))
    untested = set(untested_products(manifest[manifest["product"].isin(list(task_of_product))]))
    batches = {p: test_batch(manifest, p, cfg.data.image_size) for p in task_of_product if p not in untested}
    metrics = evaluate_batches(cfg, Path(method_dir), batches, task_of_product) if batches else {}
    metrics.update(evaluate_reserved(cfg, Path(method_dir), manifest, sorted(untested), task_of_product))
    return {p: metrics[p] for p in task_of_product}


def evaluate_reserved(cfg: Config, method_dir: Path, manifest: pd.DataFrame, products: list[str], task_of_product: dict[str, str]) -> dict[str, dict[str, float]]:
    """``{product: {RESERVED_FRR: share of its reserved normals decided NG}}`` for products without test images.

    The deployed rule: each image is routed by its own content and compared with the threshold of
    the task it was routed to (``decision_metrics``). The reserved normals were never trained on
    and never set a threshold (``reserve_normals``). NaN without reserved normals or thresholds.
    """
    if not products:
        return {}
    cfg = stored_config(cfg, Path(method_dir))
    _, reserved = reserve_normals(manifest[manifest["product"].isin(products)], cfg.promotion.reserved_normals_fraction, cfg.seed)
    calibration = deployed_calibration(cfg, Path(method_dir))
    method = load_method(cfg, Path(method_dir)) if calibration is not None and not reserved.empty else None
    metrics: dict[str, dict[str, float]] = {}
    for product in products:
        rows = reserved[reserved["product"] == product]
        metrics[product] = {RESERVED_FRR: math.nan}
        if method is None or rows.empty:
            log.warning("product %s: no reserved normals or no decision thresholds, so no false-reject rate", product)
            continue
        batch = ImageBatch(images=load_images(list(rows["image_path"]), cfg.data.image_size), products=list(rows["product"]),
                           paths=list(rows["image_path"]), labels=torch.zeros(len(rows), dtype=torch.long), depth=depth_of(rows, cfg.data.image_size))
        prediction = predict_batch(method, batch, task_of_product, cfg.eval.batch_size)
        metrics[product][RESERVED_FRR] = decision_metrics(prediction, batch, calibration)["false_reject_rate"]  # type: ignore[arg-type]
        log.info("%s (normal images only): %.3f of %d reserved normals decided NG", product, metrics[product][RESERVED_FRR], len(rows))
    return metrics


def deployed_calibration(cfg: Config, method_dir: Path) -> Calibration | None:
    """The state's calibration with thresholds at ``decision.target_fpr`` of ``cfg``: the thresholds a detector
    loaded with this configuration decides with (``Detector``), so evaluation and deployment agree."""
    calibration = read_calibration(method_dir)
    return calibration.at_target(cfg.decision.target_fpr) if calibration is not None else None


def evaluate_batches(cfg: Config, method_dir: Path, batches: dict[str, ImageBatch], task_of_product: dict[str, str]) -> dict[str, dict[str, float]]:
    """Threshold-free metrics of each product's test batch, plus OK/NG metrics at the deployed per-task thresholds and
    at the thresholds of every other promise in ``decision.operating_points`` (``components/eval/operating_points.py``)."""
    cfg = stored_config(cfg, Path(method_dir))
    method = load_method(cfg, method_dir)
    metrics, predictions = evaluate_tasks(method, batches, task_of_product, cfg)
    calibration = deployed_calibration(cfg, Path(method_dir))
    if calibration is not None:
        for product, prediction in predictions.items():
            metrics[product].update(decision_metrics(prediction, batches[product], calibration))
            metrics[product].update(operating_point_metrics(prediction, batches[product], calibration, cfg.decision.operating_points))
    return metrics


def overlay_examples(cfg: Config, method: ContinualMethod, manifest: pd.DataFrame, task_of_product: dict[str, str]) -> dict[str, tuple[ImageBatch, Prediction]]:
    """A few test images per product for the report figures: defective ones and at least one good one
    (so false rejects are visible too)."""
    examples: dict[str, tuple[ImageBatch, Prediction]] = {}
    n = cfg.eval.overlays_per_task
    n_good = max(1, n // 3)
    for product in task_of_product:
        rows = manifest[(manifest["product"] == product) & (manifest["split"] == "test")].sort_values("image_path")
        good, defective = rows[rows["label"] == 0], rows[rows["label"] != 0]
        n_defective = min(len(defective), max(n - min(n_good, len(good)), 0))
        chosen = pd.concat([defective.iloc[:n_defective], good.iloc[: n - n_defective]])
        if chosen.empty:
            continue
        batch = test_batch(chosen, product, cfg.data.image_size)
        examples[product] = (batch, predict_batch(method, batch, task_of_product, cfg.eval.batch_size))
    return examples

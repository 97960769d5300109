"""Per-task decision thresholds, calibrated on held-out TRAINING normals only (never test data).

For every learned task (= product in the sequential protocol) the held-out normal training
images of its products are scored by the method itself (routed by their own content, no task
label). Then

- image threshold ``t_img``: the ``1 - decision.target_fpr`` quantile of their image scores,
  taken as an order statistic (``method="higher"``), so at most ``target_fpr`` of the held-out
  normals score strictly above it; a part is NG when ``score > t_img``;
- pixel threshold ``t_px``: the ``1 - decision.pixel_fpr`` quantile of all their anomaly-map
  pixels; it draws the defect contour on heat maps.

With ``n`` held-out images the false-reject rate can only be controlled to ``1/n``: fewer than
``1/target_fpr`` images make ``t_img`` their maximum (noted as ``n_images`` in the file).

The calibration is written as ``calibration.json`` into the method directory, so it is part of
the content-hashed memory-bank version and of every registered model built from it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.atomic import atomic_write_json
from components.config import Config
from components.errors import ContadError
from components.eval.evaluate import predict_batch
from components.methods.base import ContinualMethod
from components.types import ImageBatch, Prediction

CALIBRATION_FILE = "calibration.json"
OK, NG = "OK", "NG"


@dataclass(frozen=True)
class TaskThreshold:
    """Image- and pixel-level thresholds of one task and how many held-out normals set them."""

    image: float
    pixel: float
    n_images: int


@dataclass(frozen=True)
class Calibration:
    """Thresholds per task, the target rates they were set for, and each product's task."""

    target_fpr: float
    pixel_fpr: float
    tasks: dict[str, TaskThreshold]
    task_of_product: dict[str, str] = field(default_factory=dict)

    def for_task(self, task: str) -> TaskThreshold:
        """Thresholds of ``task`` (the task an image was routed to)."""
        if task not in self.tasks:
            raise ContadError(f"no calibrated threshold for task {task!r} (calibrated: {sorted(self.tasks)})")
        return self.tasks[task]

    def for_product(self, product: str) -> TaskThreshold:
        """Thresholds of the task that learned ``product``."""
        return self.for_task(self.task_of_product.get(product, product))

    def decide(self, score: float, task: str) -> str:
        """``"NG"`` when ``score`` is above the task's image threshold, else ``"OK"``."""
        return NG if score > self.for_task(task).image else OK

    def to_dict(self) -> dict[str, Any]:
        return {"target_fpr": self.target_fpr, "pixel_fpr": self.pixel_fpr,
                "tasks": {t: asdict(v) for t, v in self.tasks.items()}, "task_of_product": dict(self.task_of_product)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Calibration:
        try:
            tasks = {str(t): TaskThreshold(float(v["image"]), float(v["pixel"]), int(v["n_images"])) for t, v in doc["tasks"].items()}
            return cls(float(doc["target_fpr"]), float(doc["pixel_fpr"]), tasks, {str(k): str(v) for k, v in (doc.get("task_of_product") or {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ContadError(f"malformed calibration ({exc!r})") from exc


def quantile_threshold(normal_scores: np.ndarray | torch.Tensor, rate: float, key: str = "decision.target_fpr") -> float:
    """The smallest normal score with at most ``rate`` of ``normal_scores`` strictly above it."""
    if not 0.0 <= rate < 1.0:
        raise ContadError(f"{key} must be in [0, 1), got {rate}")
    values = normal_scores.detach().cpu().numpy() if isinstance(normal_scores, torch.Tensor) else np.asarray(normal_scores)
    values = values.astype(np.float64).ravel()
    if values.size == 0:
        raise ContadError("no held-out normal scores to take a threshold from (data.heldout_fraction too small?)")
    return float(np.quantile(values, 1.0 - rate, method="higher"))


def calibrate(prediction: Prediction, products: list[str], task_of_product: dict[str, str], target_fpr: float, pixel_fpr: float) -> Calibration:
    """Per-task thresholds from predictions on held-out normal training images of ``products``.

    Images are grouped by the task that learned their product (the distribution the threshold
    must bound), whatever task the method routed them to.
    """
    if len(products) != int(prediction.image_scores.shape[0]):
        raise ContadError(f"calibration: {len(products)} products for {prediction.image_scores.shape[0]} scores")
    scores = prediction.image_scores.detach().cpu().numpy()
    maps = prediction.anomaly_maps.detach().cpu().numpy()
    tasks: dict[str, TaskThreshold] = {}
    for task in sorted({task_of_product[p] for p in products}):
        rows = np.array([task_of_product[p] == task for p in products])
        tasks[task] = TaskThreshold(
            image=quantile_threshold(scores[rows], target_fpr),
            pixel=quantile_threshold(maps[rows], pixel_fpr, key="decision.pixel_fpr"),
            n_images=int(rows.sum()),
        )
    return Calibration(target_fpr, pixel_fpr, tasks, {p: task_of_product[p] for p in sorted(set(products))})


def check_heldout(batch: ImageBatch) -> None:
    """Refuse a calibration batch that carries any defective label (it must be training normals)."""
    if batch.labels is not None and bool((batch.labels != 0).any()):
        raise ContadError("thresholds must come from held-out normal training images; the batch holds defective labels")


def learned_task_of_product(method: ContinualMethod) -> dict[str, str]:
    """``{product: task}`` of every task ``method`` has learned (task names join products with "+")."""
    return {product: task for task in method.tasks for product in task.split("+")}


def calibrate_heldout(method: ContinualMethod, heldout: ImageBatch, cfg: Config) -> Calibration:
    """Score held-out normal TRAINING images of learned products and calibrate per-task thresholds."""
    check_heldout(heldout)
    task_of_product = learned_task_of_product(method)
    unknown = sorted(set(heldout.products) - set(task_of_product))
    if unknown:
        raise ContadError(f"calibration images of products {unknown} that the method has not learned (tasks: {method.tasks})")
    prediction = predict_batch(method, heldout, task_of_product, cfg.eval.batch_size)
    return calibrate(prediction, list(heldout.products), task_of_product, cfg.decision.target_fpr, cfg.decision.pixel_fpr)


def write_calibration(method_dir: Path, calibration: Calibration) -> Path:
    """Write ``method_dir/calibration.json`` atomically."""
    path = Path(method_dir) / CALIBRATION_FILE
    atomic_write_json(path, calibration.to_dict())
    return path


def read_calibration(method_dir: Path) -> Calibration | None:
    """The calibration stored in ``method_dir`` (None when the state has none)."""
    path = Path(method_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ContadError(f"{path}: unreadable calibration ({exc})") from exc
    try:
        return Calibration.from_dict(doc)
    except ContadError as exc:
        raise ContadError(f"{path}: {exc}") from exc


def routed_thresholds(prediction: Prediction, calibration: Calibration) -> np.ndarray:
    """``(B,)`` image threshold of the task each image was routed to (the deployed decision rule)."""
    return np.array([calibration.for_task(t).image for t in prediction.routed_tasks], dtype=np.float64)


def decision_metrics(prediction: Prediction, batch: ImageBatch, calibration: Calibration) -> dict[str, float]:
    """Escape and false-reject rates of test images at the deployed per-task thresholds.

    ``escape_rate``: defective images decided OK / defective images. ``false_reject_rate``: good
    images decided NG / good images. NaN when a class is absent.
    """
    out = {"escape_rate": math.nan, "false_reject_rate": math.nan}
    if batch.labels is None:
        return out
    defective = batch.labels.cpu().numpy().astype(bool)
    rejected = prediction.image_scores.detach().cpu().numpy().astype(np.float64) > routed_thresholds(prediction, calibration)
    if defective.any():
        out["escape_rate"] = float(np.count_nonzero(defective & ~rejected) / np.count_nonzero(defective))
    if (~defective).any():
        out["false_reject_rate"] = float(np.count_nonzero(~defective & rejected) / np.count_nonzero(~defective))
    return out

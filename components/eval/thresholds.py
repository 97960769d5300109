"""Per-task decision thresholds from score samples of normal TRAINING images only (never test data).

For every learned task the calibration keeps a *sample* of image scores of normal images the task's
scoring state was not fitted on, on the scale ``predict`` reports:

- held-out normal training images of every learned product, grouped by the task ``predict`` ROUTES
  them to (the deployed rule looks a threshold up by the routed task, so that is the distribution the
  threshold must bound; a task that no held-out normal is routed to falls back to its own products'
  held-out normals);
- for methods that can score their own training images without them (``ContinualMethod.calibration_scores``,
  e.g. leave-one-out against a memory bank), every training image of the task, scored once when the
  task is learned and carried to later steps while ``frozen_task_memory`` keeps them valid.

The image threshold is the ``1 - decision.target_fpr`` quantile of the sample as an order statistic
(``method="higher"``): at most ``target_fpr`` of the sample scores strictly above it, and a part is NG
when ``score > threshold``. Because the sample is stored, ``decision.target_fpr`` can be changed when a
detector is loaded (``Calibration.at_target``) without retraining. With ``n`` scores the false-reject
rate can only be controlled to ``1/n``: a smaller target makes the threshold the sample's maximum, and
the calibration says so (``promised_fpr``) instead of promising the target.

The pixel threshold (the heat-map contour) is the ``1 - decision.pixel_fpr`` quantile of the held-out
normals' map pixels. The escape-rate estimate is the share of synthetic defects pasted on the held-out
normals (``components.data.synthetic.pasted``) that the deployed rule would pass as OK.

Written as ``calibration.json`` into the method directory: part of the content-hashed bank version and
of every registered model built from it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from components.atomic import atomic_write_json
from components.config import Config
from components.data.loading import depth_of, load_images, train_split
from components.data.protocol import task_products
from components.data.synthetic.pasted import synthetic_defect_batch
from components.errors import ContadError
from components.eval.evaluate import predict_batch
from components.methods.base import ContinualMethod
from components.types import ImageBatch, Prediction, TaskData

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
OK, NG = "OK", "NG"


@dataclass(frozen=True)
class TaskThreshold:
    """Decision thresholds of one task at the calibration's target, with what they can promise.

    ``n_images``: calibration normals behind ``image``; ``promised_fpr``: the false-reject rate the
    threshold controls, ``max(target_fpr, 1/n)``; ``escape_estimate``: share of synthetic defects routed
    to the task at or below ``image`` (NaN without synthetic defects).
    """

    image: float
    pixel: float
    n_images: int
    promised_fpr: float = math.nan
    escape_estimate: float = math.nan


@dataclass(frozen=True)
class TaskSample:
    """The score sample one task's thresholds are taken from (see the module docstring)."""

    heldout: tuple[float, ...]  # held-out normals routed to the task (or its own, as a fallback)
    leave_out: tuple[float, ...]  # the task's training images scored without themselves
    pixel: float  # pixel threshold at the calibration's ``pixel_fpr``
    synthetic: tuple[float, ...] = ()  # synthetic defects routed to the task
    fixed_image: float | None = None  # only for a calibration written before samples were stored

    @property
    def normal(self) -> np.ndarray:
        return np.asarray(self.heldout + self.leave_out, dtype=np.float64)

    def threshold(self, target_fpr: float) -> TaskThreshold:
        """The task's thresholds at ``target_fpr``."""
        normal = self.normal
        if normal.size == 0:
            if self.fixed_image is None:
                raise ContadError("calibration: a task has no normal scores to take a threshold from")
            return TaskThreshold(self.fixed_image, self.pixel, 0)
        image = quantile_threshold(normal, target_fpr)
        synthetic = np.asarray(self.synthetic, dtype=np.float64)
        escape = float(np.mean(synthetic <= image)) if synthetic.size else math.nan
        return TaskThreshold(image, self.pixel, int(normal.size), max(target_fpr, 1.0 / normal.size), escape)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"heldout": list(self.heldout), "leave_out": list(self.leave_out), "pixel": self.pixel, "synthetic": list(self.synthetic)}
        if self.fixed_image is not None:
            doc["fixed_image"] = self.fixed_image
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> TaskSample:
        return cls(tuple(map(float, doc.get("heldout") or [])), tuple(map(float, doc.get("leave_out") or [])), float(doc["pixel"]),
                   tuple(map(float, doc.get("synthetic") or [])), None if doc.get("fixed_image") is None else float(doc["fixed_image"]))


@dataclass(frozen=True)
class Calibration:
    """Score samples per task, the target rates thresholds are taken at, and each product's task."""

    target_fpr: float
    pixel_fpr: float
    samples: dict[str, TaskSample]
    task_of_product: dict[str, str] = field(default_factory=dict)

    @cached_property
    def tasks(self) -> dict[str, TaskThreshold]:
        """Thresholds of every task at ``target_fpr`` (derived once: every decision looks them up)."""
        return {task: sample.threshold(self.target_fpr) for task, sample in self.samples.items()}

    @property
    def retargetable(self) -> bool:
        """Whether thresholds can be taken at another target (every task stores its score sample)."""
        return all(s.normal.size > 0 for s in self.samples.values())

    def at_target(self, target_fpr: float) -> Calibration:
        """The same samples with thresholds at ``target_fpr`` (``decision.target_fpr`` chosen at load time)."""
        if target_fpr == self.target_fpr:
            return self
        if not 0.0 <= target_fpr < 1.0:
            raise ContadError(f"decision.target_fpr must be in [0, 1), got {target_fpr}")
        if not self.retargetable:
            raise ContadError("decision.target_fpr: this calibration stores no score samples (written by an older contad); "
                              "retrain to change the target at load time")
        return replace(self, target_fpr=float(target_fpr))

    def for_task(self, task: str) -> TaskThreshold:
        """Thresholds of ``task`` (the task an image was routed to)."""
        if task not in self.samples:
            raise ContadError(f"no calibrated threshold for task {task!r} (calibrated: {sorted(self.samples)})")
        return self.tasks[task]

    def for_product(self, product: str) -> TaskThreshold:
        """Thresholds of the task that learned ``product``."""
        return self.for_task(self.task_of_product.get(product, product))

    def decide(self, score: float, task: str) -> str:
        """``"NG"`` when ``score`` is above the task's image threshold, else ``"OK"``."""
        return NG if score > self.for_task(task).image else OK

    def promises(self) -> list[str]:
        """One line per task whose calibration sample is too small for the target rate."""
        lines = []
        for task, t in self.tasks.items():
            if t.n_images and t.promised_fpr > self.target_fpr:
                lines.append(f"task {task}: {t.n_images} calibration normals control the false-reject rate only to 1/n = "
                             f"{t.promised_fpr:.3g}, not decision.target_fpr {self.target_fpr:.3g}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the samples, plus the thresholds at ``target_fpr`` for readers."""
        return {"target_fpr": self.target_fpr, "pixel_fpr": self.pixel_fpr,
                "tasks": {t: _finite(vars(v)) for t, v in self.tasks.items()},
                "samples": {t: s.to_dict() for t, s in self.samples.items()},
                "task_of_product": dict(self.task_of_product)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Calibration:
        try:
            if "samples" in doc:
                samples = {str(t): TaskSample.from_dict(s) for t, s in doc["samples"].items()}
            else:  # before samples were stored: fixed thresholds only
                samples = {str(t): TaskSample((), (), float(v["pixel"]), (), float(v["image"])) for t, v in doc["tasks"].items()}
            return cls(float(doc["target_fpr"]), float(doc["pixel_fpr"]), samples, {str(k): str(v) for k, v in (doc.get("task_of_product") or {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ContadError(f"malformed calibration ({exc!r})") from exc


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def quantile_threshold(normal_scores: np.ndarray | torch.Tensor, rate: float, key: str = "decision.target_fpr") -> float:
    """The smallest normal score with at most ``rate`` of ``normal_scores`` strictly above it."""
    if not 0.0 <= rate < 1.0:
        raise ContadError(f"{key} must be in [0, 1), got {rate}")
    values = normal_scores.detach().cpu().numpy() if isinstance(normal_scores, torch.Tensor) else np.asarray(normal_scores)
    values = values.astype(np.float64).ravel()
    if values.size == 0:
        raise ContadError("no held-out normal scores to take a threshold from (data.heldout_fraction too small?)")
    return float(np.quantile(values, 1.0 - rate, method="higher"))


def _scores(values: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def calibrate(prediction: Prediction, products: list[str], task_of_product: dict[str, str], target_fpr: float, pixel_fpr: float,
              leave_out: dict[str, torch.Tensor] | None = None, synthetic: Prediction | None = None) -> Calibration:
    """Per-task score samples from predictions on held-out normal TRAINING images of ``products``.

    Held-out scores join the sample of the task each image was routed to (a task no image was routed
    to takes its own products' images); ``leave_out`` adds scores per task; ``synthetic`` (predictions
    on synthetic defects) gives each routed task its escape-estimate sample. Pixel thresholds come from
    the maps of each task's own products' held-out images.
    """
    if len(products) != int(prediction.image_scores.shape[0]):
        raise ContadError(f"calibration: {len(products)} products for {prediction.image_scores.shape[0]} scores")
    scores = prediction.image_scores.detach().cpu().numpy().astype(np.float64)
    maps = prediction.anomaly_maps.detach().cpu().numpy()
    routed = np.asarray(prediction.routed_tasks if prediction.routed_tasks else [task_of_product[p] for p in products])
    own = np.asarray([task_of_product[p] for p in products])
    extra = {t: v.detach().cpu().numpy().astype(np.float64) for t, v in (leave_out or {}).items()}
    defect_scores = synthetic.image_scores.detach().cpu().numpy().astype(np.float64) if synthetic is not None else np.empty(0)
    defect_routed = np.asarray(synthetic.routed_tasks) if synthetic is not None else np.empty(0, dtype=str)
    samples: dict[str, TaskSample] = {}
    for task in sorted(set(own) | set(extra)):
        members = routed == task if bool((routed == task).any()) else own == task
        pixel_rows = own == task if bool((own == task).any()) else members
        if not bool(pixel_rows.any()):
            raise ContadError(f"calibration: task {task!r} has no held-out normals (data.heldout_fraction too small?)")
        samples[task] = TaskSample(
            heldout=_scores(scores[members]),
            leave_out=_scores(extra.get(task, np.empty(0))),
            pixel=quantile_threshold(maps[pixel_rows], pixel_fpr, key="decision.pixel_fpr"),
            synthetic=_scores(defect_scores[defect_routed == task]),
        )
    return Calibration(target_fpr, pixel_fpr, samples, {p: task_of_product[p] for p in sorted(set(products))})


def check_heldout(batch: ImageBatch) -> None:
    """Refuse a calibration batch that carries any defective label (it must be training normals)."""
    if batch.labels is not None and bool((batch.labels != 0).any()):
        raise ContadError("thresholds must come from held-out normal training images; the batch holds defective labels")


def learned_task_of_product(method: ContinualMethod) -> dict[str, str]:
    """``{product: task}`` of every task ``method`` has learned (task names join products with "+")."""
    return {product: task for task in method.tasks for product in task_products(task)}


def calibrate_heldout(method: ContinualMethod, heldout: ImageBatch, cfg: Config, leave_out: dict[str, torch.Tensor] | None = None) -> Calibration:
    """Score held-out normal TRAINING images of learned products (and synthetic defects pasted on them)
    and calibrate per-task score samples; ``leave_out`` adds per-task scores (``calibration_scores``)."""
    check_heldout(heldout)
    task_of_product = learned_task_of_product(method)
    unknown = sorted(set(heldout.products) - set(task_of_product))
    if unknown:
        raise ContadError(f"calibration images of products {unknown} that the method has not learned (tasks: {method.tasks})")
    prediction = predict_batch(method, heldout, task_of_product, cfg.eval.batch_size)
    defects = synthetic_defect_batch(heldout, cfg.decision.synthetic_variants, cfg.seed)
    synthetic = predict_batch(method, defects, task_of_product, cfg.eval.batch_size) if defects is not None else None
    return calibrate(prediction, list(heldout.products), task_of_product, cfg.decision.target_fpr, cfg.decision.pixel_fpr, leave_out, synthetic)


def carried_leave_out(method: ContinualMethod, previous: Calibration | None) -> dict[str, torch.Tensor]:
    """Leave-one-out samples of earlier tasks that stay valid (``frozen_task_memory``), from the previous calibration."""
    if previous is None or not method.frozen_task_memory:
        return {}
    return {t: torch.tensor(s.leave_out, dtype=torch.float64) for t, s in previous.samples.items() if s.leave_out and t in method.tasks}


def task_leave_out(method: ContinualMethod, data: TaskData) -> dict[str, torch.Tensor]:
    """``{task: scores}`` of the method's own calibration scores for the task it just learned (may be empty)."""
    scores = method.calibration_scores(data)
    return {data.name: scores} if scores is not None and len(scores) else {}


def calibrate_method(cfg: Config, method: ContinualMethod, manifest: pd.DataFrame, leave_out: dict[str, torch.Tensor] | None = None) -> Calibration | None:
    """Per-task decision thresholds of every task ``method`` learned, from the held-out normal TRAINING
    images of their products in ``manifest`` (test rows are never read) and the tasks' ``leave_out``
    scores (``calibrate_heldout``); None without held-out images."""
    learned = learned_task_of_product(method)
    products = [p for p in learned if p in set(manifest["product"])]
    missing = sorted(set(learned) - set(products))
    if missing:
        log.warning("no data for learned products %s: their tasks get no decision threshold", missing)
    if not products:
        return None
    _, held = train_split(manifest, products, cfg.data.heldout_fraction, cfg.seed)
    if held.empty:
        log.warning("data.heldout_fraction=%s leaves no held-out normals: no decision thresholds", cfg.data.heldout_fraction)
        return None
    batch = ImageBatch(
        images=load_images(list(held["image_path"]), cfg.data.image_size),
        products=list(held["product"]),
        paths=list(held["image_path"]),
        labels=torch.zeros(len(held), dtype=torch.long),
        depth=depth_of(held, cfg.data.image_size),
    )
    return calibrate_heldout(method, batch, cfg, leave_out)


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
    """Escape and false-reject rates of test images at the deployed per-task thresholds, with what the
    calibration promised for the batch's product: ``promised_fpr`` and ``escape_estimate`` (synthetic).

    ``escape_rate``: defective images decided OK / defective images. ``false_reject_rate``: good
    images decided NG / good images. NaN when a class is absent. ``promised_fpr``: with good images, the mean
    promise of the tasks they were routed to (each part is decided by its routed task's threshold, so that is the
    promise it was held to; the product's own task's promise when routing is exact), else the product's own task's.
    ``false_reject_bound``: the largest false-reject rate on this many good images that is consistent with
    ``promised_fpr`` (``binomial_upper``).
    """
    out = {"escape_rate": math.nan, "false_reject_rate": math.nan, "false_reject_bound": math.nan,
           **expected_rates(calibration, batch.products[0] if batch.products else None)}
    if batch.labels is None:
        return out
    defective = batch.labels.cpu().numpy().astype(bool)
    rejected = prediction.image_scores.detach().cpu().numpy().astype(np.float64) > routed_thresholds(prediction, calibration)
    if defective.any():
        out["escape_rate"] = float(np.count_nonzero(defective & ~rejected) / np.count_nonzero(defective))
    if (~defective).any():
        n_good = int(np.count_nonzero(~defective))
        out["false_reject_rate"] = float(np.count_nonzero(~defective & rejected) / n_good)
        out["promised_fpr"] = routed_promise(prediction, calibration, ~defective)
        if math.isfinite(out["promised_fpr"]):
            out["false_reject_bound"] = binomial_upper(n_good, out["promised_fpr"]) / n_good
    return out


def routed_promise(prediction: Prediction, calibration: Calibration, members: np.ndarray) -> float:
    """Mean ``promised_fpr`` of the tasks the ``members`` (bool mask) images were routed to."""
    promises = [calibration.for_task(t).promised_fpr for t, m in zip(prediction.routed_tasks, members, strict=True) if m]
    return float(np.mean(promises))


BOUND_CONFIDENCE = 0.95


def binomial_upper(n: int, rate: float, confidence: float = BOUND_CONFIDENCE) -> int:
    """The smallest ``r`` with P(Binomial(n, rate) <= r) >= ``confidence``: more than ``r`` rejects of ``n`` good
    parts would contradict a promised false-reject ``rate`` at that confidence."""
    if rate <= 0.0:
        return 0
    if rate >= 1.0:
        return n
    log_p, log_q, log_n = math.log(rate), math.log1p(-rate), math.lgamma(n + 1)
    total = 0.0
    for r in range(n + 1):  # probabilities in log space: math.comb(n, r) overflows a float from n ~ 1030 on
        total += math.exp(log_n - math.lgamma(r + 1) - math.lgamma(n - r + 1) + r * log_p + (n - r) * log_q)
        if total >= confidence:
            return r
    return n


def expected_rates(calibration: Calibration, product: str | None) -> dict[str, float]:
    """``{"promised_fpr", "escape_estimate"}`` of ``product``'s task (NaN when unknown)."""
    if product is None or calibration.task_of_product.get(product, product) not in calibration.samples:
        return {"promised_fpr": math.nan, "escape_estimate": math.nan}
    threshold = calibration.for_product(product)
    return {"promised_fpr": threshold.promised_fpr, "escape_estimate": threshold.escape_estimate}


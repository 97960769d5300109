"""Validation protocol for choosing defaults: TRAINING normals + synthetic defects, never the test split.

For a sequence of products under ``root`` (MVTec layout: ``<product>/train/good``):

1. ``training_manifest`` lists ``<product>/train/good`` only; no ``test/`` or ``ground_truth/`` path is
   listed, opened or stat-ed (the tests check this with an unreadable test folder).
2. ``build_validation`` splits each product's normals (seeded, per product, ``fraction`` held out apart
   from ``data.heldout_fraction``'s split) into a FIT part and VALIDATION normals, and pastes synthetic
   defects on the validation normals (``components.data.synthetic.pasted``: ``variants`` cut-paste /
   intensity rectangles per normal from donors of the fit part, plus one copy with thin strokes), masks
   included. RGB-D products (MVTec 3D-AD layout: ``train/good/{rgb,xyz}`` and ``validation/good``, the
   normals the pipeline trains on) carry their point clouds; every synthetic defect also changes the
   depth inside its mask (``depth_defects``: a rounded dent or bump, as ``components.data.synthetic.geometry``
   paints them), so the mask marks a change in both modalities. ``data.tile = auto`` is resolved on the
   training images, as the pipeline does. To compare
   input sizes on the same physical defects, ``paint_size`` pastes them at a higher resolution and brings
   them down to the run's size inside their masks only (normals stay exactly as the run loads them).
   ``defects="subtle"`` paints the second, harder set instead (``components.data.synthetic.subtle``: the
   synthetic products' scratch / crack / deformation / dent / stain / particle / thread painters at low to
   moderate severity, three per normal): the pasted set saturates on regular textures (every grid defect
   above every grid normal), the subtle one is meant to leave room to tell settings apart (RESULTS section 3,
   protocol v2).
3. ``train_sequence`` trains the method on the fit part in the sequence's product order (``protocol``),
   exactly as a pipeline step does (``task_data``: ``data.heldout_fraction`` of the fit normals calibrate).
4. ``evaluate_validation`` scores every product's validation images after the last step: image and
   pixel AUROC, AUPRO and routing per product (``task_metrics``), and their means.

The validation normals of a product are a seeded fraction of its training normals, so a default chosen
here saw no test image; the numbers measure how well a setting separates the product's own normals
from pasted defects, a proxy for real defects, not a replacement for the test split.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage

from components.backbones.base import PromptedBackbone
from components.config import Config
from components.data.image_files import ImageRecord, list_images
from components.data.layouts.mvtec3d import TRAINING_SPLITS, read_mvtec3d_product
from components.data.loading import load_depth, load_images, task_data, train_split
from components.data.manifest import records_to_manifest
from components.data.protocol import task_name, task_of_product, task_sequence
from components.data.synthetic.pasted import line_defects, synthetic_defects
from components.data.synthetic.subtle import subtle_defects
from components.data.tiling import resolve_tiling
from components.errors import DataError
from components.eval.evaluate import evaluate_tasks
from components.methods.base import ContinualMethod
from components.methods.registry import build_method
from components.segment.task_maps import task_label_maps
from components.types import ImageBatch

log = logging.getLogger(__name__)

VALIDATION_FRACTION = 0.2  # share of each product's training normals held out as validation normals
VALIDATION_SALT = 0x7A11  # seeds the validation split apart from data.heldout_fraction's split
RECTANGLE_VARIANTS = 2  # pasted / shifted rectangles per validation normal (plus one stroke copy)
DONORS = 32  # fit images per product that rectangles are cut from
DEPTH_SEVERITY = (0.15, 0.5)  # dent / bump depth as a fraction of the part's height (geometry.dent: 0.15 + 0.35 * severity)
DEPTH_RAMP_PX = 3.0  # the profile rounds off over this many pixels from the mask's outline (geometry.dent)
DEFECT_SETS = ("pasted", "subtle")  # validation defects: rectangles + strokes (v1), or the subtle painters (v2)


@dataclass
class ValidationSet:
    """A sequence's fit manifest (train/good rows the method trains on) and per-product validation batches."""

    products: list[str]
    fit: pd.DataFrame
    batches: dict[str, ImageBatch]
    cfg: Config  # the configuration with ``data.tile`` resolved on the training images

    def counts(self) -> dict[str, dict[str, int]]:
        """Per product: fit images, validation normals and synthetic defects."""
        out = {}
        for product, batch in self.batches.items():
            defects = int(batch.labels.sum()) if batch.labels is not None else 0
            out[product] = {"fit": int((self.fit["product"] == product).sum()), "normals": len(batch) - defects, "defects": defects}
        return out


@dataclass
class ValidationResult:
    """Per-product validation metrics after the last step, their means and the training costs."""

    per_product: dict[str, dict[str, float]]
    train_seconds: dict[str, float] = field(default_factory=dict)
    task_bytes: dict[str, int] = field(default_factory=dict)

    def mean(self, metric: str) -> float:
        """Mean of ``metric`` over products (NaN when undefined for all)."""
        values = [m[metric] for m in self.per_product.values() if not math.isnan(m[metric])]
        return sum(values) / len(values) if values else float("nan")

    def as_dict(self) -> dict[str, Any]:
        keys = ("image_auroc", "pixel_auroc", "aupro", "routing_accuracy")
        return {"per_product": self.per_product, "mean": {k: self.mean(k) for k in keys},
                "train_seconds": self.train_seconds, "task_bytes": self.task_bytes}


def _rgbd_records(root: Path, product: str) -> list[ImageRecord]:
    """Normals of an MVTec 3D-AD product (``train/good`` and ``validation/good``, read by its layout; never ``test/``),
    each with its point cloud."""
    records = [r for r in read_mvtec3d_product(Path(root) / product, product, TRAINING_SPLITS) if r.label == 0]
    missing = next((r for r in records if r.depth_path is None), None)
    if missing is not None:
        raise DataError(f"{missing.image_path}: no point cloud beside it in ../xyz (RGB-D validation needs every xyz)")
    return records


def training_manifest(root: Path, products: list[str]) -> pd.DataFrame:
    """Manifest of the ``<product>/train/good`` images of ``products`` under ``root`` (no other folder is read;
    an RGB-D product in the MVTec 3D-AD layout: ``train/good`` and ``validation/good``, with ``depth_path``)."""
    records = []
    for product in products:
        good = Path(root) / product / "train" / "good"
        if (good / "rgb").is_dir():
            records += _rgbd_records(Path(root), product)
            continue
        images = list_images(good)
        if not images:
            raise DataError(f"{good}: no training images (the validation protocol needs <product>/train/good)")
        records += [ImageRecord(product=product, split="train", label=0, defect_type="good", image_path=path) for path in images]
    return records_to_manifest(records)


def depth_defects(xyz: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N, 3, S, S) point clouds with the z of every valid point inside ``masks`` (N, S, S) moved by a rounded
    dent or bump (``components.data.synthetic.geometry.dent``'s profile): depth ``DEPTH_SEVERITY`` x the part's
    height (the 2nd-98th percentile range of the cloud's valid z), sign drawn per defect. Invalid points stay 0."""
    out = xyz.clone()
    for i in range(len(xyz)):
        z, mask = out[i, 2], masks[i].bool()
        valid = xyz[i].abs().sum(dim=0) > 0
        if not valid.any() or not (mask & valid).any():
            continue
        height = float(z[valid].quantile(0.98) - z[valid].quantile(0.02))
        fraction = DEPTH_SEVERITY[0] + float(torch.rand(1, generator=generator)) * (DEPTH_SEVERITY[1] - DEPTH_SEVERITY[0])
        sign = 1.0 if float(torch.rand(1, generator=generator)) < 0.5 else -1.0  # +z: pushed away from the camera (dent)
        inside = ndimage.distance_transform_edt(mask.numpy())  # distance to the outline, as geometry's plateau
        profile = torch.from_numpy(np.clip(inside / DEPTH_RAMP_PX, 0.0, 1.0)).float()
        out[i, 2] = torch.where(mask & valid, z + sign * fraction * max(height, 1e-6) * profile, z)
    return out


def _painted_defects(normals: torch.Tensor, donors: torch.Tensor, generator: torch.Generator,
                     paths: list[str], defects: str = "pasted") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(defect images, masks, index of the normal each came from, a path naming each): ``pasted``:
    ``RECTANGLE_VARIANTS`` rectangles and one stroke copy per normal; ``subtle``: ``subtle_defects``."""
    if defects == "subtle":
        images, masks, source, kinds = subtle_defects(normals, generator)
        return images, masks, source, [f"{paths[int(i)]}#{kind}" for i, kind in zip(source, kinds)]
    rects, rect_masks = synthetic_defects(normals, donors, RECTANGLE_VARIANTS, generator)
    lines, line_masks = line_defects(normals, 1, generator)
    source = torch.cat([torch.arange(len(normals)).repeat_interleave(RECTANGLE_VARIANTS), torch.arange(len(normals))])
    names = [f"{paths[i // RECTANGLE_VARIANTS]}#rect{i % RECTANGLE_VARIANTS}" for i in range(len(normals) * RECTANGLE_VARIANTS)]
    return torch.cat([rects, lines]), torch.cat([rect_masks, line_masks]), source, names + [f"{p}#lines" for p in paths]


def _to_size(defects: torch.Tensor, masks: torch.Tensor, normals: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Defects painted at a higher resolution brought to ``normals``' size: inside the (resized) mask the
    antialiased downsampled defect, outside it the normal exactly as loaded at that size."""
    size = normals.shape[-2:]
    small = F.interpolate(defects, size=size, mode="bilinear", antialias=True, align_corners=False)
    small_masks = F.adaptive_max_pool2d(masks[:, None].float(), size)[:, 0] > 0
    images = torch.where(small_masks[:, None], small, normals[source])
    return images, small_masks.to(torch.uint8)


def validation_batch(normal_paths: list[str], donor_paths: list[str], product: str, image_size: int,
                     generator: torch.Generator, paint_size: int | None = None, depth_paths: list[str] | None = None,
                     defects: str = "pasted") -> ImageBatch:
    """Validation normals of one product followed by their synthetic defects (labels 1, masks of what changed).

    ``depth_paths`` (RGB-D, aligned with ``normal_paths``): the normals' point clouds, and each defect's cloud
    is its normal's with ``depth_defects`` inside the defect's mask (painted at ``image_size`` only).

    ``paint_size`` > ``image_size``: defects are pasted at ``paint_size`` and brought down to ``image_size``
    (``_to_size``), so runs at different input sizes are scored on the same physical defects.
    ``defects``: which synthetic set (``DEFECT_SETS``) is painted.
    """
    paint = max(paint_size or image_size, image_size)
    if depth_paths is not None and paint != image_size:
        raise DataError(f"product {product!r}: RGB-D validation defects are painted at the input size only (paint_size={paint_size})")
    normals = load_images(normal_paths, image_size)
    painted = normals if paint == image_size else load_images(normal_paths, paint)
    donors = load_images(donor_paths, paint) if donor_paths and defects == "pasted" else painted  # only rectangles cut from donors
    images, masks, source, names = _painted_defects(painted, donors, generator, normal_paths, defects)
    if paint != image_size:
        images, masks = _to_size(images, masks, normals, source)
    n, m = len(normals), len(images)
    paths = normal_paths + names
    depth = None
    if depth_paths is not None:
        xyz = load_depth(depth_paths, image_size)
        depth = torch.cat([xyz, depth_defects(xyz[source], masks, generator)])
    return ImageBatch(images=torch.cat([normals, images]), products=[product] * (n + m), paths=paths,
                      labels=torch.tensor([0] * n + [1] * m),
                      masks=torch.cat([torch.zeros(n, image_size, image_size, dtype=torch.uint8), masks]), depth=depth)


def build_validation(cfg: Config, root: Path, products: list[str], fraction: float = VALIDATION_FRACTION,
                     paint_size: int | None = None, defects: str = "pasted") -> ValidationSet:
    """The validation set of ``products`` (in sequence order) under ``root`` for ``cfg`` (seeded by ``cfg.seed``);
    ``paint_size``: resolution the defects are pasted at (default: the run's resolved input size); ``defects``:
    which synthetic set (``DEFECT_SETS``)."""
    if defects not in DEFECT_SETS:
        raise DataError(f"validation defects {defects!r}: expected one of {', '.join(DEFECT_SETS)}")
    manifest = training_manifest(root, products)
    resolved = resolve_tiling(cfg, manifest, products)
    fit, held = train_split(manifest, products, fraction, cfg.seed ^ VALIDATION_SALT)
    size = resolved.data.image_size
    batches = {}
    for index, product in enumerate(products):
        rows = held.loc[held["product"] == product]
        normals = rows["image_path"].tolist()
        depth_paths = rows["depth_path"].tolist() if rows["depth_path"].astype(bool).all() and len(rows) else None
        if not normals:
            raise DataError(f"product {product!r}: too few training normals to hold out validation normals (need >= 2)")
        donors = fit.loc[fit["product"] == product, "image_path"].tolist()[:DONORS]
        generator = torch.Generator().manual_seed(cfg.seed * 1009 + index)
        batches[product] = validation_batch(normals, donors, product, size, generator, paint_size, depth_paths, defects)
    return ValidationSet(products=list(products), fit=fit, batches=batches, cfg=resolved)


def train_sequence(vset: ValidationSet, backbone: PromptedBackbone, cfg: Config | None = None) -> tuple[ContinualMethod, dict[str, float], dict[str, int]]:
    """``cfg.method`` (default ``vset.cfg``) trained on the fit images task by task in sequence order:
    (method, training seconds per task, stored bytes per task)."""
    cfg = cfg or vset.cfg
    tasks = task_sequence(vset.products, cfg.protocol.base_tasks, cfg.protocol.step_tasks)
    method = build_method(cfg, backbone)
    seconds: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for index, group in enumerate(tasks):
        name = task_name(group)
        data = task_data(vset.fit, name, group, cfg, task_label_maps(cfg, vset.fit, group))  # as a pipeline step makes them
        torch.manual_seed(cfg.seed + index)
        started = time.perf_counter()
        fit_log = method.fit_task(data)
        seconds[name] = time.perf_counter() - started
        sizes[name] = int(fit_log.get("memory_bytes", 0))
    return method, seconds, sizes


def evaluate_validation(method: ContinualMethod, vset: ValidationSet, cfg: Config | None = None) -> dict[str, dict[str, float]]:
    """Metrics per product of ``method`` (trained on every task of ``vset``) on its validation images."""
    cfg = cfg or vset.cfg
    tasks = task_sequence(vset.products, cfg.protocol.base_tasks, cfg.protocol.step_tasks)
    metrics, _ = evaluate_tasks(method, vset.batches, task_of_product(tasks), cfg)
    return metrics


def run_protocol(vset: ValidationSet, backbone: PromptedBackbone, cfg: Config | None = None) -> ValidationResult:
    """Train on the fit images in sequence order, then score every product's validation images."""
    method, seconds, sizes = train_sequence(vset, backbone, cfg)
    return ValidationResult(per_product=evaluate_validation(method, vset, cfg), train_seconds=seconds, task_bytes=sizes)

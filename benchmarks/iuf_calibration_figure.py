"""Figure of IUF's position calibration (``iuf.score_calibration=position``) on a trained model.

Top row: the profile that divides every error map (mean of the learned products' profiles) and each
product's own profile. Then one row per product: its FIRST good and FIRST defective test image (batch
order, not picked), each with the raw error map and the calibrated one. Each map's title gives the
image score (max of the ``score_pool`` average-pooled map) and a cross marks the grid cell holding the
map's maximum: on the raw maps of normal images it tends to sit on the border ring, which is what the
calibration removes. The raw maps of one product share one colour range, its calibrated maps another.

Reads the test split's labels and masks (to pick the first good / defective image and draw its defect): a
figure only; not used to choose defaults (issue 33: defaults come from the validation protocol,
``benchmarks/validation_levers.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from components.eval.figures import denormalise, to_png
from components.methods.iuf import IUF
from components.methods.reconstruction import calibrate_positions, pooled_max_scores, upsample_maps
from components.types import ImageBatch


def first_good_and_defect(batch: ImageBatch) -> tuple[int, int]:
    """Indices of the batch's first good (label 0) and first defective (label 1) image."""
    if batch.labels is None:
        raise ValueError("calibration figure: the batch has no labels (needs good and defective test images)")
    labels = batch.labels.tolist()
    if 0 not in labels or 1 not in labels:
        raise ValueError("calibration figure: the batch needs at least one good and one defective image")
    return labels.index(0), labels.index(1)


def _map_panel(ax: Any, grid_map: torch.Tensor, size: tuple[int, int], sigma: float, pool: int, vmax: float, title: str) -> None:
    """One upsampled (smoothed) map, its image score in the title and a cross on its maximum grid cell."""
    shown = upsample_maps(grid_map[None], size, sigma)[0].numpy()
    score = float(pooled_max_scores(upsample_maps(grid_map[None], size, 0.0), pool)[0])
    ax.imshow(shown, cmap="inferno", vmin=0.0, vmax=vmax)
    h, w = grid_map.shape
    row, col = divmod(int(grid_map.argmax()), w)
    ax.plot((col + 0.5) * size[1] / w, (row + 0.5) * size[0] / h, marker="x", color="cyan", markersize=9, mew=2)
    ax.set_title(f"{title}\nscore {score:.2f}", fontsize=8)


def calibration_figure(method: IUF, batches: dict[str, ImageBatch]) -> bytes:
    """PNG bytes of the figure described in the module docstring for ``method``'s learned products."""
    profile = method.score_profile() if method.position_profiles else None
    if profile is None:
        raise ValueError("calibration figure: the model has no position profiles (trained with iuf.score_calibration=none)")
    products = [p for p in method.products if p in batches]
    cfg = method.config.iuf
    fig = Figure(figsize=(2.1 * 6, 2.3 * (len(products) + 1)), layout="constrained")
    axes = fig.subplots(len(products) + 1, 6, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    top = [("mean profile (divides every map)", profile), *[(f"profile: {p}", method.position_profiles[p]) for p in method.products[:5]]]
    for ax, (title, values) in zip(axes[0], top, strict=False):
        ax.imshow(values.numpy(), cmap="viridis")
        ax.set_title(title, fontsize=8)
    for ax in axes[0][len(top):]:
        ax.axis("off")
    for row, product in zip(axes[1:], products, strict=True):
        batch = batches[product]
        picks = list(first_good_and_defect(batch))
        images = batch.images[picks]
        size = tuple(images.shape[-2:])
        raw = method.raw_error_maps(images)
        calibrated = calibrate_positions(raw, profile)
        raw_max, cal_max = float(raw.max()), float(calibrated.max())
        rgb = denormalise(images)
        for k, (kind, index) in enumerate(zip(("good", "defect"), picks, strict=True)):
            image_ax = row[3 * k]
            image_ax.imshow(rgb[k])
            if kind == "defect" and batch.masks is not None:
                image_ax.contour(batch.masks[index].squeeze().numpy().astype(np.float32), levels=[0.5], colors="lime", linewidths=1)
            image_ax.set_title(f"{product}: {kind}", fontsize=8)
            _map_panel(row[3 * k + 1], raw[k], size, cfg.smoothing_sigma, cfg.score_pool, raw_max, "raw error")
            _map_panel(row[3 * k + 2], calibrated[k], size, cfg.smoothing_sigma, cfg.score_pool, cal_max, "calibrated")
    fig.suptitle("IUF position calibration: error map / relative per-position error of training normals", fontsize=10)
    return to_png(fig)

"""PNG figures of a continual run: accuracy-matrix heatmaps, per-product curves, overlays, comparisons.

Built on ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot global state); every
function returns PNG bytes so callers write them atomically. Values are shown in percent.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from components.data.protocol import task_name
from components.eval.continual import AccuracyMatrix, lower_is_better
from components.eval.metrics import METRIC_KEYS
from components.eval.operating_points import PROMISE_READINGS, RATES, READINGS, parse_point_key, percent_label
from components.eval.thresholds import Calibration
from components.types import ImageBatch, Prediction

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DECISION_TITLES = {  # readings at a promise's thresholds: at the deployed one, or ``@ P % promise`` (operating points)
    "escape_rate": "Escape rate",
    "false_reject_rate": "False-reject rate",
    "promised_fpr": "Promised false-reject rate",
    "promise_broken": "Promise broken",
}
METRIC_TITLES = {
    "image_auroc": "Image AUROC",
    "image_ap": "Image AP",
    "pixel_auroc": "Pixel AUROC",
    "pixel_ap": "Pixel AP",
    "aupro": "AUPRO@0.3",
    "image_f1max": "Image F1-max",
    "pixel_f1max": "Pixel F1-max",
    "routing_accuracy": "Routing accuracy",
    "escape_rate": f"{DECISION_TITLES['escape_rate']} @ deployed thr.",
    "false_reject_rate": f"{DECISION_TITLES['false_reject_rate']} @ deployed thr.",
    "escape_estimate": "Escape estimate (synthetic defects)",
    "promised_fpr": DECISION_TITLES["promised_fpr"],
    "false_reject_bound": "False-reject bound (95 %)",
}


def metric_title(metric: str) -> str:
    """Human-readable name of a metric key."""
    point = parse_point_key(metric)
    if point is not None:
        return f"{DECISION_TITLES[point[0]]} @ {percent_label(point[1])} % promise thr."
    return METRIC_TITLES.get(metric, metric.replace("_", " "))


def safe_name(name: str) -> str:
    """A file-name-safe version of a product/metric name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "unnamed"


def to_png(fig: Figure, dpi: int = 110) -> bytes:
    """Render ``fig`` to PNG bytes."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def denormalise(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) ImageNet-normalised tensors -> (B,H,W,3) RGB floats in [0, 1] for display."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = images.detach().float().cpu() * std + mean
    return rgb.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _step_labels(doc: dict[str, Any], n_rows: int) -> list[str]:
    steps = doc.get("steps")
    if steps and len(steps) == n_rows:
        return [f"step {i}: {task_name(g)}" for i, g in enumerate(steps)]
    return [f"step {i}" for i in range(n_rows)]


def _learned_step(doc: dict[str, Any], product: str, column: list[Any]) -> int:
    """Step learning ``product``: from ``steps`` when present, else its first non-null cell."""
    for i, group in enumerate(doc.get("steps") or []):
        if product in group:
            return i
    return next((i for i, v in enumerate(column) if v is not None), len(column))


def _as_array(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


# Metric families of the report: one table and one heatmap figure each. The first metric of a
# family is its headline (its forgetting matrix is drawn too); metrics of no family go to "Other".
METRIC_FAMILIES: dict[str, tuple[str, ...]] = {
    "Image-level detection": ("image_auroc", "image_ap", "image_f1max"),
    "Pixel-level localisation": ("pixel_auroc", "aupro", "pixel_ap", "pixel_f1max"),
    "Decisions at the deployed thresholds": ("escape_rate", "false_reject_rate", "escape_estimate", "promised_fpr", "false_reject_bound"),
}
POINTS_FAMILY = "Decisions at other false-reject promises"  # decision.operating_points' rates (components/eval/operating_points.py)
PROMISES_FAMILY = "What those promises were, and whether they held"  # their promised rates and broken promises
TITLE_PT = 12.0  # 12 pt at 100 dpi = 17 px; figures are at most ~900 px wide, so no downscaling in a page
LABEL_PT = 10.0
CELL_PT = 9.0
DPI = 100


def metric_families(metrics: Sequence[str]) -> dict[str, list[str]]:
    """``METRIC_FAMILIES`` restricted to ``metrics`` (empty families dropped), plus ``Other`` for the rest."""
    families = {name: [m for m in keys if m in metrics] for name, keys in METRIC_FAMILIES.items()}
    parsed = {m: point for m in metrics if (point := parse_point_key(m)) is not None}
    points = sorted(parsed, key=lambda m: (parsed[m][1], READINGS.index(parsed[m][0])))  # by promise, then reading
    families[POINTS_FAMILY] = [m for m in points if parsed[m][0] in RATES]
    families[PROMISES_FAMILY] = [m for m in points if parsed[m][0] in PROMISE_READINGS]
    known = {m for keys in families.values() for m in keys}
    families["Other metrics"] = [m for m in metrics if m not in known]
    return {name: keys for name, keys in families.items() if keys}


def forgetting_matrix(doc: dict[str, Any], metric: str) -> list[list[float | None]]:
    """``F[step][product]`` of ``metric`` (``AccuracyMatrix.forgetting_matrix``) from a metrics document."""
    return AccuracyMatrix.from_metrics_json(doc).forgetting_matrix(metric)


def _grid_labels(ax: Any, doc: dict[str, Any], n_rows: int, show_y: bool = True) -> None:
    tasks = doc["tasks"]
    ax.set_xticks(range(len(tasks)), labels=tasks, rotation=30, ha="right", fontsize=LABEL_PT)
    ax.set_yticks(range(n_rows), labels=_step_labels(doc, n_rows) if show_y else [""] * n_rows, fontsize=LABEL_PT)


def accuracy_panel(ax: Any, doc: dict[str, Any], metric: str, show_y: bool = True) -> Any:
    """``R[step][product]`` of ``metric`` in % (blank = not learned yet, n/a = undefined); returns the image."""
    rows = doc["matrix"][metric]
    values = 100.0 * _as_array(rows)
    cmap = colormaps["viridis_r" if lower_is_better(metric) else "viridis"].with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=100.0, aspect="auto")
    for j, product in enumerate(doc["tasks"]):
        learned = _learned_step(doc, product, [r[j] for r in rows])
        for i in range(values.shape[0]):
            value = values[i, j]
            if not math.isnan(value):
                bright = value > 60 if not lower_is_better(metric) else value < 40
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="black" if bright else "white", fontsize=CELL_PT)
            elif i >= learned:
                ax.text(j, i, "n/a", ha="center", va="center", color="#666666", fontsize=CELL_PT)
    _grid_labels(ax, doc, values.shape[0], show_y)
    ax.set_title(f"{metric_title(metric)} (%)", fontsize=TITLE_PT)
    return image


def forgetting_panel(ax: Any, doc: dict[str, Any], metric: str, limit: float | None = None, show_y: bool = True) -> Any:
    """Forgetting ``F[step][product]`` of ``metric`` in % (red = forgot, blue = improved; blank = not defined)."""
    values = 100.0 * _as_array(forgetting_matrix(doc, metric))
    finite = np.abs(values[np.isfinite(values)])
    limit = limit if limit is not None else max(5.0, float(finite.max()) if finite.size else 0.0)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=colormaps["RdBu_r"].with_extremes(bad="#f4f4f4"),
                      vmin=-limit, vmax=limit, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        if not math.isnan(value):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="white" if abs(value) > 0.6 * limit else "black", fontsize=CELL_PT)
    _grid_labels(ax, doc, values.shape[0], show_y)
    rise = " (rise)" if lower_is_better(metric) else ""
    ax.set_title(f"Forgetting{rise} of {metric_title(metric)} (%)", fontsize=TITLE_PT)
    return image


def family_heatmaps(doc: dict[str, Any], family: str, metrics: Sequence[str]) -> bytes:
    """One figure per metric family: the accuracy matrix of every metric (shared 0-100 % colour bar)
    and the forgetting matrix of the family's first (headline) metric, two panels per row."""
    n_cols = 2
    n_rows_grid = math.ceil((len(metrics) + 1) / n_cols)
    n_steps, n_tasks = len(doc["matrix"][metrics[0]]), len(doc["tasks"])
    panel_w, panel_h = max(3.0, 0.6 * n_tasks + 1.2), max(1.8, 0.4 * n_steps + 1.2)
    fig = Figure(figsize=(n_cols * panel_w + 2.4, n_rows_grid * panel_h + 0.8), layout="constrained")
    axes = fig.subplots(n_rows_grid, n_cols, squeeze=False).ravel()
    accuracy = None
    for k, metric in enumerate(metrics):
        accuracy = accuracy_panel(axes[k], doc, metric, show_y=k % n_cols == 0)
    forgetting = forgetting_panel(axes[len(metrics)], doc, metrics[0], show_y=len(metrics) % n_cols == 0)
    for ax in axes[len(metrics) + 1 :]:
        ax.set_axis_off()
    # accuracy colour bar below the grid, forgetting colour bar beside its panel: they never overlap
    fig.colorbar(accuracy, ax=list(axes), location="bottom", shrink=0.5, aspect=40, label="value (%)").ax.tick_params(labelsize=LABEL_PT)
    fig.colorbar(forgetting, ax=axes[len(metrics)], shrink=0.9, label="forgetting (%)").ax.tick_params(labelsize=LABEL_PT)
    fig.suptitle(f"{doc.get('method', '')}: {family} — rows: after training step; columns: evaluated product", fontsize=TITLE_PT)
    return to_png(fig, dpi=DPI)


def comparison_matrices(runs: Sequence[tuple[str, dict[str, Any]]], metric: str = "image_auroc") -> bytes:
    """One row per run: its accuracy matrix and its forgetting matrix of ``metric`` (shared scales)."""
    values = [100.0 * _as_array(forgetting_matrix(doc, metric)) for _, doc in runs]
    finite = np.concatenate([np.abs(v[np.isfinite(v)]) for v in values]) if values else np.array([])
    limit = max(5.0, float(finite.max()) if finite.size else 0.0)
    n_steps = max(len(doc["matrix"][metric]) for _, doc in runs)
    n_tasks = max(len(doc["tasks"]) for _, doc in runs)
    panel_w, panel_h = max(3.0, 0.6 * n_tasks + 1.2), max(1.8, 0.4 * n_steps + 1.2)
    fig = Figure(figsize=(2 * panel_w + 2.4, len(runs) * panel_h + 0.6), layout="constrained")
    axes = fig.subplots(len(runs), 2, squeeze=False)
    for r, (label, doc) in enumerate(runs):
        accuracy = accuracy_panel(axes[r, 0], doc, metric)
        forgetting = forgetting_panel(axes[r, 1], doc, metric, limit=limit, show_y=False)
        axes[r, 0].set_title(f"{label}: {metric_title(metric)} (%)", fontsize=TITLE_PT)
        axes[r, 1].set_title(f"{label}: forgetting (%)", fontsize=TITLE_PT)
    fig.colorbar(accuracy, ax=list(axes[:, 0]), shrink=0.8, label="value (%)").ax.tick_params(labelsize=LABEL_PT)
    fig.colorbar(forgetting, ax=list(axes[:, 1]), shrink=0.8, label="forgetting (%)").ax.tick_params(labelsize=LABEL_PT)
    fig.suptitle(f"{metric_title(metric)} after every step and its forgetting, per run", fontsize=TITLE_PT)
    return to_png(fig, dpi=DPI)


def step_curves(doc: dict[str, Any], metric: str = "image_auroc") -> bytes:
    """One line per product: ``metric`` after every step from the step that learned it."""
    tasks = doc["tasks"]
    values = _as_array(doc["matrix"][metric])
    n_rows = values.shape[0]
    fig = Figure(figsize=(max(4.5, 1.2 * n_rows + 2.0), 3.4))
    ax = fig.add_subplot()
    colours = colormaps["tab10" if len(tasks) <= 10 else "tab20"]
    for j, product in enumerate(tasks):
        steps = np.arange(n_rows)
        defined = ~np.isnan(values[:, j])
        if defined.any():
            ax.plot(steps[defined], 100 * values[defined, j], marker="o", label=product, color=colours(j % colours.N))
    ax.set_xticks(range(n_rows), labels=[str(i) for i in range(n_rows)])
    lowest = float(np.nanmin(values)) if np.isfinite(values).any() else 0.5
    ax.set_ylim(min(50.0, 100 * lowest - 5.0), 101.0)
    ax.set_xlabel("after training step", fontsize=LABEL_PT)
    ax.set_ylabel(f"{metric_title(metric)} (%)", fontsize=LABEL_PT)
    ax.set_title(f"{doc.get('method', '')}: {metric_title(metric)} per product across steps", fontsize=TITLE_PT)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=LABEL_PT, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.tick_params(labelsize=LABEL_PT)
    return to_png(fig, dpi=DPI)


def overlay_figure(product: str, batch: ImageBatch, prediction: Prediction, calibration: Calibration | None = None) -> bytes:
    """Rows of (image, ground truth, anomaly heatmap) for a few test images (good and defective) of one product.

    The heatmap colour scale is shared by the rows (min..max of the shown maps). With a
    ``calibration`` (held-out training normals only) each row shows the OK/NG decision at the
    image threshold of the task the image was routed to, and the white contour is that task's
    pixel threshold.
    """
    rgb = denormalise(batch.images)
    maps = prediction.anomaly_maps.detach().float().cpu()
    if tuple(maps.shape[-2:]) != rgb.shape[1:3]:
        maps = torch.nn.functional.interpolate(maps[:, None], size=rgb.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    maps_np = maps.numpy()
    vmin, vmax = float(maps_np.min()), float(maps_np.max())
    vmax = vmax if vmax > vmin else vmin + 1e-6
    n = len(batch)
    extra = int(batch.depth is not None)  # RGB-D data: a depth panel next to the image
    fig = Figure(figsize=(7.2 + 2.3 * extra, 2.25 * n + 0.4))
    axes = fig.subplots(n, 3 + extra, squeeze=False)
    if extra:
        for i in range(n):
            depth_panel(axes[i, 1], batch.depth[i])
        axes = np.concatenate([axes[:, :1], axes[:, 2:]], axis=1)
    for i in range(n):
        label = int(batch.labels[i]) if batch.labels is not None else -1
        mask = batch.masks[i].cpu().numpy() if batch.masks is not None else np.zeros(rgb.shape[1:3])
        routed = prediction.routed_tasks[i] if prediction.routed_tasks else "?"
        truth = {0: "good", 1: "defect"}.get(label, "unlabelled")
        score = float(prediction.image_scores[i])
        title = f"{truth} | score {score:.3g}"
        pixel_threshold = None
        if calibration is not None and routed in calibration.tasks:
            threshold = calibration.for_task(routed)
            title += f" > {threshold.image:.3g}: NG" if score > threshold.image else f" <= {threshold.image:.3g}: OK"
            pixel_threshold = threshold.pixel
        axes[i, 0].imshow(rgb[i])
        axes[i, 0].set_title(title, fontsize=LABEL_PT, color="black" if ("NG" in title) == (label == 1) or label < 0 else "red")
        axes[i, 1].imshow(rgb[i])
        axes[i, 1].imshow(np.ma.masked_where(mask == 0, mask), cmap="autumn", alpha=0.6, vmin=0, vmax=1)
        axes[i, 1].set_title("ground truth", fontsize=LABEL_PT)
        axes[i, 2].imshow(rgb[i])
        heat = axes[i, 2].imshow(maps_np[i], cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
        if pixel_threshold is not None and maps_np[i].min() < pixel_threshold < maps_np[i].max():
            axes[i, 2].contour(maps_np[i], levels=[pixel_threshold], colors="white", linewidths=1.0)
        axes[i, 2].set_title(f"anomaly map | routed: {routed}", fontsize=LABEL_PT)
        for ax in axes[i]:
            ax.set_axis_off()
        fig.colorbar(heat, ax=axes[i, 2], fraction=0.046, pad=0.02)
    fig.suptitle(f"{product}: test images, ground truth, anomaly map (red title: wrong decision)", fontsize=TITLE_PT)
    return to_png(fig, dpi=DPI)


def heatmap_overlay_png(rgb: np.ndarray, anomaly_map: np.ndarray, pixel_threshold: float | None, vmax: float | None = None, size: int = 256,
                        decision: tuple[str, float, float, str] | None = None) -> bytes:
    """One operator overlay as PNG: the image with a jet heat map blended in and a white contour
    where the map exceeds ``pixel_threshold``; ``decision`` = (OK/NG, score, threshold, product) is written in a
    banner across the top (red for NG, green for OK), so the picture says what was decided and why.

    ``rgb``: HxWx3 uint8; ``anomaly_map``: hxw float. The colour scale runs from 0 to ``vmax``
    (default twice the pixel threshold, so "at threshold" is the middle of the scale).
    """
    from PIL import Image

    base = Image.fromarray(np.ascontiguousarray(rgb)).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    amap = Image.fromarray(np.asarray(anomaly_map, dtype=np.float32)).resize((size, size), Image.Resampling.BILINEAR)
    values = np.asarray(amap, dtype=np.float64)
    top = vmax if vmax is not None else (2.0 * pixel_threshold if pixel_threshold and pixel_threshold > 0 else float(values.max()) or 1.0)
    colours = colormaps["jet"](np.clip(values / top, 0.0, 1.0))[..., :3]
    blended = 0.55 * np.asarray(base, dtype=np.float64) / 255.0 + 0.45 * colours
    if pixel_threshold is not None:
        above = values > pixel_threshold
        interior = above.copy()
        interior[1:, :] &= above[:-1, :]
        interior[:-1, :] &= above[1:, :]
        interior[:, 1:] &= above[:, :-1]
        interior[:, :-1] &= above[:, 1:]
        blended[above & ~interior] = 1.0
    image = Image.fromarray((np.clip(blended, 0.0, 1.0) * 255).astype(np.uint8))
    if decision is not None:
        _decision_banner(image, *decision)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _decision_banner(image: Any, decision: str, score: float, threshold: float, product: str) -> None:
    """Draw ``NG  score 1.42 > 1.28  (product)`` on a red (NG) or green (OK) band across the top of ``image``."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    height = max(12, image.height // 14)
    draw.rectangle((0, 0, image.width, height), fill=(200, 30, 30) if decision == "NG" else (30, 140, 60))
    relation = ">" if score > threshold else "<="
    draw.text((4, max(0, (height - 10) // 2)), f"{decision}  score {score:.3g} {relation} {threshold:.3g}  ({product})", fill=(255, 255, 255))

def depth_panel(ax: Any, xyz: torch.Tensor) -> None:
    """Height (-z, per-image 1-99 % range) of a (3, H, W) point cloud; invalid points (all 0) in grey."""
    z = xyz[2].detach().float().cpu().numpy()
    valid = (xyz.detach().cpu().numpy() != 0).any(axis=0)
    height = np.ma.masked_where(~valid, -z)
    low, high = (np.percentile(-z[valid], [1, 99]) if valid.any() else (0.0, 1.0))
    ax.imshow(height, cmap=colormaps["viridis"].with_extremes(bad="0.6"), vmin=low, vmax=max(high, low + 1e-9))
    ax.set_title("depth (height; grey = invalid)", fontsize=LABEL_PT)
    ax.set_axis_off()


def comparison_figure(runs: Sequence[tuple[str, dict[str, Any]]], products: list[str], metric: str = "image_auroc") -> bytes:
    """Grouped bars of final ``metric`` per product (+ Average) per run, and FM of every metric."""
    n_runs = len(runs)
    columns = products + ["Average"]
    fig = Figure(figsize=(min(9.0, max(7.0, 0.6 * len(columns) * max(1, n_runs) + 2.5)), 7.5))
    top, bottom = fig.subplots(2, 1)
    width = 0.8 / max(1, n_runs)
    colours = colormaps["tab10"]
    fm_metrics = list(METRIC_KEYS)
    for r, (label, doc) in enumerate(runs):
        final = doc["final"].get(metric, {})
        heights = [final.get(p) for p in products] + [doc["average"].get(metric)]
        xs = np.arange(len(columns)) + (r - (n_runs - 1) / 2) * width
        bars = top.bar(xs, [np.nan if h is None else 100 * h for h in heights], width, label=label, color=colours(r % 10))
        top.bar_label(bars, fmt="%.1f", fontsize=CELL_PT, padding=1)
        fm = [doc["forgetting"].get(m) for m in fm_metrics]
        xf = np.arange(len(fm_metrics)) + (r - (n_runs - 1) / 2) * width
        bars = bottom.bar(xf, [np.nan if v is None else 100 * v for v in fm], width, label=label, color=colours(r % 10))
        bottom.bar_label(bars, fmt="%.1f", fontsize=CELL_PT, padding=1)
    top.set_xticks(range(len(columns)), labels=columns, rotation=30, ha="right", fontsize=LABEL_PT)
    top.set_ylabel(f"final {metric_title(metric)} (%)")
    top.set_ylim(0, 110)
    top.set_title(f"Final {metric_title(metric)} per product", fontsize=TITLE_PT)
    top.legend(fontsize=LABEL_PT, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    top.grid(axis="y", alpha=0.3)
    bottom.set_xticks(range(len(fm_metrics)), labels=[metric_title(m) for m in fm_metrics], rotation=30, ha="right", fontsize=LABEL_PT)
    bottom.set_ylabel("forgetting FM (%, lower is better)")
    bottom.axhline(0, color="black", linewidth=0.8)
    bottom.set_title("Forgetting measure per metric", fontsize=TITLE_PT)
    bottom.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return to_png(fig, dpi=DPI)

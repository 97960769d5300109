"""Markdown + PNG reports of one continual run, and side-by-side comparisons of several runs.

Tables follow the layout of the continual-AD papers (UCAD, IUF): columns are products in
training order plus ``Average`` (mean of the final row) and ``FM`` (forgetting measure); rows
are methods (comparison) or training steps (accuracy matrix). Values are percentages.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from components.errors import ContadError
from components.eval.continual import validate_metrics_json
from components.eval.figures import (
    comparison_figure,
    matrix_heatmap,
    metric_title,
    overlay_figure,
    safe_name,
    step_curves,
)
from components.eval.metrics import METRIC_KEYS
from components.eval.thresholds import Calibration
from components.types import ImageBatch, Prediction

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
COMPARISON_FILE = "comparison.md"
FIGURES_DIR = "figures"


def fmt(value: float | None) -> str:
    """A metric in percent with one decimal; ``–`` when undefined."""
    return "–" if value is None else f"{100 * value:.1f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table (first column left-aligned, the rest right-aligned)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def load_metrics(run_dir: Path) -> dict[str, Any]:
    """Read and validate ``run_dir/metrics.json``; ``ContadError`` naming the path otherwise."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ContadError(f"{path}: no metrics.json in run directory {run_dir} (was the run completed?)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ContadError(f"{path}: not readable JSON: {exc}") from exc
    validate_metrics_json(doc, str(path))
    return doc


def method_row(label: str, doc: dict[str, Any], metric: str, products: list[str]) -> list[str]:
    """One paper-style row: label, final value per product, Average, FM."""
    final = doc["final"].get(metric, {})
    return [label] + [fmt(final.get(p)) for p in products] + [fmt(doc["average"].get(metric)), fmt(doc["forgetting"].get(metric))]


def _row_average(row: list[float | None]) -> float | None:
    defined = [v for v in row if v is not None]
    return sum(defined) / len(defined) if defined else None


def _step_names(doc: dict[str, Any], n_rows: int) -> list[str]:
    steps = doc.get("steps")
    if steps and len(steps) == n_rows:
        return [f"{i}: {'+'.join(g)}" for i, g in enumerate(steps)]
    return [str(i) for i in range(n_rows)]


def thresholds_markdown(thresholds: dict[str, Any]) -> list[str]:
    """Lines describing the deployed per-task thresholds (a ``Calibration.to_dict()``)."""
    rows = [[f"`{task}`", f"{t['image']:.4g}", f"{t['pixel']:.4g}", str(t["n_images"])] for task, t in thresholds["tasks"].items()]
    return [
        "## Decision thresholds",
        "",
        f"Per task, from held-out training normals only (never test images): image threshold at a target "
        f"false-reject rate of {100 * thresholds['target_fpr']:.3g}% (a part is NG when its score is above the threshold "
        f"of the task it is routed to), pixel threshold (heat-map contour) at {100 * thresholds['pixel_fpr']:.3g}% of normal "
        "pixels. With n held-out normals the false-reject rate is controlled only to 1/n. Escape rate (defective parts "
        "passed as OK) and false-reject rate (good parts rejected) of the test images at these thresholds are in the "
        "tables above.",
        "",
        markdown_table(["task", "image threshold", "pixel threshold", "held-out normals"], rows),
    ]

def masks_provider_lines(doc: dict[str, Any]) -> list[str]:
    """The report line naming the structure-mask provider a run used (and why, when it fell back)."""
    used = doc.get("masks_provider_used")
    if not used:
        return []
    reason = doc.get("masks_fallback_reason")
    why = f" (fallback: `{doc.get('masks_provider_requested')}` was requested but {reason})" if reason else ""
    return [f"- structure masks used: `{used}`{why}"]


def run_markdown(doc: dict[str, Any], figures: dict[str, str]) -> str:
    """The ``report.md`` text of one run; ``figures`` maps a figure key to its relative path."""
    tasks = doc["tasks"]
    metrics = [m for m in doc["matrix"] if m in METRIC_KEYS] + [m for m in doc["matrix"] if m not in METRIC_KEYS]
    parts = [
        f"# Continual anomaly detection report: {doc['method']}",
        "",
        f"- protocol: `{doc['protocol']}`; products in training order: {', '.join(tasks)}",
        f"- routing accuracy (last step, mean over products): {fmt(doc.get('routing_accuracy'))}%",
        *masks_provider_lines(doc),
        "- values in %; Average = mean of the last row of the accuracy matrix; FM = forgetting measure "
        "(mean over products learned before the last step of the best earlier value minus the final value; "
        "lower is better); BWT = backward transfer (final minus value right after learning). Escape and "
        "false-reject rates (decisions at the deployed per-product thresholds) are lower-is-better: their FM is the rise.",
        "- `–` = not learned yet or undefined (e.g. pixel metrics of a product without defective test images).",
        "",
        "## Final results",
        "",
        markdown_table(
            ["metric"] + tasks + ["Average", "FM", "BWT"],
            [
                [metric_title(m)] + method_row(doc["method"], doc, m, tasks)[1:] + [fmt(doc.get("bwt", {}).get(m))]
                for m in metrics
            ],
        ),
    ]
    if "tasks" in (doc.get("thresholds") or {}):
        parts += ["", *thresholds_markdown(doc["thresholds"])]
    parts += ["", "## Accuracy matrices", "", "Rows: after training step; columns: evaluated product."]
    for m in metrics:
        rows = doc["matrix"][m]
        names = _step_names(doc, len(rows))
        table = [[names[i]] + [fmt(v) for v in row] + [fmt(_row_average(row))] for i, row in enumerate(rows)]
        parts += ["", f"### {metric_title(m)}", "", markdown_table(["step"] + tasks + ["Average"], table)]
        if f"heatmap_{m}" in figures:
            parts += ["", f"![{metric_title(m)} accuracy matrix]({figures[f'heatmap_{m}']})"]
    if "curves" in figures:
        parts += ["", "## Image AUROC across steps", "", f"![image AUROC per product across steps]({figures['curves']})"]
    overlays = [k for k in figures if k.startswith("overlay_")]
    if overlays:
        parts += ["", "## Anomaly maps", "", "Good and defective test images: image (title: score vs. the routed task's image threshold and the decision; red = wrong decision), ground truth, anomaly heatmap (white contour: the routed task's pixel threshold from held-out training normals)."]
        parts += [f"\n### {k.removeprefix('overlay_')}\n\n![{k}]({figures[k]})" for k in overlays]
    return "\n".join(parts) + "\n"


def write_report(
    run_dir: Path, metrics: dict[str, Any], overlays: dict[str, tuple[ImageBatch, Prediction]] | None = None
) -> Path:
    """Write ``metrics.json``, ``figures/*.png`` and ``report.md`` into ``run_dir``; returns report path.

    ``metrics`` is a ``metrics.json`` document (``AccuracyMatrix.to_metrics_json``); an optional
    ``"thresholds"`` entry (``Calibration.to_dict()``) adds decisions and contours to the overlays.
    """
    run_dir = Path(run_dir)
    validate_metrics_json(metrics, f"metrics for {run_dir}")
    atomic_write_json(run_dir / METRICS_FILE, metrics)
    figures: dict[str, str] = {}

    def save(key: str, name: str, png: bytes) -> None:
        atomic_write_bytes(run_dir / FIGURES_DIR / name, png)
        figures[key] = f"{FIGURES_DIR}/{name}"

    for m in metrics["matrix"]:
        save(f"heatmap_{m}", f"matrix_{safe_name(m)}.png", matrix_heatmap(metrics, m))
    save("curves", "image_auroc_steps.png", step_curves(metrics, "image_auroc"))
    calibration = Calibration.from_dict(metrics["thresholds"]) if "tasks" in (metrics.get("thresholds") or {}) else None
    for product, (batch, prediction) in (overlays or {}).items():
        if len(batch) == 0:
            continue
        save(f"overlay_{product}", f"overlay_{safe_name(product)}.png", overlay_figure(product, batch, prediction, calibration))
    path = atomic_write_text(run_dir / REPORT_FILE, run_markdown(metrics, figures))
    log.info("report written to %s (%d figures)", path, len(figures))
    return path


def _run_labels(runs: Sequence[Path], docs: Sequence[dict[str, Any]]) -> list[str]:
    """Method names, disambiguated by run directory name when two runs share a method."""
    methods = [d["method"] for d in docs]
    return [m if methods.count(m) == 1 else f"{m} ({Path(r).name})" for m, r in zip(methods, runs)]


def comparison_markdown(labels: list[str], runs: Sequence[Path], docs: Sequence[dict[str, Any]], figure: str) -> str:
    """The ``comparison.md`` text: one paper-style table per metric, rows = methods."""
    products: list[str] = []
    for d in docs:
        products += [p for p in d["tasks"] if p not in products]
    parts = [
        "# Continual anomaly detection: comparison",
        "",
        markdown_table(
            ["method", "run", "protocol", "products", "routing acc."],
            [[l, f"`{r}`", d["protocol"], str(len(d["tasks"])), fmt(d.get("routing_accuracy"))] for l, r, d in zip(labels, runs, docs)],
        ),
        "",
        "Values in %: final value per product (after the last step), Average over products, FM = forgetting measure (lower is better).",
    ]
    if len({tuple(d["tasks"]) for d in docs}) > 1 or len({d["protocol"] for d in docs}) > 1:
        parts += ["", "**Note:** runs differ in products or protocol; their averages are not directly comparable."]
    for m in METRIC_KEYS:
        rows = [method_row(l, d, m, products) for l, d in zip(labels, docs)]
        parts += ["", f"## {metric_title(m)}", "", markdown_table(["method"] + products + ["Average", "FM"], rows)]
    parts += ["", f"![comparison]({figure})"]
    return "\n".join(parts) + "\n"


def report_command(runs: list[Path], out: Path | None = None) -> int:
    """``contad report RUN_DIR...``: comparison tables and figure of several runs into ``out``."""
    if not runs:
        raise ContadError("contad report needs at least one run directory")
    docs = [load_metrics(Path(r)) for r in runs]
    out = Path(out) if out is not None else Path(runs[0])
    labels = _run_labels(runs, docs)
    products: list[str] = []
    for d in docs:
        products += [p for p in d["tasks"] if p not in products]
    figure = f"{FIGURES_DIR}/comparison_image_auroc.png"
    atomic_write_bytes(out / figure, comparison_figure(list(zip(labels, docs)), products, "image_auroc"))
    path = atomic_write_text(out / COMPARISON_FILE, comparison_markdown(labels, runs, docs, figure))
    print(f"comparison of {len(docs)} run(s) written to {path}")
    return 0

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
    comparison_matrices,
    family_heatmaps,
    metric_families,
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


def family_table(doc: dict[str, Any], metrics: list[str]) -> str:
    """Final value per product, Average, FM and BWT of every metric of a family (rows = metrics)."""
    tasks = doc["tasks"]
    return markdown_table(
        ["metric"] + tasks + ["Average", "FM", "BWT"],
        [[metric_title(m)] + method_row(doc["method"], doc, m, tasks)[1:] + [fmt(doc.get("bwt", {}).get(m))] for m in metrics],
    )


def run_markdown(doc: dict[str, Any], figures: dict[str, str]) -> str:
    """The ``report.md`` text of one run; ``figures`` maps a figure key to its relative path.

    One section per metric family (``metric_families``): a table of the final values, Average,
    FM and BWT, and one figure with the accuracy matrix of every metric of the family after every
    step and the forgetting matrix of its headline metric.
    """
    tasks = doc["tasks"]
    parts = [
        f"# Continual anomaly detection report: {doc['method']}",
        "",
        f"- protocol: `{doc['protocol']}`; products in training order: {', '.join(tasks)}",
        f"- routing accuracy (last step, mean over products): {fmt(doc.get('routing_accuracy'))}%",
        *masks_provider_lines(doc),
        "- every value is in %. Tables: final value per product (after the last step); Average = mean of those; "
        "FM = forgetting measure (mean over products learned before the last step of the best earlier value minus "
        "the final value; lower is better); BWT = backward transfer (final minus value right after learning). "
        "Escape and false-reject rates (decisions at the deployed per-product thresholds) are lower-is-better: "
        "their FM is the rise.",
        "- heatmaps: rows = after training step, columns = evaluated product; blank = not learned yet, "
        "`n/a` (tables: `–`) = undefined (e.g. pixel metrics of a product without defective test images). "
        "Forgetting of a product after a step = its best earlier value minus its value now (red = forgotten, "
        "blue = improved); the last row averaged is FM. All steps as CSV: `matrices/`.",
    ]
    for family, metrics in metric_families(list(doc["matrix"])).items():
        parts += ["", f"## {family}", "", family_table(doc, metrics)]
        key = f"family_{safe_name(family)}"
        if key in figures:
            parts += ["", f"![{family}: accuracy and forgetting matrices]({figures[key]})"]
        if metrics[0] == "image_auroc" and "curves" in figures:
            parts += ["", f"![image AUROC per product across steps]({figures['curves']})"]
    if "tasks" in (doc.get("thresholds") or {}):
        parts += ["", *thresholds_markdown(doc["thresholds"])]
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

    for family, keys in metric_families(list(metrics["matrix"])).items():
        save(f"family_{safe_name(family)}", f"family_{safe_name(family).lower()}.png", family_heatmaps(metrics, family, keys))
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


def comparison_markdown(labels: list[str], runs: Sequence[Path], docs: Sequence[dict[str, Any]], figures: list[str]) -> str:
    """The ``comparison.md`` text: one table per metric family (rows = metric x method), then the figures."""
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
        "Values in %: final value per product (after the last step), Average over products, FM = forgetting "
        "measure (best earlier value minus final value, mean over products learned before the last step; lower is better).",
    ]
    if len({tuple(d["tasks"]) for d in docs}) > 1 or len({d["protocol"] for d in docs}) > 1:
        parts += ["", "**Note:** runs differ in products or protocol; their averages are not directly comparable."]
    metrics = [m for m in METRIC_KEYS] + sorted({m for d in docs for m in d["matrix"]} - set(METRIC_KEYS))
    for family, keys in metric_families(metrics).items():
        rows = [[metric_title(m)] + method_row(l, d, m, products) for m in keys for l, d in zip(labels, docs) if m in d["matrix"]]
        parts += ["", f"## {family}", "", markdown_table(["metric", "method"] + products + ["Average", "FM"], rows)]
    parts += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})\n" for f in figures]
    return "\n".join(parts).rstrip() + "\n"


def report_command(runs: list[Path], out: Path | None = None, dvc_dir: Path | None = None) -> int:
    """``contad report RUN_DIR...``: comparison tables and figure of several runs into ``out``;
    with ``dvc_dir`` also the DVC metrics and plot files of the first run (``components.eval.dvc_export``)."""
    if not runs:
        raise ContadError("contad report needs at least one run directory")
    docs = [load_metrics(Path(r)) for r in runs]
    if dvc_dir is not None:
        from components.eval.dvc_export import write_dvc_files

        written = write_dvc_files(docs[0], Path(dvc_dir))
        print(f"DVC metrics and plot files of {runs[0]} written to {Path(dvc_dir)} ({len(written)} files)")
    out = Path(out) if out is not None else Path(runs[0])
    labels = _run_labels(runs, docs)
    products: list[str] = []
    for d in docs:
        products += [p for p in d["tasks"] if p not in products]
    figures = [f"{FIGURES_DIR}/comparison_image_auroc.png", f"{FIGURES_DIR}/comparison_forgetting_image_auroc.png"]
    atomic_write_bytes(out / figures[0], comparison_figure(list(zip(labels, docs)), products, "image_auroc"))
    atomic_write_bytes(out / figures[1], comparison_matrices(list(zip(labels, docs)), "image_auroc"))
    path = atomic_write_text(out / COMPARISON_FILE, comparison_markdown(labels, runs, docs, figures))
    print(f"comparison of {len(docs)} run(s) written to {path}")
    return 0

"""Markdown + PNG reports of one continual run, and side-by-side comparisons of several runs.

Tables follow the layout of the continual-AD papers (UCAD, IUF): columns are products in
training order plus ``Average`` (mean of the final row) and ``FM`` (forgetting measure); rows
are methods (comparison) or training steps (accuracy matrix). Values are percentages.
"""

from __future__ import annotations

import json
import math
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from components.errors import ContadError
from components.eval.chance import CHANCE_LEVEL, counts_band, inside
from components.eval.continual import validate_metrics_json
from components.eval.figures import (
    POINTS_FAMILY,
    PROMISES_FAMILY,
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
from components.eval.operating_points import percent_label
from components.eval.thresholds import Calibration
from components.types import ImageBatch, Prediction

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
COMPARISON_FILE = "comparison.md"
FEEDBACK_FILE = "feedback.json"
FEEDBACK_KINDS = ("false_reject", "escape", "confirmed_ok", "confirmed_ng")
FIGURES_DIR = "figures"


# One line per term, in the order a reader meets them; ``glossary_markdown`` puts them near the top of both reports.
GLOSSARY: tuple[tuple[str, str], ...] = (
    ("AUROC (image AUROC)", "area under the ROC curve of the image anomaly scores: the chance that a random defective "
     "image scores above a random good one (50 = guessing, 100 = perfect); threshold-free."),
    ("Pixel AUROC", "the same over pixels: defect pixels of the ground-truth masks against all normal pixels (localisation)."),
    ("AUPRO@0.3", "area under the per-region-overlap curve up to a pixel false-positive rate of 30 % (`eval.aupro_fpr_limit`), "
     "divided by that limit (100 = perfect): every defect region counts equally, so small defects weigh as much as large ones."),
    ("AP (image AP, pixel AP)", "average precision: area under the precision-recall curve; unlike AUROC it drops when "
     "few anomalies hide among many normals."),
    ("F1-max (image F1-max, pixel F1-max)", "the best F1 score (harmonic mean of precision and recall) over all thresholds."),
    ("Average", "mean over products of the final value (after the last training step)."),
    ("FM", "forgetting measure: per product learned before the last step, its best earlier value minus its final value, "
     "averaged; lower is better (for error rates, the rise)."),
    ("BWT", "backward transfer: final value minus the value right after the product was learned, averaged over earlier "
     "products; negative = forgetting."),
    ("Routing accuracy", "share of test images that the method sends, without any product label, to the task of their own product."),
    ("Escape rate", "share of defective test parts passed as OK at the deployed per-product threshold (lower is better)."),
    ("False-reject rate (FRR)", "share of good test parts rejected as NG at the deployed per-product threshold (lower is better)."),
    ("Promised FRR, false-reject bound, escape estimate", "what the calibration promises before any test image: the FRR the "
     "threshold controls, max(target, 1/n) with n calibration normals (of the task each good part is routed to, averaged "
     "over the product's good parts: the threshold a part meets is its routed task's); the largest FRR on this many good test parts still "
     "consistent with that promise; the share of synthetic defects pasted on held-out normals that would pass as OK."),
    ("Escape / false-reject rate @ P % promise", "the same two rates when every threshold is taken from the same calibration "
     "at a false-reject promise of P % (`decision.operating_points`) instead of the deployed one: what a detector loaded "
     "with `decision.target_fpr` = P would decide."),
    ("Promised false-reject rate / promise broken @ P % promise", "what the calibration can promise at P %: max(P, 1/n) "
     "with n calibration normals (it promises no less); broken = 100 when the measured false-reject rate lies above the "
     "largest one consistent with that promise on this many good test parts (95 % binomial bound), else 0; the Average "
     "is the share of products whose promise broke."),
)


def glossary_markdown() -> list[str]:
    """The ``## Glossary`` section: one line per metric and term of the reports (``GLOSSARY``)."""
    return ["## Glossary", "", *(f"- **{term}**: {text}" for term, text in GLOSSARY)]


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


def _percent(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * float(value):.1f}"


def thresholds_markdown(thresholds: dict[str, Any], final: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Lines describing the deployed per-task thresholds (a ``Calibration.to_dict()``), what they promise
    and, per product, the measured test rates beside them (``final``: metrics.json's ``final``)."""
    final = final or {}
    task_of_product = thresholds.get("task_of_product") or {t: t for t in thresholds["tasks"]}
    rows = []
    for product, task in task_of_product.items():
        t = thresholds["tasks"].get(task)
        if t is None:
            continue
        rows.append([f"`{product}`", f"{t['image']:.4g}", f"{t['pixel']:.4g}", str(t["n_images"]),
                     _percent((final.get("promised_fpr") or {}).get(product, t.get("promised_fpr"))),
                     _percent((final.get("false_reject_bound") or {}).get(product)),
                     _percent((final.get("false_reject_rate") or {}).get(product)),
                     _percent(t.get("escape_estimate")), _percent((final.get("escape_rate") or {}).get(product))])
    return [
        "## Thresholds and what they promise",
        "",
        f"Per task, from normal TRAINING images only (never test images): held-out normals routed to the task and, for "
        f"memory-bank methods, every training image scored against the memory without its own patches (leave-one-out). "
        f"The image threshold is set for a false-reject rate of {100 * thresholds['target_fpr']:.3g}% (a part is NG when its "
        f"score is above the threshold of the task it is routed to); the pixel threshold (heat-map contour) at "
        f"{100 * thresholds['pixel_fpr']:.3g}% of normal pixels. *Promised FRR*: the false-reject rate the threshold "
        "controls, max(target, 1/n) with n calibration normals; *FRR bound*: the largest measured rate on this many good "
        "test parts that is consistent with that promise (95 % binomial quantile); a measured FRR above it breaks the "
        "promise. *Measured FRR*: good test parts rejected. *Escape "
        "estimate*: synthetic defects pasted on held-out normals that pass as OK (known before any test image); "
        "*measured escape*: defective test parts passed as OK. Rates in %.",
        "",
        markdown_table(["product", "image threshold", "pixel threshold", "calibration normals", "promised FRR", "FRR bound (95 %)", "measured FRR",
                        "escape estimate", "measured escape"], rows),
    ]


def operating_points_lines(doc: dict[str, Any]) -> list[str]:
    """What the "other promises" table is: the same calibration's thresholds at each promise of
    ``decision.operating_points`` (``components/eval/operating_points.py``), read on the test split, chosen from by no one."""
    target = (doc.get("thresholds") or {}).get("target_fpr")
    deployed = f" The deployed promise is {percent_label(float(target))} % (`decision.target_fpr`)." if target is not None else ""
    return ["", "Escape and false-reject rates of the test images when the thresholds are taken from the same calibration "
            "(training normals only) at another false-reject promise: what `contad predict --bank ... decision.target_fpr=P` "
            "would decide, without retraining. A line trades false rejects for escapes here; the promise is its choice "
            f"(`decision.operating_points` lists which are read).{deployed}"]


def promises_lines() -> list[str]:
    """What the "promises" table is: what each promise of ``decision.operating_points`` could be, and whether it held."""
    return ["", "With n calibration normals a task promises no less than 1/n, whatever promise P is asked for (*promised*: "
            "max(P, 1/n)); *promise broken* is 100 for a product whose good test parts were rejected more often than that "
            "promise allows on this many of them (95 % binomial bound), else 0, so its Average is the share of products "
            "whose promise broke."]


def masks_provider_lines(doc: dict[str, Any]) -> list[str]:
    """The report line naming the structure-mask provider a run used (and why, when it fell back)."""
    used = doc.get("masks_provider_used")
    if not used:
        return []
    reason = doc.get("masks_fallback_reason")
    why = f" (fallback: `{doc.get('masks_provider_requested')}` was requested but {reason})" if reason else ""
    return [f"- structure masks used: `{used}`{why}"]


def feature_settings_lines(doc: dict[str, Any]) -> list[str]:
    """The report lines naming the feature settings each task took under ``feature_choices`` (UCAD, the oracle) and what
    the choice measured (held-out synthetic image AUROC per candidate); none when no task chose."""
    settings = doc.get("feature_settings") or {}
    if not settings:
        return []
    lines = ["- feature settings per task (`feature_choices`; chosen while the task was learned, on its held-out "
             "training normals + synthetic defects, never on test images):"]
    for task, entry in settings.items():
        choice = entry.get("choice") or {}
        if "skipped" in choice:
            why = f"no choice: {choice['skipped']}"
        else:
            measured = ", ".join(f"{name} {fmt(value)}" for name, value in (choice.get("image_auroc") or {}).items())
            why = f"held-out synthetic image AUROC {measured}; margin {fmt(choice.get('margin'))}"
        lines.append(f"  - `{task}`: **{entry.get('features')}** ({why})")
    return lines


def chance_band_lines(doc: dict[str, Any]) -> list[str]:
    """The lines under the image-level table giving each product's chance band of image AUROC (from its test
    image counts, ``components.eval.chance``) and naming the products whose final value lies inside it."""
    counts = doc.get("test_images") or {}
    final = doc["final"].get("image_auroc", {})
    bands = []
    for product in doc["tasks"]:
        band = counts_band(counts.get(product))
        if band is None:
            continue
        n, value = counts[product], final.get(product)
        bands.append(f"`{product}` {fmt(band[0])}–{fmt(band[1])} ({n['good']} good / {n['defective']} defective"
                     + (f"; **{fmt(value)} is inside**" if inside(value, band) else "") + ")")
    if not bands:
        return []
    return ["", f"Chance band of image AUROC: where a detector whose scores separate nothing lands {100 * CHANCE_LEVEL:.0f} % of "
            "the time on this many good and defective test images; a value inside it shows neither detection nor an "
            "inversion (below 50). " + ", ".join(bands) + "."]


def family_table(doc: dict[str, Any], metrics: list[str]) -> str:
    """Final value per product, Average, FM and BWT of every metric of a family (rows = metrics)."""
    tasks = doc["tasks"]
    return markdown_table(
        ["metric"] + tasks + ["Average", "FM", "BWT"],
        [[metric_title(m)] + method_row(doc["method"], doc, m, tasks)[1:] + [fmt(doc.get("bwt", {}).get(m))] for m in metrics],
    )


def run_markdown(doc: dict[str, Any], figures: dict[str, str], standing: list[str] | None = None) -> str:
    """The ``report.md`` text of one run; ``figures`` maps a figure key to its relative path; ``standing``:
    the "Where this method stands" section (``components.eval.standing``), placed after the run's facts.

    One section per metric family (``metric_families``): a table of the final values, Average,
    FM and BWT, and one figure with the accuracy matrix of every metric of the family after every
    step and the forgetting matrix of its headline metric.
    """
    tasks = doc["tasks"]
    parts = [
        f"# Continual anomaly detection report: {doc['method']}",
        "",
        *glossary_markdown(),
        "",
        "## Run",
        "",
        f"- protocol: `{doc['protocol']}`; products in training order: {', '.join(tasks)}",
        f"- routing accuracy (last step, mean over products): {fmt(doc.get('routing_accuracy'))}%",
        *masks_provider_lines(doc),
        *feature_settings_lines(doc),
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
    if standing:
        parts += ["", *standing]
    for family, metrics in metric_families(list(doc["matrix"])).items():
        parts += ["", f"## {family}", "", family_table(doc, metrics)]
        if metrics[0] == "image_auroc":
            parts += chance_band_lines(doc)
        if family == POINTS_FAMILY:
            parts += operating_points_lines(doc)
        if family == PROMISES_FAMILY:
            parts += promises_lines()
        key = f"family_{safe_name(family)}"
        if key in figures:
            parts += ["", f"![{family}: accuracy and forgetting matrices]({figures[key]})"]
        if metrics[0] == "image_auroc" and "curves" in figures:
            parts += ["", f"![image AUROC per product across steps]({figures['curves']})"]
    if "tasks" in (doc.get("thresholds") or {}):
        parts += ["", *thresholds_markdown(doc["thresholds"], doc.get("final"))]
    overlays = [k for k in figures if k.startswith("overlay_")]
    if overlays:
        parts += ["", "## Anomaly maps", "", "Good and defective test images: image (title: score vs. the routed task's image threshold and the decision; red = wrong decision), ground truth, anomaly heatmap (white contour: the routed task's pixel threshold from held-out training normals)."]
        parts += [f"\n### {k.removeprefix('overlay_')}\n\n![{k}]({figures[k]})" for k in overlays]
    return "\n".join(parts) + "\n"


def write_report(
    run_dir: Path, metrics: dict[str, Any], overlays: dict[str, tuple[ImageBatch, Prediction]] | None = None,
    standing: list[str] | None = None,
) -> Path:
    """Write ``metrics.json``, ``figures/*.png`` and ``report.md`` (with the ``standing`` section, when given)
    into ``run_dir``; returns report path.

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
    path = atomic_write_text(run_dir / REPORT_FILE, run_markdown(metrics, figures, standing))
    log.info("report written to %s (%d figures)", path, len(figures))
    return path


def _run_labels(runs: Sequence[Path], docs: Sequence[dict[str, Any]]) -> list[str]:
    """Method names, disambiguated by run directory name when two runs share a method."""
    methods = [d["method"] for d in docs]
    return [m if methods.count(m) == 1 else f"{m} ({Path(r).name})" for m, r in zip(methods, runs)]


def feedback_markdown(summary: dict[str, Any]) -> list[str]:
    """The "Operator feedback" section of a bank store's verdicts (``summary``: see ``report_command``)."""
    current = (summary.get("bank_version") or "-")[:12]
    rows = []
    for product, counts in summary["products"].items():
        learned = ", ".join(f"{n} in {version[:12]}" for version, n in sorted(counts["learned_in"].items())) or "-"
        passed = "-" if counts["escapes_passed_now"] is None else f"{counts['escapes_passed_now']} of {counts['escape']}"
        rows.append([product, *(str(counts[kind]) for kind in FEEDBACK_KINDS), f"{counts['false_rejects_learned']} ({learned})", passed])
    return [
        "## Operator feedback",
        "",
        f"Verdicts recorded in `{summary['store']}` (`contad feedback`, `POST /v1/feedback`): {summary['verdicts']}. "
        "A false reject is a part marked good that was decided NG (learned by `contad feedback apply` into the bank version "
        f"named); an escape is a part marked defect that was decided OK. The current bank version ({current}) scored every "
        "recorded escape again: \"escapes passed now\" counts those it still decides OK (lower is better).",
        "",
        markdown_table(["product", "false rejects", "escapes", "confirmed OK", "confirmed NG", "false rejects learned (in)",
                        f"escapes passed now ({current})"], rows),
    ]


def comparison_markdown(labels: list[str], runs: Sequence[Path], docs: Sequence[dict[str, Any]], figures: list[str],
                        feedback: dict[str, Any] | None = None) -> str:
    """The ``comparison.md`` text: one table per metric family (rows = metric x method), the operator feedback of a bank
    store (``feedback``, when given), then the figures."""
    products: list[str] = []
    for d in docs:
        products += [p for p in d["tasks"] if p not in products]
    parts = [
        "# Continual anomaly detection: comparison",
        "",
        *glossary_markdown(),
        "",
        "## Runs",
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
    if feedback is not None:
        parts += ["", *feedback_markdown(feedback)]
    parts += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})\n" for f in figures]
    return "\n".join(parts).rstrip() + "\n"


def report_command(runs: list[Path], out: Path | None = None, dvc_dir: Path | None = None, feedback: dict[str, Any] | None = None) -> int:
    """``contad report RUN_DIR...``: comparison tables and figure of several runs into ``out``;
    with ``dvc_dir`` also the DVC metrics and plot files of the first run (``components.eval.dvc_export``).

    ``feedback``: the operator verdicts of a bank store (``flows.feedback_report.feedback_summary``): ``{store, bank_version,
    verdicts, products: {product: {false_reject, escape, confirmed_ok, confirmed_ng, false_rejects_learned, learned_in:
    {bank version: n}, escapes_passed_now}}}``, shown as the "Operator feedback" section and written to ``feedback.json``."""
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
    if feedback is not None:
        atomic_write_json(out / FEEDBACK_FILE, feedback)
    path = atomic_write_text(out / COMPARISON_FILE, comparison_markdown(labels, runs, docs, figures, feedback))
    print(f"comparison of {len(docs)} run(s) written to {path}" + (f" (with the operator feedback of {feedback['store']})" if feedback else ""))
    return 0

"""The leaderboard: finished runs of every method over several seeds -> mean ± sd tables and a Pareto figure.

A run is a ``contad run`` output directory (``metrics.json`` + ``steps/*/train_log.json``), plus the
``bench.json`` that ``contad bench`` writes beside it (wall time, machine load, inference speed).
``summarise_run`` reads one run into flat numbers; ``aggregate`` gives per method the mean, sample
standard deviation and count over seeds of each; ``leaderboard_markdown`` and ``pareto_figure`` render
them. Undefined values (a forgetting measure after one task, a metric a method cannot compute) are NaN
and shown as "–", never 0. The papers' own figures beside ours: ``components.eval.paper_claims``.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from components.eval.chance import CHANCE_LEVEL, counts_band, inside
from components.eval.operating_points import RATES, READINGS, parse_point_key, percent_label, point_key, promises_in

# (column, key in the run summary, scale for display, higher is better)
COLUMNS: tuple[tuple[str, str, float, bool], ...] = (
    ("image AUROC", "image_auroc", 100.0, True),
    ("pixel AUROC", "pixel_auroc", 100.0, True),
    ("AUPRO", "aupro", 100.0, True),
    ("FM", "forgetting", 100.0, False),
    ("BWT", "bwt", 100.0, True),
    ("routing", "routing_accuracy", 100.0, True),
    ("escape @ thr", "escape_rate", 100.0, False),
    ("false reject @ thr", "false_reject_rate", 100.0, False),
    ("train s / product", "train_seconds_per_product", 1.0, False),
    ("img/s", "images_per_s", 1.0, True),
    ("MB / task", "mb_per_task", 1.0, False),
)


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and value is not None and math.isfinite(float(value)) else math.nan


def stored_bytes_per_task(run: Path, tasks: int) -> float:
    """Bytes of the run's final saved state (``steps/<last>/method``: what a deployment stores, keys, prompts,
    networks, buffers included) per learned product; NaN when the run kept no state."""
    steps = sorted(p for p in (run / "steps").glob("*/method") if p.is_dir())
    if not steps or tasks < 1:
        return math.nan
    return sum(f.stat().st_size for f in steps[-1].rglob("*") if f.is_file()) / tasks


def summarise_run(run: Path) -> dict[str, Any]:
    """Flat numbers of one finished run: averages, forgetting, routing, rates, costs; per-product image AUROC."""
    doc = json.loads((run / "metrics.json").read_text())
    logs = [json.loads(p.read_text()) for p in sorted((run / "steps").glob("*/train_log.json"))]
    extra = json.loads((run / "bench.json").read_text()) if (run / "bench.json").is_file() else {}
    stored = stored_bytes_per_task(run, len(doc["tasks"]))
    memory = [_num(log["log"].get("memory_bytes")) for log in logs]
    one_task = len(doc["tasks"]) < 2
    summary = {
        "method": doc["method"],
        "seed": extra.get("seed"),
        "products": list(doc["tasks"]),
        "image_auroc": _num(doc["average"]["image_auroc"]),
        "pixel_auroc": _num(doc["average"].get("pixel_auroc")),
        "aupro": _num(doc["average"].get("aupro")),
        "forgetting": math.nan if one_task else _num(doc["forgetting"]["image_auroc"]),
        "bwt": math.nan if one_task else _num(doc["bwt"]["image_auroc"]),
        "routing_accuracy": _num(doc.get("routing_accuracy")),
        "escape_rate": _num(doc["average"].get("escape_rate")),
        "false_reject_rate": _num(doc["average"].get("false_reject_rate")),
        "train_seconds_per_product": float(np.mean([log["seconds"] for log in logs])) if logs else math.nan,
        "mb_per_task": stored / 2**20 if not math.isnan(stored) else (
            float(np.nanmean(memory)) / 2**20 if memory and not all(math.isnan(m) for m in memory) else math.nan),
        "images_per_s": _num(extra.get("images_per_s")),
        "load": extra.get("load"),
        "overrides": list(extra.get("overrides", [])),
        "per_product": {p: _num(v) for p, v in doc["final"]["image_auroc"].items()},
        "operating_points": {k: _num(v) for k, v in doc["average"].items() if parse_point_key(k) is not None},
        "test_images": dict(doc.get("test_images") or {}) or recorded_test_images(run, list(doc["tasks"])),
    }
    return summary


def recorded_test_images(run: Path, products: list[str]) -> dict[str, dict[str, int]]:
    """Test image counts of a run whose ``metrics.json`` predates them: read from the data root its ``run.json``
    records (relative roots from the working directory); {} when that data cannot be read (the counts are advice)."""
    from components.errors import ContadError

    try:
        root = json.loads((run / "run.json").read_text())["config"]["data"]["root"]
        return {p: dict(n) for p, n in _dataset_test_images(str(Path(root).resolve()), tuple(products)).items()}
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ContadError):
        return {}


@functools.lru_cache(maxsize=8)
def _dataset_test_images(root: str, products: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Test image counts of ``products`` under ``root``, read once per board (every seed of every method shares the data)."""
    from components.data.manifest import count_test_images, read_dataset

    return count_test_images(read_dataset(Path(root), products=list(products)))


@dataclass
class MethodRow:
    """One method's numbers over seeds: ``stats[key] = (mean, sd, n)``; per product likewise."""

    method: str
    seeds: list[int | None]
    stats: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    per_product: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    operating_points: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # readings at other promises (READINGS)


UNDEFINED: tuple[float, float, int] = (math.nan, math.nan, 0)  # (mean, sd, n) of no value


def _stat(values: list[float]) -> tuple[float, float, int]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return UNDEFINED
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return float(np.mean(finite)), sd, len(finite)


def aggregate(summaries: list[dict[str, Any]]) -> list[MethodRow]:
    """Per method (in first-seen order): mean, sample sd and count over its runs of every column."""
    rows: dict[str, MethodRow] = {}
    for s in summaries:
        rows.setdefault(s["method"], MethodRow(s["method"], []))
        rows[s["method"]].seeds.append(s["seed"])
    for method, row in rows.items():
        runs = [s for s in summaries if s["method"] == method]
        row.stats = {key: _stat([_num(s[key]) for s in runs]) for _, key, _, _ in COLUMNS}
        products = sorted({p for s in runs for p in s["per_product"]})
        row.per_product = {p: _stat([s["per_product"].get(p, math.nan) for s in runs]) for p in products}
        points = sorted({k for s in runs for k in s.get("operating_points") or {}})  # runs recorded before them have none
        row.operating_points = {k: _stat([(s.get("operating_points") or {}).get(k, math.nan) for s in runs]) for k in points}
    return sorted(rows.values(), key=lambda r: -r.stats["image_auroc"][0] if not math.isnan(r.stats["image_auroc"][0]) else math.inf)


def test_images(summaries: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """``{product: {"good": n, "defective": n}}`` of the runs' test splits (the first run that records a product)."""
    counts: dict[str, dict[str, int]] = {}
    for s in summaries:
        for product, n in (s.get("test_images") or {}).items():
            counts.setdefault(product, n)
    return counts


def chance_bands(counts: dict[str, dict[str, int]], products: list[str]) -> str:
    """``grid 18.2–81.8 (3 good / 11 defective), ...``: each product's chance band of image AUROC in %
    (``components.eval.chance``); "" when no product has both good and defective test images."""
    bands = {p: band for p in products if (band := counts_band(counts.get(p))) is not None}
    return ", ".join(f"{p} {100 * lo:.1f}–{100 * hi:.1f} ({counts[p]['good']} good / {counts[p]['defective']} defective)"
                     for p, (lo, hi) in bands.items())


CHANCE_MEANING = (f"{100 * CHANCE_LEVEL:.0f} % of the image AUROCs a detector that separates nothing gets on this many test "
                  "images lie inside; inside it a value shows neither detection nor an inversion")


def cell(stat: tuple[float, float, int], scale: float, digits: int = 1) -> str:
    """``mean ± sd`` (sd only with 2+ values), "–" when undefined."""
    mean, sd, n = stat
    if n == 0:
        return "–"
    text = f"{scale * mean:.{digits}f}"
    return f"{text} ± {scale * sd:.{digits}f}" if n > 1 and not math.isnan(sd) else text


def leaderboard_markdown(rows: list[MethodRow], title: str, notes: list[str], counts: dict[str, dict[str, int]] | None = None) -> str:
    """The leaderboard table (one row per method), its per-product image AUROC table and the notes;
    ``counts`` (test images per product): per-product cells inside the chance band are marked °."""
    counts = counts or {}

    def product_cell(stat: tuple[float, float, int], product: str) -> str:
        marked = stat[2] > 0 and inside(stat[0], counts_band(counts.get(product)))
        return cell(stat, 100.0) + (" °" if marked else "")

    head = "| method | seeds | " + " | ".join(c for c, _, _, _ in COLUMNS) + " |"
    lines = [f"## {title}", "", head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = [cell(r.stats[key], scale, 1 if scale == 100.0 else 2) for _, key, scale, _ in COLUMNS]
        lines.append(f"| {r.method} | {len(r.seeds)} | " + " | ".join(cells) + " |")
    products = sorted({p for r in rows for p in r.per_product})
    if products:
        lines += ["", "Final image AUROC per product (mean ± sd over seeds):", "",
                  "| method | " + " | ".join(products) + " |", "|" + "---|" * (len(products) + 1)]
        for r in rows:
            lines.append(f"| {r.method} | " + " | ".join(product_cell(r.per_product.get(p, UNDEFINED), p) for p in products) + " |")
        bands = chance_bands(counts, products)
        if bands:
            lines += ["", f"° = the mean lies inside the product's chance band ({CHANCE_MEANING}): {bands}."]
    lines += operating_points_table(rows)
    return "\n".join(lines + [""] + [f"- {n}" for n in notes] + [""])


POINT_HEADS = {"escape_rate": "escape", "false_reject_rate": "false reject", "promised_fpr": "promised",
               "promise_broken": "products broken"}  # table head of each operating-point reading


def operating_points_table(rows: list[MethodRow]) -> list[str]:
    """Lines of the "other promises" table: per method, the average escape and false-reject rates, the false-reject
    rate the calibration promised and the share of products whose promise broke (mean ± sd over seeds) at the
    thresholds the calibration takes at each promise of ``decision.operating_points``; [] when no run records them."""
    promises = promises_in(k for r in rows for k in r.operating_points)
    if not promises:
        return []
    head = [f"{POINT_HEADS[reading]} @ {percent_label(p)} %" for p in promises for reading in READINGS]
    lines = ["", "Decisions (%, averaged over products) when every product's threshold is taken from its calibration "
             "(training normals) at another false-reject promise: the trade a line makes by choosing `decision.target_fpr` "
             "(test split; nothing is chosen from it). *promised*: what the calibration can promise there, max(P, 1/n) "
             "with n calibration normals; *products broken*: share of products whose good test parts were rejected more "
             "often than that promise allows on this many of them (95 % binomial bound). – = runs recorded before these "
             "readings.", "",
             "| method | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
    for r in rows:
        cells = [cell(r.operating_points.get(point_key(reading, p), UNDEFINED), 100.0) for p in promises for reading in READINGS]
        lines.append(f"| {r.method} | " + " | ".join(cells) + " |")
    return lines


def label_heights(points: list[tuple[float, float]], decade: float = 0.6, share: float = 0.05) -> list[float]:
    """Label heights (data units) for points (log10 x, y): a label is moved down until it is ``share`` of the y
    span below every higher label within ``decade`` of it on the log x axis, so labels of a cluster never overlap."""
    if not points:
        return []
    ys = [y for _, y in points]
    gap = share * max(max(ys) - min(ys), 10.0)
    heights = [0.0] * len(points)
    placed: list[int] = []
    for i in sorted(range(len(points)), key=lambda j: (-points[j][1], points[j][0])):
        height = points[i][1]
        for j in sorted(placed, key=lambda j: -heights[j]):
            if abs(points[j][0] - points[i][0]) < decade and height > heights[j] - gap:
                height = heights[j] - gap
        heights[i] = height
        placed.append(i)
    return heights


def pareto_figure(rows: list[MethodRow], path: Path, title: str) -> Path:
    """Image AUROC against training seconds per product and against MB per task, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, label) in zip(axes, (("train_seconds_per_product", "training seconds per product"), ("mb_per_task", "stored MB per task"))):
        points = []
        for i, r in enumerate(rows):  # one colour per method, the same in both panels
            x, y = r.stats[key][0], 100 * r.stats["image_auroc"][0]
            if math.isnan(x) or math.isnan(y) or x <= 0:
                continue
            yerr = 100 * r.stats["image_auroc"][1] if r.stats["image_auroc"][2] > 1 else 0.0
            ax.errorbar(x, y, yerr=yerr, fmt="o", capsize=3, color=f"C{i % 10}")
            points.append((r.method, x, y))
        for (method, x, y), height in zip(points, label_heights([(math.log10(x), y) for _, x, y in points])):
            moved = abs(height - y) > 1e-9
            ax.annotate(method, (x, y), xytext=(x * 10 ** 0.04, height + 0.4), textcoords="data", fontsize=8,
                        arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6} if moved else None)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # log minor labels overlap
        ax.set_xlabel(label + " (log)")
        ax.set_ylabel("final image AUROC (%)")
        ax.grid(alpha=0.3)
    return _save_figure(fig, path, title)


def operating_points_figure(rows: list[MethodRow], path: Path, title: str) -> Path | None:
    """Escape rate (left) and measured false-reject rate (right) against the false-reject promise the thresholds are
    taken at, one line per method with operating points (mean ± sd over seeds); on the right, each method's dotted line
    is what its calibration promised (above the diagonal where too few calibration normals allow no smaller promise).
    None when no method has them."""
    promises = promises_in(k for r in rows for k in r.operating_points)
    if not promises:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    x = [100 * p for p in promises]
    for i, r in enumerate(rows):
        if not r.operating_points:
            continue
        for ax, rate in zip(axes, RATES):
            stats = [r.operating_points.get(point_key(rate, p), UNDEFINED) for p in promises]
            ys = [100 * s[0] for s in stats]
            errs = [100 * s[1] if s[2] > 1 and not math.isnan(s[1]) else 0.0 for s in stats]
            ax.errorbar(x, ys, yerr=errs, marker="o", capsize=3, color=f"C{i % 10}", label=r.method)
        promised = [100 * r.operating_points.get(point_key("promised_fpr", p), UNDEFINED)[0] for p in promises]
        if not all(math.isnan(v) for v in promised):
            axes[1].plot(x, promised, color=f"C{i % 10}", ls=":", lw=1.5)
    axes[1].plot([0, max(x)], [0, max(x)], color="0.5", ls="--", lw=1, label="the promise asked for")
    axes[1].plot([], [], color="0.3", ls=":", lw=1.5, label="promised (dotted, method colour)")
    for ax, label in zip(axes, ("defective parts passed as OK (escape, %)", "good parts rejected (false reject, %)")):
        ax.set_xlabel("false-reject promise the thresholds are taken at (%)")
        ax.set_ylabel(label)
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 100)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the panel: the lines stay readable
    return _save_figure(fig, path, title)


def _save_figure(fig: Any, path: Path, title: str) -> Path:
    """Title, lay out, write (PNG, 110 dpi) and close a board figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

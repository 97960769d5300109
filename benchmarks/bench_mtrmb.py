"""MTRMB ablation on the real sequence (grid, hazelnut_toy, magnetic_tile, pcb): UCAD / +RSCL / +KPMK / full.

Run: ``.venv/bin/python -m benchmarks.bench_mtrmb [--data DIR] [--out runs/bench-mtrmb] [--variants ...] [key=value ...]``.

Every variant runs through the real pipeline (``contad run``: validation, masks, training, banks,
evaluation of every learned product after every step, no product label at test time; a final step
that fails the promotion gate does not stop the benchmark, ``--allow-rejected``) with the
default ``params.yaml`` plus the variant's switches; all variants share one mask cache. Finished
runs in OUT are resumed, not retrained. Printed: the ablation table (average image AUROC, pixel AP,
AUPRO over the final row, image-AUROC FM, routing, masks provider used) and per-product tables.
``--summarise`` only prints the tables of what OUT holds; a run that has not finished is summarised
from its completed step records (the "steps" column says how many; FM over those steps only).

Reads the test split's labels and masks (the pipeline's evaluation): reported metrics only; not used to
choose defaults (issue 33: defaults come from the validation protocol,
``benchmarks/validation_levers.py``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from typing import Any

from benchmarks.real_sequence import DEFAULT_DATA, PRODUCTS
from components.config import Config
from components.eval.continual import AccuracyMatrix
from components.methods.registry import uses_structure_masks
from components.segment.fallback import structure_masks
from flows.cli import main as contad

# variant -> config overrides (paper's Table 4 rows; "full" = KPMK + RSCL with Grounded-SAM masks or their recorded fallback)
VARIANTS: dict[str, list[str]] = {
    "ucad": ["method=ucad"],
    "mtrmb_rscl": ["method=mtrmb", "mtrmb.kpmk=false", "mtrmb.rscl=true"],
    "mtrmb_kpmk": ["method=mtrmb", "mtrmb.kpmk=true", "mtrmb.rscl=false"],
    "mtrmb": ["method=mtrmb"],
}
LABELS = {"ucad": "UCAD", "mtrmb_rscl": "+RSCL", "mtrmb_kpmk": "+KPMK", "mtrmb": "full MTRMB (+KPMK +RSCL)"}


def run_metrics(run: Path) -> dict[str, Any] | None:
    """``metrics.json`` of a finished run, else one built from its completed step records (None: no step yet)."""
    if (run / "metrics.json").is_file():
        doc = json.loads((run / "metrics.json").read_text())
        return {**doc, "steps_completed": len(doc["tasks"])}
    records = [json.loads(p.read_text()) for p in sorted(run.glob("steps/*/step.json"))]
    if not records:
        return None
    products = [r["task"] for r in records]
    matrix = AccuracyMatrix(products, len(records))
    for record in records:
        for product, values in record["metrics"].items():
            matrix.record(record["step"], product, values)
    config = Config.model_validate(json.loads((run / "run.json").read_text())["config"])
    masks = structure_masks(config).record() if uses_structure_masks(config) else {}
    return {**matrix.to_metrics_json(records[-1]["method"], "sequential"), **masks, "steps_completed": len(records)}


def ablation_table(docs: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per variant with final averages, image-AUROC FM, routing and the masks used."""
    lines = [
        "| variant | steps | image AUROC | pixel AP | AUPRO | FM (image AUROC) | routing | masks used |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, doc in docs.items():
        avg = doc["average"]
        lines.append(
            f"| {LABELS.get(variant, variant)} | {doc['steps_completed']} | {100 * avg['image_auroc']:.1f} | {100 * avg['pixel_ap']:.1f} | "
            f"{100 * avg['aupro']:.1f} | {100 * doc['forgetting']['image_auroc']:.1f} | "
            f"{100 * doc['routing_accuracy']:.1f} | {doc.get('masks_provider_used', '–')} |"
        )
    return "\n".join(lines)


def product_table(docs: dict[str, dict[str, Any]], metric: str) -> str:
    """Markdown: rows = variants, columns = products (final row) + Average + FM + routing."""
    products = max((d["tasks"] for d in docs.values()), key=len)
    lines = [f"| variant | {' | '.join(products)} | Average | FM | routing |", "|" + "---|" * (len(products) + 4)]
    for variant, doc in docs.items():
        cells = [doc["final"][metric].get(p) for p in products]
        row = [f"{100 * c:.1f}" if c is not None else "–" for c in cells]
        lines.append(
            f"| {LABELS.get(variant, variant)} | {' | '.join(row)} | {100 * doc['average'][metric]:.1f} | "
            f"{100 * doc['forgetting'][metric]:.1f} | {100 * doc['routing_accuracy']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("CONTAD_REAL_AD", str(DEFAULT_DATA)))
    parser.add_argument("--out", default="runs/bench-mtrmb")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--summarise", action="store_true", help="only print the tables of the runs in OUT (finished or not)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every variant")
    args = parser.parse_args()
    out = Path(args.out)
    runs: dict[str, Path] = {}
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
        runs[variant] = out / variant
        if args.summarise:
            continue
        code = contad([
            "run", "--out", str(runs[variant]), "--allow-rejected", *VARIANTS[variant], f"data.root={args.data}", f"data.products={PRODUCTS}",
            "tracking.enabled=false", "eval.overlays_per_task=0", f"masks.cache_dir={out / 'mask_cache'}", *args.overrides,
        ])
        if code != 0:
            return code
    docs = {v: doc for v, run in runs.items() if (doc := run_metrics(run)) is not None}
    print(f"\n### Ablation (last completed row, mean over the products learned; values in %)\n\n{ablation_table(docs)}")
    for metric in ("image_auroc", "pixel_ap", "aupro"):
        print(f"\n### {metric}\n\n{product_table(docs, metric)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

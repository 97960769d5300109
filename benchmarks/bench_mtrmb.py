"""MTRMB ablation on the real sequence (grid, hazelnut_toy, magnetic_tile, pcb): UCAD / +RSCL / +KPMK / full.

Run: ``.venv/bin/python -m benchmarks.bench_mtrmb [--data DIR] [--out runs/bench-mtrmb] [--variants ...] [key=value ...]``.

Every variant runs through the real pipeline (``contad run``: validation, masks, training, banks,
evaluation of every learned product after every step, no product label at test time) with the
default ``params.yaml`` plus the variant's switches; all variants share one mask cache. Finished
runs in OUT are resumed, not retrained. Printed: the ablation table (average image AUROC, pixel AP,
AUPRO over the final row, image-AUROC FM, routing, masks provider used) and per-product tables.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchmarks.real_sequence import DEFAULT_DATA, PRODUCTS, results_table
from flows.cli import main as contad

# variant -> config overrides (paper's Table 4 rows; "full" = KPMK + RSCL with Grounded-SAM masks or their recorded fallback)
VARIANTS: dict[str, list[str]] = {
    "ucad": ["method=ucad"],
    "mtrmb_rscl": ["method=mtrmb", "mtrmb.kpmk=false", "mtrmb.rscl=true"],
    "mtrmb_kpmk": ["method=mtrmb", "mtrmb.kpmk=true", "mtrmb.rscl=false"],
    "mtrmb": ["method=mtrmb"],
}
LABELS = {"ucad": "UCAD", "mtrmb_rscl": "+RSCL", "mtrmb_kpmk": "+KPMK", "mtrmb": "full MTRMB (+KPMK +RSCL)"}


def ablation_table(runs: dict[str, Path]) -> str:
    """Markdown: one row per variant with final averages, image-AUROC FM, routing and the masks used."""
    lines = [
        "| variant | image AUROC | pixel AP | AUPRO | FM (image AUROC) | routing | masks used |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, run in runs.items():
        doc = json.loads((run / "metrics.json").read_text())
        avg = doc["average"]
        lines.append(
            f"| {LABELS.get(variant, variant)} | {100 * avg['image_auroc']:.1f} | {100 * avg['pixel_ap']:.1f} | "
            f"{100 * avg['aupro']:.1f} | {100 * doc['forgetting']['image_auroc']:.1f} | "
            f"{100 * doc['routing_accuracy']:.1f} | {doc.get('masks_provider_used', '–')} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("CONTAD_REAL_AD", str(DEFAULT_DATA)))
    parser.add_argument("--out", default="runs/bench-mtrmb")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every variant")
    args = parser.parse_args()
    out = Path(args.out)
    runs: dict[str, Path] = {}
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
        runs[variant] = out / variant
        code = contad([
            "run", "--out", str(runs[variant]), *VARIANTS[variant], f"data.root={args.data}", f"data.products={PRODUCTS}",
            "tracking.enabled=false", "eval.overlays_per_task=0", f"masks.cache_dir={out / 'mask_cache'}", *args.overrides,
        ])
        if code != 0:
            return code
    print(f"\n### Ablation (final row, mean over {PRODUCTS.replace(',', ', ')}; values in %)\n\n{ablation_table(runs)}")
    for metric in ("image_auroc", "pixel_ap", "aupro"):
        print(f"\n### {metric}\n\n{results_table(runs, metric)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""UCAD vs the PatchCore baselines on the real sequence in ../shared/data/real-ad.

Run: ``.venv/bin/python -m benchmarks.real_sequence [--data DIR] [--out runs/bench-real] [key=value ...]``.

Each method runs through the real pipeline (``contad run``: validation, masks, training, banks,
evaluation after every step); then ``contad report`` renders the side-by-side comparison and a
markdown table (final image AUROC per product, Average, FM, routing accuracy) is printed.
Existing finished runs in OUT are reused (the pipeline resumes), so reruns are cheap.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from flows.cli import main as contad

METHODS = ("ucad", "patchcore_oracle", "patchcore_finetune", "patchcore_replay")
PRODUCTS = "grid,hazelnut_toy,magnetic_tile,pcb"
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-ad"


def results_table(runs: dict[str, Path], metric: str = "image_auroc") -> str:
    """Markdown table: rows = methods, columns = products + Average + FM + routing."""
    docs = {m: json.loads((d / "metrics.json").read_text()) for m, d in runs.items()}
    products = next(iter(docs.values()))["tasks"]
    head = f"| method | {' | '.join(products)} | Average | FM | routing |"
    lines = [head, "|" + "---|" * (len(products) + 4)]
    for method, doc in docs.items():
        cells = [doc["final"][metric][p] for p in products]
        row = [f"{100 * c:.1f}" if c is not None else "–" for c in cells]
        lines.append(
            f"| {method} | {' | '.join(row)} | {100 * doc['average'][metric]:.1f} | "
            f"{100 * doc['forgetting'][metric]:.1f} | {100 * doc['routing_accuracy']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("CONTAD_REAL_AD", str(DEFAULT_DATA)))
    parser.add_argument("--out", default="runs/bench-real")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out)
    runs: dict[str, Path] = {}
    for method in args.methods.split(","):
        runs[method] = out / method
        code = contad(["run", "--out", str(runs[method]), f"method={method}", f"data.root={args.data}",
                       f"data.products={PRODUCTS}", "tracking.enabled=false", f"masks.cache_dir={out / 'mask_cache'}",
                       *args.overrides])
        if code != 0:
            return code
    contad(["report", *map(str, runs.values()), "--out", str(out / "compare")])
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
        print(f"\n### {metric}\n\n{results_table(runs, metric)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""UCAD detection levers on the validation protocol (components/eval/validation.py): no test image is read.

Run: ``.venv/bin/python -m benchmarks.validation_levers [--data DIR] [--out runs/validation-levers]
[--seeds 0,1,2] [--levers default,tile_off,lite1,lite2,epochs1] [key=value ...]``

Each lever changes ONE default of ``params.yaml`` (the row ``default``) and runs the protocol on the
real-ad sequence (grid, hazelnut_toy, magnetic_tile, pcb, in that order): train UCAD on 80 % of each
product's training normals, score the held-out 20 % plus synthetic defects pasted on them. The defects
are pasted at the default run's resolved input size (448 px with ``data.tile=auto`` here) for every row,
and brought down to a row's input size inside their masks, so ``tile_off`` meets the same physical defects.

Rows: ``default``; ``tile_off`` (``data.tile=null``: one 224 px pass); ``lite1`` / ``lite2``
(``backbone.name=efficientnet_lite1/2``); ``epochs1`` (``ucad.epochs=1``: trained prompts on
felzenszwalb structure maps). Image-score rows (``top3``, ``top10``, ``top30``: ``ucad.image_top_k``;
``reweight``: ``ucad.reweight=true``) re-score the trained ``default`` model on the same cached
features instead of retraining: the image score does not enter training, and the per-task score scale
it changes is monotone per routed task, so each product's AUROCs equal a retrained run's wherever
routing is exact (the routing column shows it).

Results: ``OUT/seed<S>/<row>.json`` (per-product metrics, training seconds and stored bytes per
task, machine load); existing files are reused (resumable). A markdown summary is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from components.atomic import atomic_write_json
from components.config import Config, load_config
from components.data.tiling import resolve_tiling
from components.eval.validation import ValidationResult, ValidationSet, build_validation, evaluate_validation, train_sequence, training_manifest
from components.methods.loading import load_backbone

PRODUCTS = ["grid", "hazelnut_toy", "magnetic_tile", "pcb"]
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-ad"
TRAINED_ROWS: dict[str, list[str]] = {
    "default": [],
    "tile_off": ["data.tile=null"],
    "lite1": ["backbone.name=efficientnet_lite1"],
    "lite2": ["backbone.name=efficientnet_lite2"],
    "epochs1": ["ucad.epochs=1"],
}
RESCORED_ROWS: dict[str, dict[str, Any]] = {
    "top3": {"image_top_k": 3},
    "top10": {"image_top_k": 10},
    "top30": {"image_top_k": 30},
    "reweight": {"reweight": True},
}
METRICS = ("image_auroc", "pixel_auroc", "aupro", "routing_accuracy")


def rescored(method: Any, vset: ValidationSet, changes: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Validation metrics of the trained ``method`` with its ``ucad`` image-score settings replaced by ``changes``."""
    original = method.config
    cfg = original.model_copy(deep=True)
    for key, value in changes.items():
        setattr(cfg.ucad, key, value)
    method.config = cfg
    try:
        return evaluate_validation(method, vset, cfg)
    finally:
        method.config = original


def run_seed(base: list[str], seed: int, rows: list[str], data: str, out: Path) -> None:
    """Every requested row for one seed (a row whose JSON exists is skipped)."""
    vsets: dict[str, ValidationSet] = {}
    paint: int | None = None  # every row is scored on defects pasted at the default run's resolved input size
    for row in [r for r in rows if r in TRAINED_ROWS]:
        wanted = [r for r in ([row] + (list(RESCORED_ROWS) if row == "default" else [])) if r in rows or r == row]
        if all((out / f"seed{seed}" / f"{r}.json").exists() for r in wanted):
            continue
        cfg: Config = load_config("params.yaml", [*base, f"data.root={data}", f"data.products={','.join(PRODUCTS)}",
                                                   "tracking.enabled=false", f"seed={seed}", *TRAINED_ROWS[row]])
        if paint is None:
            base_cfg = load_config("params.yaml", [*base, f"data.root={data}", f"data.products={','.join(PRODUCTS)}", f"seed={seed}"])
            paint = resolve_tiling(base_cfg, training_manifest(Path(data), PRODUCTS), PRODUCTS).data.image_size
        key = f"{cfg.data.tile}"
        if key not in vsets:  # validation images depend on the input size only
            vsets[key] = build_validation(cfg, Path(data), PRODUCTS, paint_size=paint)
        vset = vsets[key]
        run_cfg = vset.cfg.model_copy(deep=True)
        run_cfg.backbone, run_cfg.ucad = cfg.backbone, cfg.ucad
        backbone = load_backbone(run_cfg)
        load_before, started = os.getloadavg(), time.perf_counter()
        method, seconds, sizes = train_sequence(vset, backbone, run_cfg)
        result = ValidationResult(per_product=evaluate_validation(method, vset, run_cfg), train_seconds=seconds, task_bytes=sizes)
        record = {"row": row, "seed": seed, "overrides": TRAINED_ROWS[row], "counts": vset.counts(),
                  "image_size": run_cfg.data.image_size, "tile": run_cfg.data.tile, "wall_s": time.perf_counter() - started,
                  "load_before": load_before, "load_after": os.getloadavg(), **result.as_dict()}
        atomic_write_json(out / f"seed{seed}" / f"{row}.json", record)
        print(f"[seed {seed}] {row}: image AUROC mean {result.mean('image_auroc'):.4f} "
              f"{ {p: round(m['image_auroc'], 4) for p, m in result.per_product.items()} }", flush=True)
        if row != "default":
            continue
        for name, changes in RESCORED_ROWS.items():
            if name not in rows:
                continue
            scored = ValidationResult(per_product=rescored(method, vset, changes))
            atomic_write_json(out / f"seed{seed}" / f"{name}.json", {"row": name, "seed": seed, "rescored_from": "default",
                                                                     "changes": changes, **scored.as_dict()})
            print(f"[seed {seed}] {name}: image AUROC mean {scored.mean('image_auroc'):.4f} "
                  f"{ {p: round(m['image_auroc'], 4) for p, m in scored.per_product.items()} }", flush=True)


def summary(out: Path, rows: list[str]) -> str:
    """Markdown: per row, image AUROC per product and mean, pixel AUROC mean, routing, seeds (mean over seeds)."""
    lines = [f"| row | seeds | {' | '.join(PRODUCTS)} | mean image | mean pixel | mean AUPRO | routing |", "|" + "---|" * (len(PRODUCTS) + 6)]
    for row in rows:
        docs = [json.loads(p.read_text()) for p in sorted(out.glob(f"seed*/{row}.json"))]
        if not docs:
            continue
        def avg(values: list[float]) -> float:
            return sum(values) / len(values)
        cells = [avg([d["per_product"][p]["image_auroc"] for d in docs]) for p in PRODUCTS]
        means = [avg([d["mean"][m] for d in docs]) for m in METRICS]
        seeds = ",".join(str(d["seed"]) for d in docs)
        lines.append(f"| {row} | {seeds} | {' | '.join(f'{c:.4f}' for c in cells)} | {' | '.join(f'{m:.4f}' for m in means)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("CONTAD_REAL_AD", str(DEFAULT_DATA)))
    parser.add_argument("--out", default="runs/validation-levers")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--levers", default=",".join([*TRAINED_ROWS, *RESCORED_ROWS]))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = args.levers.split(",")
    unknown = sorted(set(rows) - set(TRAINED_ROWS) - set(RESCORED_ROWS))
    if unknown:
        parser.error(f"unknown levers {unknown}")
    if any(r in RESCORED_ROWS for r in rows) and "default" not in rows:
        rows.insert(0, "default")
    out = Path(args.out)
    for seed in (int(s) for s in args.seeds.split(",")):
        run_seed(args.overrides, seed, rows, args.data, out)
    print(summary(out, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

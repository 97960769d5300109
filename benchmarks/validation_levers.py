"""Detection levers and re-derived defaults on the validation protocol (components/eval/validation.py): no test image is read.

Run: ``.venv/bin/python -m benchmarks.validation_levers [--data DIR] [--data-3d DIR] [--out runs/validation-levers]
[--seeds 0,1,2] [--levers default,tile_off,lite1,lite2,epochs1,iuf,iuf_standardise,ibiumad,ibiumad_sum] [--defects pasted|subtle]
[key=value ...]``

Each lever changes ONE default of ``params.yaml`` against its reference row and runs the protocol on the
real-ad sequence (grid, hazelnut_toy, magnetic_tile, pcb, in that order): train the method on 80 % of each
product's training normals, score the held-out 20 % plus synthetic defects pasted on them. The defects
are pasted at the default UCAD run's resolved input size (448 px with ``data.tile=auto`` here) for every
row, and brought down to a row's input size inside their masks, so ``tile_off`` (and IUF at 224 px) meet
the same physical defects. ``key=value`` overrides apply to every row (e.g. a reduced training budget).

Rows (UCAD unless stated; reference ``default``): ``tile_off`` (``data.tile=null``: one 224 px pass);
``lite1`` / ``lite2`` (``backbone.name=efficientnet_lite1/2``); ``epochs1`` (``ucad.epochs=1``: trained
prompts on felzenszwalb structure maps); ``budget8`` / ``budget32`` (``memory.budget_mb=8/32``: 4x / 16x the
memory rows per product); ``layer2`` (``backbone.feature_layer=2``: levels 1 and 2, stride-4 patches); ``span3``
(``backbone.feature_span=3``: levels 1, 2 and 3 on the stride-4 grid); ``span3_d96`` (the same, each level pooled
to 32 channels: equal weight per level); ``layer_choice`` (``ucad.feature_choices=[{feature_layer: 2}]``: each product
takes today's features or ``layer2``'s at training time, chosen on its own held-out fit normals + synthetic defects);
``overlap64`` (``data.tile_overlap=64``: neighbouring 224 px tiles share at least 64 px, each cell weighted towards the tile that
sees it from its interior, so no seam where tiles are cut; ~2.25x the tiles at 448 px). ``iuf`` (``method=iuf``, default ``iuf.standardise: false``) vs
``iuf_standardise`` (``iuf.standardise=true``). ``ibiumad`` (``method=ib_iumad``, rgb+depth, default
``ib_iumad.combine: max``) runs on the RGB-D sequence of ``--data-3d`` (cable_gland of real-3d; its
synthetic defects change the point cloud too, painted at the run's input size) and ``ibiumad_sum``
re-scores it with ``ib_iumad.combine=sum`` (a score-time setting). ``mtrmb`` / ``lemo`` / ``replay``
(``method=mtrmb`` / ``lemo`` / ``patchcore_replay``) and their ``_lite1`` rows (``backbone.name=efficientnet_lite1``):
``backbone`` is shared by these methods, so a backbone default is judged on each of them against its own method's
row (``REFERENCES``), not on UCAD alone. ``oracle`` / ``oracle_choice``: the per-product PatchCore oracle without and
with ``patchcore.feature_choices=[{feature_layer: 2}]`` (the per-task feature choice UCAD makes by default); ``mtrmb_choice``:
MTRMB with ``mtrmb.feature_choices=[{feature_layer: 2}]``, against ``mtrmb`` (which pins ``mtrmb.feature_choices=[]``). Image-score rows (``top3``, ``top10``,
``top30``: ``ucad.image_top_k``; ``reweight``: ``ucad.reweight=true``) re-score the trained ``default``
model on the same cached features instead of retraining: the image score does not enter training, and
the per-task score scale it changes is monotone per routed task, so each product's AUROCs equal a
retrained run's wherever routing is exact (the routing column shows it).

``--defects``: the synthetic defect set (``components.eval.validation.DEFECT_SETS``): ``pasted`` (protocol v1,
rectangles + strokes) or ``subtle`` (protocol v2: the synthetic products' painters at low severity; RESULTS
section 3 fixes its rule). Give each set its own ``--out``: a row's file does not say which set scored it
apart from its ``defects`` field.

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
from components.eval.validation import DEFECT_SETS, ValidationResult, ValidationSet, build_validation, evaluate_validation, train_sequence, training_manifest
from components.methods.loading import load_backbone

PRODUCTS = ["grid", "hazelnut_toy", "magnetic_tile", "pcb"]
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-ad"
TRAINED_ROWS: dict[str, list[str]] = {
    "default": [],
    "tile_off": ["data.tile=null"],
    "lite1": ["backbone.name=efficientnet_lite1"],
    "lite2": ["backbone.name=efficientnet_lite2"],
    "epochs1": ["ucad.epochs=1"],
    "budget8": ["memory.budget_mb=8"],
    "budget32": ["memory.budget_mb=32"],
    "layer2": ["backbone.feature_layer=2"],
    "span3": ["backbone.feature_span=3"],
    "span3_d96": ["backbone.feature_span=3", "backbone.feature_dim=96"],
    "layer_choice": ["ucad.feature_choices=[{feature_layer: 2}]"],
    "overlap64": ["data.tile_overlap=64"],
    "iuf": ["method=iuf"],
    "iuf_standardise": ["method=iuf", "iuf.standardise=true"],
    "ibiumad": ["method=ib_iumad"],
    # backbone.name is shared: a backbone default must hold for every method that reads it (protocol v2, session 38)
    "mtrmb": ["method=mtrmb", "mtrmb.feature_choices=[]"],
    "mtrmb_lite1": ["method=mtrmb", "mtrmb.feature_choices=[]", "backbone.name=efficientnet_lite1"],
    # MTRMB with UCAD's per-task feature choice (session 41: each candidate its own prompt and fusion), against MTRMB without
    "mtrmb_choice": ["method=mtrmb", "mtrmb.feature_choices=[{feature_layer: 2}]"],
    "lemo": ["method=lemo"],
    "lemo_lite1": ["method=lemo", "backbone.name=efficientnet_lite1"],
    "replay": ["method=patchcore_replay"],
    "replay_lite1": ["method=patchcore_replay", "backbone.name=efficientnet_lite1"],
    # the per-product oracle with UCAD's per-task feature choice (session 40), against the oracle without it
    "oracle": ["method=patchcore_oracle", "patchcore.feature_choices=[]"],
    "oracle_choice": ["method=patchcore_oracle", "patchcore.feature_choices=[{feature_layer: 2}]"],
}
# Rows judged against a reference other than ``default`` (the same method at today's setting); a row that is a
# reference itself is not judged against UCAD's ``default``.
REFERENCES = {"iuf_standardise": "iuf", "ibiumad_sum": "ibiumad", "mtrmb_lite1": "mtrmb", "lemo_lite1": "lemo", "replay_lite1": "replay",
              "oracle_choice": "oracle", "mtrmb_choice": "mtrmb"}
RESCORED_ROWS: dict[str, dict[str, Any]] = {  # row -> {"section.key": value}, re-scored from RESCORED_FROM[row]
    "top3": {"ucad.image_top_k": 3},
    "top10": {"ucad.image_top_k": 10},
    "top30": {"ucad.image_top_k": 30},
    "reweight": {"ucad.reweight": True},
    "ibiumad_sum": {"ib_iumad.combine": "sum"},
}
RESCORED_FROM = {"top3": "default", "top10": "default", "top30": "default", "reweight": "default", "ibiumad_sum": "ibiumad"}
PRODUCTS_3D = ["cable_gland"]
DEFAULT_DATA_3D = DEFAULT_DATA.parent / "real-3d"
ROWS_3D = {"ibiumad", "ibiumad_sum"}  # RGB-D rows: the real-3d sequence (xyz defects pasted with the RGB ones)
METRICS = ("image_auroc", "pixel_auroc", "aupro", "routing_accuracy")


def rescored(method: Any, vset: ValidationSet, changes: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Validation metrics of the trained ``method`` with its score-time settings replaced by ``changes`` ("section.key": value)."""
    original = method.config
    cfg = original.model_copy(deep=True)
    for key, value in changes.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    method.config = cfg
    try:
        return evaluate_validation(method, vset, cfg)
    finally:
        method.config = original


def row_config(cfg: Config, vset: ValidationSet) -> Config:
    """``cfg`` (one row's configuration) with ``data.tile = auto`` resolved as ``vset`` resolved it: only the input
    size and tile are taken from ``vset``, every other data setting stays the row's own (rows that differ in
    ``data.tile_overlap`` share one validation set)."""
    out = cfg.model_copy(deep=True)
    out.data.image_size, out.data.tile = vset.cfg.data.image_size, vset.cfg.data.tile
    return out


def sequence_of(row: str, data: str, data_3d: str) -> tuple[str, list[str]]:
    """(data root, products in sequence order) a row runs on: real-3d for the RGB-D rows, else real-ad."""
    return (data_3d, PRODUCTS_3D) if row in ROWS_3D else (data, PRODUCTS)


def run_seed(base: list[str], seed: int, rows: list[str], data: str, out: Path, data_3d: str = str(DEFAULT_DATA_3D),
             defects: str = "pasted") -> None:
    """Every requested row for one seed (a row whose JSON exists is skipped)."""
    vsets: dict[tuple[str, str, str], ValidationSet] = {}
    paints: dict[str, int | None] = {}  # per sequence: every row is scored on defects pasted at the default run's resolved input size
    for row in [r for r in rows if r in TRAINED_ROWS]:
        wanted = [row] + [r for r, source in RESCORED_FROM.items() if source == row and r in rows]
        if all((out / f"seed{seed}" / f"{r}.json").exists() for r in wanted):
            continue
        root, products = sequence_of(row, data, data_3d)
        common = [*base, f"data.root={root}", f"data.products={','.join(products)}", f"seed={seed}"]
        cfg: Config = load_config("params.yaml", [*common, "tracking.enabled=false", *TRAINED_ROWS[row]])
        if root not in paints:  # RGB-D: defects are painted at the run's own size (xyz is not resampled inside masks)
            paints[root] = None if row in ROWS_3D else resolve_tiling(load_config("params.yaml", common), training_manifest(Path(root), products), products).data.image_size
        key = (root, cfg.method, f"{cfg.data.tile}")
        if key not in vsets:  # validation images depend on the data and the resolved input size only
            vsets[key] = build_validation(cfg, Path(root), products, paint_size=paints[root], defects=defects)
        vset = vsets[key]
        run_cfg = row_config(cfg, vset)
        backbone = load_backbone(run_cfg)
        load_before, started = os.getloadavg(), time.perf_counter()
        method, seconds, sizes = train_sequence(vset, backbone, run_cfg)
        result = ValidationResult(per_product=evaluate_validation(method, vset, run_cfg), train_seconds=seconds, task_bytes=sizes)
        record = {"row": row, "seed": seed, "overrides": TRAINED_ROWS[row], "defects": defects, "products": products, "counts": vset.counts(),
                  "image_size": run_cfg.data.image_size, "tile": run_cfg.data.tile, "wall_s": time.perf_counter() - started,
                  "load_before": load_before, "load_after": os.getloadavg(), **result.as_dict()}
        atomic_write_json(out / f"seed{seed}" / f"{row}.json", record)
        print(f"[seed {seed}] {row}: image AUROC mean {result.mean('image_auroc'):.4f} "
              f"{ {p: round(m['image_auroc'], 4) for p, m in result.per_product.items()} }", flush=True)
        for name in wanted[1:]:
            changes = RESCORED_ROWS[name]
            scored = ValidationResult(per_product=rescored(method, vset, changes))
            atomic_write_json(out / f"seed{seed}" / f"{name}.json", {"row": name, "seed": seed, "rescored_from": row, "defects": defects, "products": products,
                                                                     "changes": changes, **scored.as_dict()})
            print(f"[seed {seed}] {name}: image AUROC mean {scored.mean('image_auroc'):.4f} "
                  f"{ {p: round(m['image_auroc'], 4) for p, m in scored.per_product.items()} }", flush=True)


def row_results(out: Path, row: str) -> dict[int, dict[str, Any]]:
    """The results ``run_seed`` wrote for ``row`` under ``out``, by seed (in seed order)."""
    docs = (json.loads(p.read_text()) for p in out.glob(f"seed*/{row}.json"))
    return dict(sorted((d["seed"], d) for d in docs))


def summary(out: Path, rows: list[str]) -> str:
    """Markdown: per row, image AUROC per product and mean, pixel AUROC mean, routing, seeds (mean over seeds);
    one table per sequence (real-ad rows, then the RGB-D rows)."""
    tables = []
    for products, names in ((PRODUCTS, [r for r in rows if r not in ROWS_3D]), (PRODUCTS_3D, [r for r in rows if r in ROWS_3D])):
        lines = [f"| row | seeds | {' | '.join(products)} | mean image | mean pixel | mean AUPRO | routing |", "|" + "---|" * (len(products) + 6)]
        for row in names:
            docs = list(row_results(out, row).values())
            if not docs:
                continue
            def avg(values: list[float]) -> float:
                return sum(values) / len(values)
            cells = [avg([d["per_product"][p]["image_auroc"] for d in docs]) for p in products]
            means = [avg([d["mean"][m] for d in docs]) for m in METRICS]
            seeds = ",".join(str(d["seed"]) for d in docs)
            lines.append(f"| {row} | {seeds} | {' | '.join(f'{c:.4f}' for c in cells)} | {' | '.join(f'{m:.4f}' for m in means)} |")
        if len(lines) > 2:
            tables.append("\n".join(lines))
    return "\n\n".join(tables)


IMAGE_GAIN, PRODUCT_LOSS, LOCALISATION_LOSS = 0.01, 0.02, 0.01  # the rule's accuracy clauses (RESULTS section 3)


def rule_check(out: Path, rows: list[str], reference: str = "default", guard: str = "aupro") -> str:
    """Markdown: each row against ``reference`` (``REFERENCES[row]`` where it has one) on the seeds both have, by the rule's accuracy clauses: mean image
    AUROC gain >= ``IMAGE_GAIN``, no product's image AUROC below -``PRODUCT_LOSS``, mean ``guard`` (``aupro`` in
    protocol v2, ``pixel_auroc`` in v1) not below -``LOCALISATION_LOSS``; all averaged over the common seeds. The
    speed clause is measured apart (``benchmarks.bench_train_time``) and is not in this table."""
    lines = [f"| row | seeds | mean image gain | worst product (gain) | mean {guard} gain | accuracy clauses |", "|---|---|---|---|---|---|"]
    for row in [r for r in rows if r != reference and r not in ROWS_3D and r not in REFERENCES.values()]:
        base, docs = row_results(out, REFERENCES.get(row, reference)), row_results(out, row)
        seeds = sorted(set(docs) & set(base))
        if not seeds:
            continue
        def gain(metric: str, product: str | None = None) -> float:
            values = [(docs[s]["per_product"][product][metric] - base[s]["per_product"][product][metric]) if product
                      else (docs[s]["mean"][metric] - base[s]["mean"][metric]) for s in seeds]
            return sum(values) / len(values)
        image = gain("image_auroc")
        product, worst = min(((p, gain("image_auroc", p)) for p in base[seeds[0]]["per_product"]), key=lambda pw: pw[1])
        local = gain(guard)
        passed = image >= IMAGE_GAIN and worst >= -PRODUCT_LOSS and local >= -LOCALISATION_LOSS
        name = f"{row} (vs {REFERENCES[row]})" if row in REFERENCES else row
        lines.append(f"| {name} | {','.join(map(str, seeds))} | {image:+.4f} | {product} ({worst:+.4f}) | {local:+.4f} | {'pass' if passed else 'fail'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("CONTAD_REAL_AD", str(DEFAULT_DATA)))
    parser.add_argument("--data-3d", default=os.environ.get("CONTAD_REAL_3D", str(DEFAULT_DATA_3D)))
    parser.add_argument("--out", default="runs/validation-levers")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--levers", default=",".join([*TRAINED_ROWS, *RESCORED_ROWS]))
    parser.add_argument("--defects", default="pasted", choices=DEFECT_SETS, help="synthetic defect set: pasted (v1) or subtle (v2)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = args.levers.split(",")
    unknown = sorted(set(rows) - set(TRAINED_ROWS) - set(RESCORED_ROWS))
    if unknown:
        parser.error(f"unknown levers {unknown}")
    for source in sorted({RESCORED_FROM[r] for r in rows if r in RESCORED_ROWS} - set(rows)):
        rows.insert(0, source)  # a re-scored row needs its trained row
    out = Path(args.out)
    for seed in (int(s) for s in args.seeds.split(",")):
        run_seed(args.overrides, seed, rows, args.data, out, args.data_3d, args.defects)
    print(summary(out, rows))
    print()
    print(rule_check(out, rows, guard="aupro" if args.defects == "subtle" else "pixel_auroc"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""IUF and its ablations on the real sequence (../shared/data/real-ad) under X-Y protocols.

Run: ``.venv/bin/python -m benchmarks.bench_iuf [--data DIR] [--out runs/bench-iuf] [--rows ...] [--protocols 1-1x3,2-1x2] [--figure] [key=value ...]``

Rows: ``iuf_full`` (defaults), ``iuf_no_oasa`` (iuf.oasa=false), ``iuf_no_scl`` (iuf.scl=false),
``iuf_finetune`` (iuf.update_strategy=finetune, "w/o update strategy"), ``joint`` (all products in one
step: the upper bound; one run serves every protocol). Each row trains the real ``IUF`` method step by
step and evaluates every learned product after every step with the pipeline's own evaluation
(``evaluate_tasks``, ``AccuracyMatrix``: ACC = final average, FM = Chaudhry forgetting), without
Prefect/MLflow so that one process can share the frozen backbone's features between rows: features
are computed once per image (by content, ``MemoFeatures``) and reused by every
row, which is legitimate because the backbone is frozen. Per-step wall and CPU seconds are recorded
(the first row pays for the features). Results: ``OUT/<protocol>/<row>/metrics.json`` + a markdown table.

``--validation``: choose defaults without test data. Each product's normal TRAINING images are split
(``VALIDATION_FRACTION``, seeded apart from ``data.heldout_fraction``'s split); the methods train on
the rest, and every product is "tested" on its validation normals plus ``VALIDATION_VARIANTS``
synthetic-defect copies of each (``benchmarks/synthetic_defects``; ``--defects rectangles`` (default):
cut-paste / offset patches, ``lines``: thin dark / bright strokes). No test image is read.

Reads the test split's labels and masks (except with ``--validation``): reported metrics only; not used
to choose defaults (issue 33: defaults come from the validation protocol,
``benchmarks/validation_levers.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from components.data.synthetic.pasted import line_defects, synthetic_defects
from benchmarks.iuf_calibration_figure import calibration_figure
from components.atomic import atomic_write_bytes, atomic_write_json
from components.backbones.registry import build_backbone
from components.config import Config, load_config
from components.data.loading import load_images, task_data, test_batch, train_split
from components.data.manifest import read_dataset
from components.data.protocol import task_name, task_of_product, task_sequence
from components.errors import DataError
from components.eval.continual import AccuracyMatrix
from components.eval.evaluate import evaluate_tasks
from components.methods.iuf import IUF
from components.methods.feature_cache import share_feature_cache
from components.methods.reconstruction import MultiStageFeatures, cached_features
from components.types import ImageBatch

PRODUCTS = ["grid", "hazelnut_toy", "magnetic_tile", "pcb"]
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-ad"
ROWS = {
    "iuf_full": [],
    "iuf_finetune": ["iuf.update_strategy=finetune"],
    "iuf_no_oasa": ["iuf.oasa=false"],
    "iuf_no_scl": ["iuf.scl=false"],
    "joint": [],
}
PROTOCOLS = {"1-1x3": (1, 1), "2-1x2": (2, 1)}
VALIDATION_FRACTION = 0.25
VALIDATION_SEED = 1009  # not the seed of data.heldout_fraction's split
VALIDATION_VARIANTS = 2
VALIDATION_DEFECTS = ("rectangles", "lines")

log = logging.getLogger("bench_iuf")


class MemoFeatures:
    """The frozen extractor shared by all rows, its outputs memoised by image content in its ``feature_cache``
    (scoring calls it on whole batches; training features go through the same cache)."""

    def __init__(self, extractor: MultiStageFeatures) -> None:
        self.extractor = extractor
        self.net = extractor.net
        self.channels = extractor.channels
        self.level_channels = extractor.level_channels
        self.grid_size = extractor.grid_size
        share_feature_cache(self, extractor)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return cached_features(self.extractor, images, max(1, len(images))).to(images.device)


def validation_data(manifest: pd.DataFrame, products: list[str], image_size: int, defects: str = "rectangles") -> tuple[pd.DataFrame, dict[str, ImageBatch]]:
    """(manifest without the validation normals, per product: validation normals + their synthetic defects:
    ``rectangles`` = ``synthetic_defects`` (cut-paste / offset patches), ``lines`` = ``line_defects`` (thin strokes))."""
    if defects not in VALIDATION_DEFECTS:
        raise ValueError(f"validation defects {defects!r} are not one of {VALIDATION_DEFECTS}")
    fit, val = train_split(manifest, products, VALIDATION_FRACTION, VALIDATION_SEED)
    batches = {}
    for index, product in enumerate(products):
        normals_paths = val.loc[val["product"] == product, "image_path"].tolist()
        donor_paths = fit.loc[fit["product"] == product, "image_path"].tolist()[:32]
        if not normals_paths:
            raise DataError(f"product {product!r}: too few normal training images to hold out validation normals (need >= 2)")
        normals, donors = load_images(normals_paths, image_size), load_images(donor_paths, image_size)
        generator = torch.Generator().manual_seed(VALIDATION_SEED + index)
        if defects == "rectangles":
            synthetic, masks = synthetic_defects(normals, donors, VALIDATION_VARIANTS, generator)
        else:
            synthetic, masks = line_defects(normals, VALIDATION_VARIANTS, generator)
        n, m = len(normals), len(synthetic)
        batches[product] = ImageBatch(
            images=torch.cat([normals, synthetic]), products=[product] * (n + m),
            paths=normals_paths + [f"{normals_paths[i // VALIDATION_VARIANTS]}#synthetic{i % VALIDATION_VARIANTS}" for i in range(m)],
            labels=torch.tensor([0] * n + [1] * m), masks=torch.cat([torch.zeros(n, *masks.shape[1:], dtype=torch.uint8), masks]))
    kept = manifest[~manifest["image_path"].isin(set(val["image_path"]))].reset_index(drop=True)
    return kept, batches


def run_row(cfg: Config, manifest: Any, tasks: list[list[str]], batches: dict[str, Any], shared: dict[str, Any], name: str,
            figure: Path | None = None) -> dict[str, Any]:
    """Train ``tasks`` one step at a time, evaluating all learned products after each step; with ``figure``
    the final model's ``calibration_figure`` is written there (PNG)."""
    backbone = shared.setdefault("backbone", build_backbone(cfg.backbone, cfg.data.image_size))
    method = IUF(cfg, backbone)
    if "memo" not in shared:
        shared["memo"] = MemoFeatures(method.extractor)
    method.extractor = shared["memo"]  # type: ignore[assignment]
    products = [p for t in tasks for p in t]
    matrix = AccuracyMatrix(products, len(tasks), tasks)
    owners = task_of_product(tasks)
    steps = []
    for index, group in enumerate(tasks):
        data = task_data(manifest, task_name(group), group, cfg, None)
        torch.manual_seed(cfg.seed + index)
        wall, cpu = time.perf_counter(), time.process_time()
        fit_log = method.fit_task(data)
        fit_wall, fit_cpu = time.perf_counter() - wall, time.process_time() - cpu
        seen = [p for t in tasks[: index + 1] for p in t]
        wall, cpu = time.perf_counter(), time.process_time()
        metrics, _ = evaluate_tasks(method, {p: batches[p] for p in seen}, {p: owners[p] for p in seen}, cfg)
        eval_wall, eval_cpu = time.perf_counter() - wall, time.process_time() - cpu
        for product in seen:
            matrix.record(index, product, metrics[product])
        steps.append({"task": data.name, "fit_wall_s": fit_wall, "fit_cpu_s": fit_cpu, "eval_wall_s": eval_wall, "eval_cpu_s": eval_cpu,
                      "epoch_losses": fit_log["epoch_losses"], "load": os.getloadavg()[0]})
        aurocs = ", ".join(f"{p}: {metrics[p]['image_auroc']:.3f}" for p in seen)
        print(f"[{name}] step {index} {data.name}: fit {fit_wall:.0f}s wall / {fit_cpu:.0f}s cpu, eval {eval_wall:.0f}s; image AUROC {aurocs}", flush=True)
    doc = matrix.to_metrics_json("iuf", cfg.protocol.name)
    doc["bench_steps"] = steps
    if figure is not None:
        atomic_write_bytes(figure, calibration_figure(method, batches))
    return doc


def percent(value: float | None) -> str:
    """A fraction in % with one decimal; undefined (e.g. FM of a one-step run) as a dash."""
    return "–" if value is None else f"{100 * value:.1f}"


def table(docs: dict[str, dict[str, Any]]) -> str:
    """Markdown rows: final image AUROC per product, ACC/FM image + pixel, seconds per step."""
    products = PRODUCTS
    lines = [f"| row | {' | '.join(products)} | ACC img | ACC pix | FM img | FM pix | s/step (wall, fit+eval) |", "|" + "---|" * (len(products) + 6)]
    for name, doc in docs.items():
        cells = [doc["final"]["image_auroc"].get(p) for p in products]
        per_step = [round(s["fit_wall_s"] + s["eval_wall_s"]) for s in doc["bench_steps"]]
        summary = [doc["average"]["image_auroc"], doc["average"]["pixel_auroc"], doc["forgetting"]["image_auroc"], doc["forgetting"]["pixel_auroc"]]
        lines.append(f"| {name} | {' | '.join(percent(c) for c in cells)} | {' | '.join(percent(v) for v in summary)} | {per_step} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("CONTAD_REAL_AD", str(DEFAULT_DATA)))
    parser.add_argument("--out", default="runs/bench-iuf")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--validation", action="store_true", help="validation normals + synthetic defects instead of the test split")
    parser.add_argument("--defects", choices=VALIDATION_DEFECTS, default="rectangles", help="--validation: the synthetic defects (benchmarks/synthetic_defects)")
    parser.add_argument("--figure", action="store_true", help="also write OUT/<protocol>/<row>/calibration.png (needs iuf.score_calibration=position)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = load_config("params.yaml", ["method=iuf", f"data.root={args.data}", f"data.products={','.join(PRODUCTS)}", *args.overrides])
    for flag, given, known in (("--rows", args.rows, ROWS), ("--protocols", args.protocols, PROTOCOLS)):
        unknown = sorted(set(given.split(",")) - set(known))
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; known: {','.join(known)}")
    if args.figure and base.iuf.score_calibration != "position":
        parser.error(f"--figure needs iuf.score_calibration=position (got {base.iuf.score_calibration})")
    manifest = read_dataset(Path(args.data), products=PRODUCTS)
    if args.validation:
        manifest, batches = validation_data(manifest, PRODUCTS, base.data.image_size, args.defects)
    else:
        batches = {p: test_batch(manifest, p, base.data.image_size) for p in PRODUCTS}
    shared: dict[str, Any] = {}
    out = Path(args.out)
    for protocol in args.protocols.split(","):
        docs: dict[str, dict[str, Any]] = {}
        for row in args.rows.split(","):
            path = out / ("joint" if row == "joint" else protocol) / row / "metrics.json"
            if path.is_file():
                docs[row] = json.loads(path.read_text())
                continue
            x, y = (len(PRODUCTS), 1) if row == "joint" else PROTOCOLS[protocol]
            cfg = load_config("params.yaml", ["method=iuf", f"data.root={args.data}", f"data.products={','.join(PRODUCTS)}",
                                              f"protocol.base_tasks={x}", f"protocol.step_tasks={y}", *ROWS[row], *args.overrides])
            figure = path.with_name("calibration.png") if args.figure else None
            docs[row] = run_row(cfg, manifest, task_sequence(PRODUCTS, x, y), batches, shared, f"{protocol}/{row}", figure)
            atomic_write_json(path, docs[row])
        print(f"\n### {protocol}\n\n{table(docs)}\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

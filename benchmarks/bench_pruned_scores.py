"""Seconds of the leave-one-out calibration search, every patch vs pruned, on a real product's features.

Run: ``.venv/bin/python -m benchmarks.bench_pruned_scores [--product pcb] [--images 60] [key=value ...]``
(e.g. ``backbone.feature_layer=2`` for stride-4 patches).

The product is built as ``benchmarks.bench_train_time`` builds it (native resolution, tiled as the
pipeline tiles it); UCAD fits it once and the leave-one-out image scores of its training images are
then computed twice from the same features and knowledge: with every patch searched (no grid) and
pruned (``components/methods/pruned_scores.py``). Prints both times, the share of patches searched and
the largest relative difference of the two score vectors (float rounding only). Reads no test image.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks.bench_train_time import build_product, product_arguments
from components.config import load_config
from components.data.loading import task_data
from components.data.manifest import read_dataset
from components.data.tiling import resolve_tiling
from components.methods import pruned_scores
from components.methods.knn import NearestNeighbours
from components.methods.loading import load_backbone
from components.methods.registry import build_method


def captured_leave_out(method, data) -> dict:
    """Fit ``data`` and keep what the leave-one-out search was given (features, knowledge, owners, grid)."""
    seen: dict = {}
    original = pruned_scores.leave_one_out_image_scores

    def keep(features, memory, rows, owners, num_neighbors=1, top_k=1, grid=None):
        seen.update(features=features, rows=rows, owners=owners, top_k=top_k, grid=grid)
        return original(features, memory, rows, owners, num_neighbors, top_k, grid)

    import components.methods.ucad as ucad_module

    ucad_module.leave_one_out_image_scores = keep
    try:
        method.fit_task(data)
    finally:
        ucad_module.leave_one_out_image_scores = original
    return seen


def main() -> int:
    args = product_arguments(__doc__.splitlines()[0], images=60)
    with tempfile.TemporaryDirectory() as tmp:
        root, name = Path(tmp), f"{args.product}{args.images}"
        cfg = load_config(args.params, [f"data.root={root}", f"data.products={name}", "method=ucad", *args.overrides])
        build_product(Path(args.data) / args.product, root / name, args.images, cfg.data.heldout_fraction)
        manifest = read_dataset(root, products=[name])
        cfg = resolve_tiling(cfg, manifest, [name])
        seen = captured_leave_out(build_method(cfg, load_backbone(cfg)), task_data(manifest, name, [name], cfg, None))
    feats, rows, owners = seen["features"], seen["rows"], seen["owners"]
    memory = NearestNeighbours(rows)
    searched: list[int] = []
    original = pruned_scores.foreign_neighbours

    def counting(queries, *rest, **kw):
        searched.append(len(queries))
        return original(queries, *rest, **kw)

    load = os.getloadavg()
    start = time.perf_counter()
    every = pruned_scores.leave_one_out_image_scores(feats, memory, rows, owners, top_k=seen["top_k"])
    every_s = time.perf_counter() - start
    pruned_scores.foreign_neighbours = counting
    start = time.perf_counter()
    pruned = pruned_scores.leave_one_out_image_scores(feats, memory, rows, owners, top_k=seen["top_k"], grid=seen["grid"])
    pruned_s = time.perf_counter() - start
    pruned_scores.foreign_neighbours = original
    b, n, c = feats.shape
    print("| product | images x patches x dims | memory rows | every patch s | pruned s | patches searched | max rel. diff | load before |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.product} {' '.join(args.overrides)} | {b} x {n} x {c} | {len(rows)} | {every_s:.2f} | {pruned_s:.2f} | "
          f"{sum(searched) / (b * n):.1%} | {float(((pruned - every).abs() / every.abs().clamp_min(1e-12)).max()):.1e} | "
          f"{'/'.join(f'{x:.1f}' for x in load)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

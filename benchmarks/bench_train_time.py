"""Wall and CPU seconds of one UCAD (or PatchCore) training step on an N-image real product.

Run: ``.venv/bin/python -m benchmarks.bench_train_time [--data DIR] [--product pcb] [--images 250] [key=value ...]``.

The product is built in a temporary folder from a real product's ``train/good`` images: the first
pass uses them as they are, further passes their horizontal / vertical flips, until the product
holds ``--images`` TRAINING images after the ``data.heldout_fraction`` split (so ``--images 250``
trains on exactly 250). The images keep their native resolution, so ``data.tile=auto`` tiles them as
it would the real product. Timed: ``fit_task`` alone (features, key, knowledge / bank, held-out
statistics), after the backbone is loaded, the images decoded and, for methods that train on structure label maps
(MTRMB), the maps made as the pipeline's mask-caching stage makes them; printed with the machine load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

from components.config import load_config
from components.data.loading import task_data
from components.data.image_files import list_images
from components.data.manifest import read_dataset
from components.data.tiling import resolve_tiling
from components.methods.loading import load_backbone
from components.methods.registry import build_method
from components.segment.task_maps import task_label_maps

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-ad"
FLIPS = (lambda im: im, ImageOps.mirror, ImageOps.flip, lambda im: ImageOps.flip(ImageOps.mirror(im)))


def build_product(source: Path, out: Path, images: int, heldout_fraction: float) -> int:
    """Write ``out/train/good`` with enough (flipped) copies of ``source/train/good`` for ``images`` training images."""
    sources = list_images(source / "train" / "good")
    total = images + math.ceil(images * heldout_fraction / (1 - heldout_fraction))
    if total > len(sources) * len(FLIPS):
        raise SystemExit(f"{source}: {len(sources)} images x {len(FLIPS)} flips < {total}")
    target = out / "train" / "good"
    target.mkdir(parents=True)
    for i in range(total):
        flip, path = FLIPS[i // len(sources)], sources[i % len(sources)]
        flip(Image.open(path).convert("RGB")).save(target / f"{i:04d}.png")
    return total


def product_arguments(description: str, images: int) -> argparse.Namespace:
    """The command line of a benchmark on a built product: --data, --product, --images, --params, key=value overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", default=os.environ.get("CONTAD_REAL_AD", str(DEFAULT_DATA)))
    parser.add_argument("--product", default="pcb")
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args()


def main() -> int:
    args = product_arguments(__doc__.splitlines()[0], images=250)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        name = f"{args.product}{args.images}"
        cfg = load_config(args.params, [f"data.root={root}", f"data.products={name}", *args.overrides])
        total = build_product(Path(args.data) / args.product, root / name, args.images, cfg.data.heldout_fraction)
        manifest = read_dataset(root, products=[name])
        cfg = resolve_tiling(cfg, manifest, [name])
        cfg.masks.cache_dir = str(root / "mask_cache")
        data = task_data(manifest, name, [name], cfg, task_label_maps(cfg, manifest, [name]))  # masks made (untimed) as the pipeline's caching stage does
        method = build_method(cfg, load_backbone(cfg))
        load = os.getloadavg()
        wall, cpu = time.perf_counter(), time.process_time()
        log = method.fit_task(data)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print("| method | product | train images (+ held out) | image_size / tile | train wall s | CPU s | memory MB | load 1/5/15 before -> after |")
    print("|---|---|---|---|---|---|---|---|")
    after = os.getloadavg()
    print(
        f"| {cfg.method} | {args.product} x{args.images} | {len(data.train)} (+{total - len(data.train)}) | "
        f"{cfg.data.image_size} / {cfg.data.tile} | {wall:.1f} | {cpu:.1f} | {log.get('memory_bytes', 0) / 2**20:.2f} | "
        f"{'/'.join(f'{x:.1f}' for x in load)} -> {'/'.join(f'{x:.1f}' for x in after)} |"
    )
    if "feature_choice" in log:  # ucad.feature_choices: what the timed fit chose, and on what
        print(f"\nfeatures: {log['features']}; choice: {json.dumps(log['feature_choice'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

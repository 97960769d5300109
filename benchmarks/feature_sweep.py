"""Patch-feature and memory settings on real products, measured without the pipeline (fast sweep).

Run: ``python -m benchmarks.feature_sweep --data ../shared/data/real-ad --products grid,pcb
--variants "size=224,padding=valid;size=224,padding=zeros;size=448,tile=224,overlap=0" [--ratio 0.1] [--budget 2]``.

For every product and variant: training features of the non-held-out train/good images
(same split as the pipeline), a budgeted JL k-center-greedy coreset (or ``bank=random:N``),
nearest-neighbour patch scores of the test images, image score = max patch score. Prints image
AUROC, pixel AUROC, the share of images whose top patch lies on the one-patch border ring, and
the seconds spent on features and on the coreset.

Reads the test split's labels and masks: a diagnosis; ``data.tile: auto`` was once chosen with it and has
since been re-decided on the validation protocol; not used to choose defaults (issue 33: defaults come
from the validation protocol, ``benchmarks/validation_levers.py``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from components.backbones.registry import build_backbone
from components.backbones.tiled import tiled_backbone
from components.config import BackboneConfig, MemoryConfig
from components.data.loading import load_images, load_masks, train_split
from components.data.manifest import read_dataset
from components.methods.coreset import memory_coreset
from components.methods.extract import batched
from components.methods.knn import NearestNeighbours
from components.methods.scoring import anomaly_maps

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-ad"


def parse_variant(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if item)


def run_variant(manifest, product: str, v: dict[str, str], memory: MemoryConfig, cache: dict) -> dict[str, float]:
    size = int(v.get("size", 224))
    bcfg = BackboneConfig(device="cpu", pool_size=int(v.get("pool", 3)), pool_padding=v.get("padding", "zeros"),
                          feature_dim=int(v["dim"]) if "dim" in v else None, feature_layer=int(v.get("layer", 3)))
    tile = int(v["tile"]) if "tile" in v else None
    backbone = tiled_backbone(build_backbone(bcfg, tile or size), size, tile, int(v.get("overlap", 32)))
    key = (product, size)
    if key not in cache:
        train, _ = train_split(manifest, [product], 0.1, 0)
        test = manifest[(manifest["product"] == product) & (manifest["split"] == "test")]
        cache[key] = (load_images(train["image_path"].tolist(), size), load_images(test["image_path"].tolist(), size),
                      test["label"].to_numpy(), load_masks(test["mask_path"].tolist(), size))
    train_images, test_images, labels, masks = cache[key]
    t0 = time.perf_counter()
    feats = batched(backbone.features, train_images, 8, torch.device("cpu"))
    t1 = time.perf_counter()
    flat = feats.reshape(-1, feats.shape[-1])
    bank_spec = v.get("bank", "coreset")
    if bank_spec.startswith("random:"):
        n = min(int(bank_spec.split(":")[1]), flat.shape[0])
        bank = flat[torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(0))[:n]]
    else:
        bank = flat[memory_coreset(flat, memory)]
    t2 = time.perf_counter()
    test_feats = batched(backbone.features, test_images, 8, torch.device("cpu"))
    b, n, c = test_feats.shape
    patch = NearestNeighbours(bank).nearest_distance(test_feats.reshape(-1, c)).reshape(b, n)
    t3 = time.perf_counter()
    grid = backbone.grid_size(size)
    image = patch.max(dim=1).values.numpy()
    top = patch.argmax(dim=1)
    rows, cols = top // grid[1], top % grid[1]
    border = ((rows == 0) | (cols == 0) | (rows == grid[0] - 1) | (cols == grid[1] - 1)).float().mean().item()
    maps = anomaly_maps(patch, grid, (size, size), 4.0)
    pixel = roc_auc_score(masks.numpy().ravel() > 0, maps.numpy().ravel()) if masks.sum() > 0 else float("nan")
    return {"image_auroc": roc_auc_score(labels, image), "pixel_auroc": pixel, "border_top": border,
            "bank": bank.shape[0], "dim": c, "feat_s": t1 - t0, "coreset_s": t2 - t1, "test_s": t3 - t2}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("CONTAD_REAL_AD", str(DEFAULT_DATA)))
    parser.add_argument("--products", default="grid,hazelnut_toy,magnetic_tile,pcb")
    parser.add_argument("--variants", default="size=224,padding=valid;size=224,padding=zeros")
    parser.add_argument("--ratio", type=float, default=MemoryConfig().coreset_ratio)
    parser.add_argument("--budget", type=float, default=MemoryConfig().budget_mb)
    parser.add_argument("--projection", type=int, default=MemoryConfig().projection_dim)
    args = parser.parse_args()
    memory = MemoryConfig(coreset_ratio=args.ratio, budget_mb=args.budget, projection_dim=args.projection)
    products = args.products.split(",")
    manifest = read_dataset(Path(args.data), products=products)
    cache: dict = {}
    print("| variant | product | image AUROC | pixel AUROC | top patch on border | bank rows | dim | features s | coreset s | test s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for text in args.variants.split(";"):
        v = parse_variant(text)
        aurocs = []
        for product in products:
            r = run_variant(manifest, product, v, memory, cache)
            aurocs.append(r["image_auroc"])
            print(f"| {text} | {product} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['border_top']:.2f} | {r['bank']} | "
                  f"{r['dim']} | {r['feat_s']:.1f} | {r['coreset_s']:.1f} | {r['test_s']:.1f} |", flush=True)
        print(f"| {text} | **average** | {np.mean(aurocs):.3f} | | | | | | | |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

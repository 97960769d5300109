"""Masks per second of every structure-mask provider on CPU.

Classical providers run on real-ad training images (``CONTAD_REAL_AD``, default
``../shared/data/real-ad``) when present, else on generated synthetic products. ``sam`` and
``grounded_sam`` run with MINIATURE RANDOM-WEIGHT models (no checkpoints are downloaded): their
numbers measure the pipeline overhead around tiny networks, not ViT-B SAM / Grounding DINO speed.

    .venv/bin/python -m benchmarks.bench_masks [--images 16] [--image-size 224]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.config import MasksConfig, SynthConfig
from components.segment.provider import MaskProvider

REPO_ROOT = Path(__file__).resolve().parents[1]


def real_ad_images(limit: int) -> tuple[str, list[tuple[str, np.ndarray]]]:
    """Up to ``limit`` training images spread over the real-ad categories ([] when absent)."""
    root = Path(os.environ.get("CONTAD_REAL_AD", REPO_ROOT.parent / "shared" / "data" / "real-ad"))
    per_category = [sorted(c.glob("train/good/*.png")) for c in sorted(root.iterdir()) if c.is_dir()] if root.is_dir() else []
    picked: list[tuple[str, np.ndarray]] = []
    for i in range(limit):
        pool = [paths for paths in per_category if len(paths) > i // max(len(per_category), 1)]
        if not pool:
            break
        paths = pool[i % len(pool)]
        path = paths[i // len(pool)]
        picked.append((path.parts[-4], np.asarray(Image.open(path).convert("RGB"))))
    return f"real-ad ({root})", picked


def synthetic_images(limit: int) -> tuple[str, list[tuple[str, np.ndarray]]]:
    from components.data.synth import generate_products

    out = Path(tempfile.mkdtemp(prefix="bench_masks_"))
    generate_products(out, 3, 0, SynthConfig(train_per_product=max(2, limit // 3 + 1), test_good_per_product=1, test_defect_per_type=1))
    paths = sorted(out.glob("*/train/good/*.png"))[:limit]
    return "synthetic products", [(p.parts[-4], np.asarray(Image.open(p).convert("RGB"))) for p in paths]


def build_providers(image_size: int) -> list[tuple[str, MaskProvider]]:
    from components.segment.classical import FelzenszwalbProvider, SLICProvider
    from components.segment.grounded_sam import GroundedSAMProvider
    from components.segment.sam import SAMProvider
    from components.segment.tiny_models import tiny_grounding_dino, tiny_sam

    base = MasksConfig(image_size=image_size, device="cpu")
    detector, processor = tiny_grounding_dino()
    return [
        ("felzenszwalb", FelzenszwalbProvider(base)),
        ("slic", SLICProvider(base)),
        ("sam [tiny random weights]", SAMProvider(base.model_copy(update={"provider": "sam"}), model=tiny_sam())),
        (
            "grounded_sam [tiny random weights]",
            GroundedSAMProvider(base.model_copy(update={"provider": "grounded_sam"}), sam_model=tiny_sam(), detector=detector, processor=processor),
        ),
    ]


def time_provider(provider: MaskProvider, images: list[tuple[str, np.ndarray]]) -> tuple[float, float]:
    """(masks per second, mean segments per map) after one warm-up image."""
    provider.label_map(images[0][1], images[0][0])
    start = time.perf_counter()
    segments = [int(provider.label_map(image, product).max()) for product, image in images]
    elapsed = time.perf_counter() - start
    return len(images) / elapsed, float(np.mean(segments))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="images timed per provider")
    parser.add_argument("--image-size", type=int, default=224, help="masks.image_size")
    args = parser.parse_args(argv)
    source, images = real_ad_images(args.images)
    if not images:
        source, images = synthetic_images(args.images)
    print(f"images: {len(images)} from {source}; label maps at {args.image_size}px; "
          f"CPU, torch threads = {torch.get_num_threads()}")
    print(f"{'provider':<36} {'masks/s':>9} {'ms/mask':>9} {'segments':>9}")
    for name, provider in build_providers(args.image_size):
        rate, segments = time_provider(provider, images)
        print(f"{name:<36} {rate:>9.2f} {1000 / rate:>9.1f} {segments:>9.1f}")
    print("sam / grounded_sam rows use miniature random-weight models: pipeline overhead only, not real SAM speed.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

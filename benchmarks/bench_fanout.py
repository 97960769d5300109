"""Mask caching: the sequential path against the Dask fan-out (``flows/fanout.py``) with 1 and 2 workers.

Felzenszwalb structure masks of training images (real-ad when present, else synthetic products),
each configuration into its own empty cache. The Dask columns include starting the LocalCluster
(worker processes import torch/prefect), which is what a run pays; the cluster start alone is
reported too. Every configuration must produce byte-identical cache entries.

    .venv/bin/python -m benchmarks.bench_fanout [--images 48] [--repeats 1]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")  # busy machines start it slowly

import pandas as pd

from components.config import ComputeConfig, Config
from flows import fanout

REPO_ROOT = Path(__file__).resolve().parents[1]


def training_images(limit: int, scratch: Path) -> pd.DataFrame:
    """A manifest of up to ``limit`` training images spread over the real-ad products (synthetic when absent)."""
    from components.data.manifest import read_dataset

    root = Path(os.environ.get("CONTAD_REAL_AD", REPO_ROOT.parent / "shared" / "data" / "real-ad"))
    if not root.is_dir():
        from components.config import SynthConfig
        from components.data.synth import generate_products

        root = scratch / "synth"
        generate_products(root, 3, 0, SynthConfig(products=3, train_per_product=max(limit // 3, 2), image_size=256))
    manifest = read_dataset(root)
    train = manifest[manifest["split"] == "train"]
    per_product = max(1, limit // train["product"].nunique())
    return train.groupby("product", group_keys=False).head(per_product).reset_index(drop=True)


def cache_digest(cache_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(cache_dir.rglob("*.png")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def run_sequential(cfg: Config, manifest: pd.DataFrame, products: list[str]) -> float:
    from flows.pipeline import cache_masks

    started = time.perf_counter()
    cache_masks.fn(cfg, manifest, products)
    return time.perf_counter() - started


def run_dask(cfg: Config, manifest: pd.DataFrame, products: list[str], workers: int) -> tuple[float, float]:
    """(seconds including the cluster start, seconds of the cluster start alone)."""
    from prefect import flow

    @flow(name="bench-fanout-masks")
    def masks_flow() -> None:
        fanout.cache_masks(cfg, manifest, products)

    runner = fanout.task_runner(ComputeConfig(workers=workers))
    started = time.perf_counter()
    with runner:
        runner.client.wait_for_workers(workers)  # start the cluster first, to time it separately
    startup = time.perf_counter() - started
    started = time.perf_counter()
    masks_flow.with_options(task_runner=fanout.task_runner(ComputeConfig(workers=workers)))()
    return time.perf_counter() - started, startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="contad-bench-fanout-") as tmp:
        manifest = training_images(args.images, Path(tmp))
        products = sorted(manifest["product"].unique())
        print(f"{len(manifest)} training images of {len(products)} products; load: {os.getloadavg()}")
        rows = []
        digests = {}
        for label, workers in (("sequential (compute.workers=1)", 0), ("Dask, 1 worker", 1), ("Dask, 2 workers", 2)):
            cfg = Config.model_validate({"masks": {"provider": "felzenszwalb", "image_size": args.image_size, "workers": 1,
                                                   "cache_dir": str(Path(tmp) / f"cache-{workers}")}})
            if workers == 0:
                seconds, startup = run_sequential(cfg, manifest, products), 0.0
            else:
                seconds, startup = run_dask(cfg, manifest, products, workers)
            digests[label] = cache_digest(Path(cfg.masks.cache_dir))
            rows.append((label, seconds, startup, len(manifest) / seconds))
            print(f"{label:32s} {seconds:7.1f} s  ({startup:5.1f} s cluster start alone)  {len(manifest) / seconds:6.2f} img/s", flush=True)
        assert len(set(digests.values())) == 1, f"cache contents differ: {digests}"
        print("| configuration | seconds (incl. cluster start) | cluster start alone (s) | images/s |")
        print("|---|---:|---:|---:|")
        for label, seconds, startup, rate in rows:
            print(f"| {label} | {seconds:.1f} | {startup:.1f} | {rate:.2f} |")
        print(f"identical cache entries in all configurations (sha256 {next(iter(digests.values()))[:12]}); load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

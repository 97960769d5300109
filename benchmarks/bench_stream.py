"""LeMO online mode on real data: throughput, I-AUROC vs images seen, and drift with/without online updates.

Run: ``nice -n 10 .venv/bin/python -m benchmarks.bench_stream [--data DIR] [--out runs/bench-stream] [key=value ...]``.

1. Throughput (CPU, batch 1, ``--threads``): per image, the backbone-only forward
   (``backbone.features``) and the online step of ``contad stream`` (one frozen pass, prequential
   score + map, key routing, one AnoNCE update) are timed alternately on the same images in the same
   run; images are decoded beforehand for both. Reported: images/s of each and their ratio.
2. Curve: each product's training images are streamed once in a seeded order; every ``--every``
   images the test split's image AUROC is measured (for the curve only, never for any selection).
3. Drift: the first half of the training images is learned clean; the test split and the second
   half are then drifted (brightness +``--brightness`` or Gaussian noise of std ``--noise`` in
   [0, 1] pixel units). "frozen" scores the drifted test split with the clean model; "online"
   first streams the drifted second half (updates on) and then scores it; "clean online" streams
   the clean second half and scores the clean test split (the reference for the same amount of data).

Reads the test split's labels (the I-AUROC curve and the drift rows): reporting only; not used to choose
defaults (issue 33: defaults come from the validation protocol, ``benchmarks/validation_levers.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from components.config import Config, load_config  # noqa: E402
from components.data.loading import IMAGENET_MEAN, IMAGENET_STD, denormalize, load_images  # noqa: E402
from components.data.manifest import read_dataset  # noqa: E402
from components.methods.lemo import LeMO  # noqa: E402
from components.methods.loading import load_backbone  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-ad"


def train_images(manifest: Any, product: str, size: int, seed: int) -> torch.Tensor:
    rows = manifest[(manifest["product"] == product) & (manifest["split"] == "train") & (manifest["label"] == 0)]
    paths = sorted(rows["image_path"])
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
    return load_images([paths[i] for i in order], size)


def test_split(manifest: Any, product: str, size: int) -> tuple[torch.Tensor, list[int]]:
    rows = manifest[(manifest["product"] == product) & (manifest["split"] == "test")].sort_values("image_path")
    return load_images(list(rows["image_path"]), size), [int(v) for v in rows["label"]]


def drift(images: torch.Tensor, kind: str, amount: float, seed: int) -> torch.Tensor:
    """Brightness shift or Gaussian noise in [0, 1] pixel space, re-normalised."""
    pixels = denormalize(images)
    if kind == "brightness":
        pixels = pixels + amount
    else:
        pixels = pixels + amount * torch.randn(pixels.shape, generator=torch.Generator().manual_seed(seed))
    return (pixels.clamp(0.0, 1.0) - IMAGENET_MEAN) / IMAGENET_STD


def learn(method: LeMO, task: int, images: torch.Tensor) -> None:
    for i in range(len(images)):
        method.learn_features(method.frozen_features(images[i : i + 1]), task)


def auroc(method: LeMO, task: int, images: torch.Tensor, labels: list[int]) -> float:
    scores = torch.cat([method.score_features(method.frozen_features(images[s : s + 8]), task)[0] for s in range(0, len(images), 8)])
    return float(roc_auc_score(labels, scores.numpy()))


def throughput(cfg: Config, images: torch.Tensor, rounds: int) -> dict[str, float]:
    """Alternating per-image timings of backbone-only forward and the full online step."""
    method = LeMO(cfg, load_backbone(cfg))
    task = method.add_task("bench")
    backbone_s, online_s = [], []
    for r in range(rounds + 2):  # two warm-up images
        image = images[r % len(images)][None]
        start = time.perf_counter()
        with torch.no_grad():
            method.backbone.features(image)
        mid = time.perf_counter()
        feats = method.frozen_features(image)
        method.score_features(feats, task)
        method.route_features(feats) if len(method.keys[task]) else None
        method.learn_features(feats, task)
        end = time.perf_counter()
        if r >= 2:
            backbone_s.append(mid - start)
            online_s.append(end - mid)
    backbone_rate, online_rate = 1.0 / statistics.median(backbone_s), 1.0 / statistics.median(online_s)
    return {
        "images": rounds,
        "backbone_only_img_s": backbone_rate,
        "online_step_img_s": online_rate,
        "ratio": online_rate / backbone_rate,
        "backbone_mean_ms": 1000 * statistics.mean(backbone_s),
        "online_mean_ms": 1000 * statistics.mean(online_s),
    }


def curve(cfg: Config, product: str, train: torch.Tensor, test: tuple[torch.Tensor, list[int]], every: int) -> list[tuple[int, float]]:
    method = LeMO(cfg, load_backbone(cfg))
    task = method.add_task(product)
    points = []
    for seen in range(0, len(train) + 1):
        if seen and (seen % every == 0 or seen == len(train)):
            points.append((seen, auroc(method, task, *test)))
            print(f"  {product}: {seen} images seen, I-AUROC {points[-1][1]:.3f}", flush=True)
        if seen < len(train):
            learn(method, task, train[seen : seen + 1])
    return points


def drift_rows(cfg: Config, product: str, train: torch.Tensor, test: tuple[torch.Tensor, list[int]], args: argparse.Namespace) -> list[dict[str, Any]]:
    half = len(train) // 2
    rows = []
    base = LeMO(cfg, load_backbone(cfg))
    task = base.add_task(product)
    learn(base, task, train[:half])
    base_dir = Path(args.out) / f".drift-{product}"
    base.save(base_dir)
    clean = LeMO(cfg, load_backbone(cfg))
    clean.load(base_dir)
    learn(clean, task, train[half:])
    rows.append({"product": product, "drift": "none", "frozen": auroc(base, task, *test), "online": auroc(clean, task, *test)})
    for kind, amount in (("brightness", args.brightness), ("noise", args.noise)):
        drifted_test = (drift(test[0], kind, amount, cfg.seed + 1), test[1])
        online = LeMO(cfg, load_backbone(cfg))
        online.load(base_dir)
        learn(online, task, drift(train[half:], kind, amount, cfg.seed))
        rows.append({"product": product, "drift": f"{kind} {amount}", "frozen": auroc(base, task, *drifted_test), "online": auroc(online, task, *drifted_test)})
        print(f"  {product} {kind}: frozen {rows[-1]['frozen']:.3f}, online {rows[-1]['online']:.3f}", flush=True)
    return rows


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for product, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=product)
    ax.set_xlabel("training images seen (one online pass, batch 1)")
    ax.set_ylabel("test image AUROC")
    ax.set_ylim(0.0, 1.02)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_title("LeMO online: I-AUROC vs images seen (curve only, no selection)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("CONTAD_REAL_AD", str(DEFAULT_DATA)))
    parser.add_argument("--out", default="runs/bench-stream")
    parser.add_argument("--products", default="grid,hazelnut_toy,magnetic_tile")
    parser.add_argument("--throughput-product", default="hazelnut_toy")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--brightness", type=float, default=0.2)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--skip", default="", help="comma list of parts to skip: throughput,curve,drift")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("params.yaml", ["method=lemo", f"data.root={args.data}", *args.overrides])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    products = args.products.split(",")
    manifest = read_dataset(Path(args.data), products=sorted(set(products) | {args.throughput_product}))
    skip = set(filter(None, args.skip.split(",")))
    result: dict[str, Any] = {"load_before": os.getloadavg(), "threads": args.threads, "config": cfg.lemo.model_dump(mode="json")}
    if "throughput" not in skip:
        images = train_images(manifest, args.throughput_product, cfg.data.image_size, cfg.seed)
        result["throughput"] = throughput(cfg, images, args.rounds)
        print("throughput:", json.dumps(result["throughput"]), flush=True)
    curves, drifts = {}, []
    for product in products:
        train = train_images(manifest, product, cfg.data.image_size, cfg.seed)
        test = test_split(manifest, product, cfg.data.image_size)
        if "curve" not in skip:
            every = max(args.every, len(train) // 8)
            curves[product] = curve(cfg, product, train, test, every)
        if "drift" not in skip:
            drifts.extend(drift_rows(cfg, product, train, test, args))
    result.update(curves=curves, drift=drifts, load_after=os.getloadavg())
    if curves:
        plot_curves(curves, out / "auroc_vs_images.png")
    (out / "bench_stream.json").write_text(json.dumps(result, indent=2) + "\n")
    if drifts:
        print("\n| product | drift | frozen (no updates) | online updates |\n|---|---|---|---|")
        for row in drifts:
            print(f"| {row['product']} | {row['drift']} | {100 * row['frozen']:.1f} | {100 * row['online']:.1f} |")
    print(f"\nwrote {out / 'bench_stream.json'}" + (f" and {out / 'auroc_vs_images.png'}" if curves else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

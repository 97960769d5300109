"""Drift watch on real images: false alarms on the undrifted line, alarms under brightness / blur / noise drift.

    python -m benchmarks.bench_drift --bank runs/real-ad/banks --data ../shared/data/real-ad \
        [--products magnetic_tile,pcb] [--window 10] [--alpha 0.01] [--conditions none,blur 2px] [--limit N]

The good test images of each product are decided by the bank's detector (what ``serve-api`` runs) as
they are and under the drifts of benchmarks/bench_stream.py (brightness +0.1 and Gaussian noise of std
0.05 in [0, 1] pixel units, plus a 2 px Gaussian blur). The scores of the images decided OK are fed,
in path order, to the drift watch of ``components.eval.drift`` (windows of ``--window`` OK scores
against the calibration normals); the table gives windows, alarms and the share of images rejected
per condition. Good test images are only scored; nothing is chosen from them.

Reads the test split's labels (its good images): scored for reporting only; not used to choose defaults
(issue 33: defaults come from the validation protocol, ``benchmarks/validation_levers.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from components.config import load_config
from components.data.manifest import read_dataset
from components.eval.drift import drift_watch_for
from flows.deployed import BankSource

CONDITIONS = ("none", "brightness +0.1", "noise 0.05", "blur 2px")


def drifted(rgb: np.ndarray, condition: str, rng: np.random.Generator) -> np.ndarray:
    """``rgb`` (HxWx3 uint8) under ``condition``."""
    if condition == "none":
        return rgb
    if condition.startswith("brightness"):
        return np.clip(rgb.astype(np.float32) + 255 * 0.1, 0, 255).astype(np.uint8)
    if condition.startswith("noise"):
        return np.clip(rgb.astype(np.float32) + rng.normal(0, 255 * 0.05, rgb.shape), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--products", default="magnetic_tile,pcb")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--conditions", default=",".join(CONDITIONS), help=f"comma list of {CONDITIONS}")
    parser.add_argument("--limit", type=int, default=None, help="first N good images per product (path order)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cfg = load_config(None, [])
    source = BankSource(args.bank, cfg)
    detector = source.load(source.current())
    manifest = read_dataset(Path(args.data))
    rows = []
    for product in args.products.split(","):
        goods = sorted(manifest[(manifest["product"] == product) & (manifest["split"] == "test") & (manifest["label"] == 0)]["image_path"])
        rgbs = [np.asarray(Image.open(p).convert("RGB")) for p in goods[: args.limit]]
        for condition in args.conditions.split(","):
            rng = np.random.default_rng(0)
            verdicts = [detector.decide([drifted(rgb, condition, rng)])[0] for rgb in rgbs]
            watch = drift_watch_for(detector.calibration, args.window, args.alpha)
            readings = [watch.observe(v.product, v.score) for v in verdicts if v.decision == "OK"]
            full = [r for r in readings if r is not None]
            rows.append({"product": product, "condition": condition, "images": len(rgbs),
                         "rejected": sum(v.decision == "NG" for v in verdicts) / len(rgbs),
                         "windows": len(full), "alarms": sum(r.alarm for r in full),
                         "median_ks": float(np.median([r.statistic for r in full])) if full else float("nan")})
            print(rows[-1], flush=True)
    print(f"\nwindow {args.window} OK images, alpha {args.alpha}")
    print("| product | condition | good images | rejected | windows | alarms | median KS |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['product']} | {r['condition']} | {r['images']} | {r['rejected']:.0%} | {r['windows']} | {r['alarms']} | {r['median_ks']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

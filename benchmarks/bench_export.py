"""ONNX export parity and CPU speed: the exported detector against ``contad predict``'s Detector, same images.

    python -m benchmarks.bench_export --bank runs/real-ad/banks --data ../shared/data/real-ad [--per-product 20]

Exports the source's detector (``contad export``), then decides the first ``--per-product`` test
images of every product (good and defective, sorted by path) twice in one process: with the torch
``Detector`` (what ``predict`` / the REST service run) and with the reference runner
(``run_onnx.py``: onnxruntime + NumPy). Reports per product the largest relative score difference,
whether routed products and OK/NG decisions agree, and images/s of both (one image at a time, the
runner's way; the ratio is what compares, absolute figures depend on the machine's load). Reads test
images only to score them; nothing is chosen from them.

Reads the test split's images (no label or mask enters a number): parity and speed only; not used to
choose defaults (issue 33: defaults come from the validation protocol,
``benchmarks/validation_levers.py``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from components.config import load_config
from components.data.manifest import read_dataset
from components.decision import decode_image
from components.export import runner
from components.export.onnx_export import export_method_dir
from flows.deployed import BankSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", required=True, help="bank store DIR[@VERSION]")
    parser.add_argument("--data", required=True, help="MVTec-layout root holding the products' test images")
    parser.add_argument("--per-product", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    cfg = load_config(None, [])
    source = BankSource(args.bank, cfg)
    version = source.current()
    detector = source.load(version)
    manifest = read_dataset(Path(args.data))
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        method_dir, _ = source.checkout(version, Path(tmp))
        export_method_dir(method_dir, cfg, Path(tmp) / "onnx")
        onnx = runner.OnnxDetector(Path(tmp) / "onnx")
        for product in detector.method.tasks:
            rows = manifest[(manifest["product"] == product) & (manifest["split"] == "test")].sort_values("image_path")
            paths = [str(p) for p in rows["image_path"]][: args.per_product]
            runner.decide(onnx, paths[0])  # warm both (sessions, caches) before timing
            detector.decide([decode_image(Path(paths[0]).read_bytes(), 10**9, paths[0])])
            started = time.perf_counter()
            torch_verdicts = [detector.decide([decode_image(Path(p).read_bytes(), 10**9, p)])[0] for p in paths]
            torch_s = time.perf_counter() - started
            started = time.perf_counter()
            onnx_verdicts = [runner.decide(onnx, p) for p in paths]
            onnx_s = time.perf_counter() - started
            ref = np.array([v.score for v in torch_verdicts])
            got = np.array([v["score"] for v in onnx_verdicts])
            results[product] = {
                "images": len(paths),
                "max_rel_score_diff": float(np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1e-12))),
                "same_routing": [v.product for v in torch_verdicts] == [v["product"] for v in onnx_verdicts],
                "same_decisions": [v.decision for v in torch_verdicts] == [v["decision"] for v in onnx_verdicts],
                "ng": sum(v.decision == "NG" for v in torch_verdicts),
                "torch_images_per_s": len(paths) / torch_s,
                "onnx_images_per_s": len(paths) / onnx_s,
            }
    print(f"bank version {str(version.bank_version)[:12]}, image size {detector.image_size}, tile {detector.config.data.tile}")
    print("| product | images | max rel. score diff | same routing | same decisions | NG | torch img/s | onnx img/s |")
    print("|---|---|---|---|---|---|---|---|")
    for product, r in results.items():
        print(f"| {product} | {r['images']} | {r['max_rel_score_diff']:.1e} | {r['same_routing']} | {r['same_decisions']} | {r['ng']} | "
              f"{r['torch_images_per_s']:.2f} | {r['onnx_images_per_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

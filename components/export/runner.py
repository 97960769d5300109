"""Reference runner of a contad ONNX detector: onnxruntime + NumPy (+ Pillow to read images), nothing else.

    python run_onnx.py EXPORT_DIR IMAGE... [--product P] [--target-fpr R]

Prints one JSON line per image: product (routed task), score, threshold, decision (OK/NG).
Scores what ``contad predict`` scores: same resize, routing, nearest-neighbour scores and thresholds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

BLOCK = 1 << 22  # query x memory distances computed at once


class OnnxDetector:
    """An exported detector folder (``detector.onnx.json`` + graphs + ``.npy`` data)."""

    def __init__(self, folder: str | Path, target_fpr: float | None = None) -> None:
        self.dir = Path(folder)
        self.m = json.loads((self.dir / "detector.onnx.json").read_text())
        self.graphs: dict[str, ort.InferenceSession] = {}
        self.memories = {t["name"]: np.load(self.dir / t["memory"]) for t in self.m["tasks"]}
        routing = self.m["routing"]
        self.keys = np.load(self.dir / routing["keys"]) if routing["kind"] == "keys" else None
        self.segment = np.load(self.dir / routing["segment"]) if routing["kind"] == "keys" else None
        self.origin = np.load(self.dir / routing["origin"]) if routing["kind"] == "bank_owner" else None
        self.thresholds = self._thresholds(target_fpr)

    def _thresholds(self, target_fpr: float | None) -> dict[str, float]:
        """Image threshold per task: the stored one, or the smallest normal score with <= target_fpr above it."""
        tasks = self.m["thresholds"]["tasks"]
        if target_fpr is None:
            return {t: v["image"] for t, v in tasks.items()}
        return {t: float(np.quantile(np.asarray(v["normal_scores"], np.float64), 1.0 - target_fpr, method="higher")) for t, v in tasks.items()}

    def run(self, graph: str, x: np.ndarray) -> np.ndarray:
        if graph not in self.graphs:
            self.graphs[graph] = ort.InferenceSession(str(self.dir / graph), providers=["CPUExecutionProvider"])
        session = self.graphs[graph]
        return session.run(None, {session.get_inputs()[0].name: x})[0]

    def preprocess(self, path: str | Path) -> np.ndarray:
        """(1, 3, S, S) float32: RGB, square bilinear resize (Pillow), ImageNet normalisation."""
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                arr = np.asarray(img, dtype=np.float64)
                peak = arr.max() if arr.size and arr.max() > 0 else 1.0
                img = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
            size = self.m["image_size"]
            rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        x = np.asarray(rgb, dtype=np.uint8).astype(np.float32).transpose(2, 0, 1)[None] / np.float32(255.0)
        mean = np.asarray(self.m["normalise"]["mean"], np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.m["normalise"]["std"], np.float32).reshape(1, 3, 1, 1)
        return ((x - mean) / std).astype(np.float32)


def nearest(queries: np.ndarray, memory: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices), each (Q, k), of the k nearest memory rows: candidates by float32 expansion
    (as faiss finds them), their distances recomputed exactly."""
    k = min(k, len(memory))
    memory = np.ascontiguousarray(memory, np.float32)
    sq_mem = (memory**2).sum(1)
    out_d, out_i = np.empty((len(queries), k)), np.empty((len(queries), k), np.int64)
    step = max(1, BLOCK // len(memory))
    for s in range(0, len(queries), step):
        q = np.ascontiguousarray(queries[s : s + step], np.float32)
        sq = (q**2).sum(1)[:, None] - 2.0 * (q @ memory.T) + sq_mem[None]
        if k == 1:
            idx = sq.argmin(axis=1)[:, None]
        elif k < len(memory):
            idx = np.argpartition(sq, k - 1, axis=1)[:, :k]
        else:
            idx = np.tile(np.arange(len(memory)), (len(q), 1))
        d = np.linalg.norm(q[:, None, :].astype(np.float64) - memory[idx].astype(np.float64), axis=2)
        order = np.argsort(d, axis=1, kind="stable")
        out_d[s : s + step], out_i[s : s + step] = np.take_along_axis(d, order, 1), np.take_along_axis(idx, order, 1)
    return out_d, out_i


def decide(det: OnnxDetector, path: str | Path, product: str | None = None) -> dict:
    """Route, score and decide one image."""
    m, x = det.m, det.preprocess(path)
    names = [t["name"] for t in m["tasks"]]
    kind = m["routing"]["kind"]
    if kind == "keys":  # nearest task key set, summed over the image's key patches
        q, keys = det.run(m["routing"]["graph"], x)[0].astype(np.float64), det.keys.astype(np.float64)
        d = np.sqrt(np.maximum((q**2).sum(1)[:, None] - 2.0 * q @ keys.T + (keys**2).sum(1)[None], 0.0))
        task = int(np.argmin([d[:, det.segment == t].min(1).sum() for t in range(len(names))]))
    elif kind == "product_label":
        if product not in names:
            raise SystemExit(f"this detector needs --product (one of {names})")
        task = names.index(product)
    else:
        task = -1  # bank owner: decided after the search
    entry = m["tasks"][max(task, 0)]
    feats = det.run(entry["graph"], x)[0].astype(np.float32)
    memory = det.memories[entry["name"]]
    k = m["scoring"]["num_neighbors"]
    dists, index = nearest(feats, memory, k)
    patch = dists.mean(1)
    if kind == "bank_owner":
        task = int(np.bincount(det.origin[index[:, 0]], minlength=len(names)).argmax())
        entry = m["tasks"][task]
    best = int(patch.argmax())
    score = float(patch[best])
    if m["scoring"]["reweight"]:  # PatchCore: weight by the test patch's distances to the 9 rows around m*
        support = nearest(memory[index[best, :1]], memory, 9)[1][0]
        ds = np.linalg.norm(memory[support].astype(np.float64) - feats[best].astype(np.float64), axis=1)
        weights = np.exp(ds - ds.max())
        score *= 1.0 - weights[0] / weights.sum()
    scale = entry["scale"]
    amap = det.run(entry.get("maps", m["maps"]), (patch / scale).astype(np.float32)[None])[0]  # a task with its own feature settings has its own
    name, threshold = entry["name"], det.thresholds[entry["name"]]
    score /= scale
    return {"path": str(path), "product": name, "score": score, "threshold": threshold,
            "decision": "NG" if score > threshold else "OK", "map_max": float(amap.max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--product", default=None, help="product of every image (only for a per-product oracle)")
    parser.add_argument("--target-fpr", type=float, default=None, help="re-derive thresholds at this false-reject rate")
    args = parser.parse_args(argv)
    det = OnnxDetector(args.folder, args.target_fpr)
    for path in args.images:
        print(json.dumps(decide(det, path, args.product)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Loopback load test of ``contad serve-api`` against in-process ``Detector.decide`` on the same images.

Run: ``.venv/bin/python -m benchmarks.bench_serve [--data DIR] [--products a,b] [--clients 4] [--duration 20]``.

1. Model: a PatchCore (``method=patchcore_finetune``, EfficientNet-Lite0, ``data.image_size``)
   sequence trained on the real products (``--data``, default ``../shared/data/real-ad``, products
   ``grid,hazelnut_toy``) into ``--work`` with ``contad run`` (reused when already there).
2. Images: every test image of those products, encoded bytes read once.
3. In-process: one thread calls ``decode_image`` + ``Detector.decide([image])`` image after image
   for ``--duration`` seconds (what one REST request does, without HTTP).
4. REST: ``contad serve-api --bank WORK/banks`` in a subprocess on 127.0.0.1;
   ``--clients`` threads each POST images (raw bytes) in a loop for ``--duration`` seconds.
   Reported: requests/s, latency p50/p95/p99 (client side), errors (non-200 or transport).
5. Ratio: REST requests/s over in-process images/s (same images, same model).

In-process is measured half before and half after the REST phase (load drifts on a shared
machine). Prints a markdown table and writes ``--out`` (JSON) with the 1-minute load average of
each phase. Run with ``OMP_NUM_THREADS=1`` on a busy machine: with more OpenMP threads than free
cores, torch/faiss barriers spin and a 0.3 s inference takes 2-6 s.

Reads the test split's images (no label or mask enters a number): throughput only; not used to choose
defaults (issue 33: defaults come from the validation protocol, ``benchmarks/validation_levers.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from components.config import load_config
from components.data.manifest import read_dataset
from components.decision import Detector, decode_image

REPO = Path(__file__).resolve().parents[1]


def run_overrides(data: Path, products: str, work: Path, image_size: int) -> list[str]:
    return [
        "method=patchcore_finetune", f"data.root={data}", f"data.products={products}", f"data.image_size={image_size}",
        "tracking.enabled=false", "eval.overlays_per_task=0", f"banks.store_dir={work / 'banks'}",
        f"masks.cache_dir={work / 'mask_cache'}",
    ]


def train(overrides: list[str], work: Path) -> None:
    if (work / "metrics.json").is_file():
        return
    subprocess.run([sys.executable, "-m", "flows.cli", "run", "--out", str(work), *overrides], check=True, cwd=REPO)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def in_process(detector: Detector, images: list[bytes], duration: float, max_pixels: int) -> dict[str, Any]:
    """Images/s of decode + decide, one image at a time, for ``duration`` seconds."""
    latencies, start, i = [], time.perf_counter(), 0
    while time.perf_counter() - start < duration:
        t0 = time.perf_counter()
        detector.decide([decode_image(images[i % len(images)], max_pixels)])
        latencies.append(time.perf_counter() - t0)
        i += 1
    elapsed = time.perf_counter() - start
    return {"images": i, "seconds": elapsed, "per_s": i / elapsed, "p50_ms": 1000 * percentile(latencies, 50)}


def load_test(url: str, images: list[bytes], clients: int, duration: float) -> dict[str, Any]:
    """``clients`` threads POSTing raw image bytes in a loop for ``duration`` seconds."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration

    def client(k: int) -> None:
        with httpx.Client(timeout=60.0) as http:
            i = k
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    response = http.post(f"{url}/v1/predict", content=images[i % len(images)], headers={"Content-Type": "application/octet-stream"})
                    ok = response.status_code == 200
                    detail = f"{response.status_code}: {response.text[:80]}"
                except httpx.HTTPError as exc:
                    ok, detail = False, repr(exc)
                with lock:
                    (latencies.append(time.perf_counter() - t0) if ok else errors.append(detail))
                i += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {"clients": clients, "seconds": elapsed, "requests": len(latencies), "errors": len(errors), "error_examples": errors[:3],
            "per_s": len(latencies) / elapsed, "p50_ms": 1000 * percentile(latencies, 50),
            "p95_ms": 1000 * percentile(latencies, 95), "p99_ms": 1000 * percentile(latencies, 99)}


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve-api exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "real-ad"))
    parser.add_argument("--products", default="grid,hazelnut_toy")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench_serve"))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", default=None, help="JSON results (default: WORK/bench_serve.json)")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    overrides = run_overrides(Path(args.data).resolve(), args.products, work, args.image_size)
    train(overrides, work)
    cfg = load_config(REPO / "params.yaml", overrides)
    manifest = read_dataset(Path(args.data), products=args.products.split(","))
    images = [Path(p).read_bytes() for p in manifest[manifest["split"] == "test"]["image_path"]]

    from flows.deployed import BankSource

    source = BankSource(str(work / "banks"), cfg)
    detector = source.load(source.current())
    detector.decide([decode_image(images[0], cfg.serve.max_pixels)])  # warm-up
    local = in_process(detector, images, args.duration / 2, cfg.serve.max_pixels)
    local["loadavg_1min"] = os.getloadavg()[0]

    url = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "flows.cli", "serve-api", "--bank", str(work / "banks"), *overrides,
           f"serve.port={args.port}", f"serve.max_concurrent={args.max_concurrent}", "serve.reload_poll_s=0"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(cfg.serve.token_env, None)
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, process)
        load_test(url, images[:4], 1, 2.0)  # warm-up
        rest = load_test(url, images, args.clients, args.duration)
        rest["loadavg_1min"] = os.getloadavg()[0]
    finally:
        process.terminate()
        process.wait(30)
    after = in_process(detector, images, args.duration / 2, cfg.serve.max_pixels)  # before + after: load drifts on a shared machine
    local = {"images": local["images"] + after["images"], "seconds": local["seconds"] + after["seconds"],
             "p50_ms": (local["p50_ms"] + after["p50_ms"]) / 2, "loadavg_1min": (local["loadavg_1min"] + os.getloadavg()[0]) / 2}
    local["per_s"] = local["images"] / local["seconds"]
    load = os.getloadavg()
    result = {"products": args.products, "image_size": args.image_size, "n_images": len(images), "torch_threads": torch.get_num_threads(),
              "max_concurrent": args.max_concurrent, "in_process": local, "rest": rest, "ratio": rest["per_s"] / local["per_s"],
              "loadavg": load, "cpus": os.cpu_count()}
    out = Path(args.out) if args.out else work / "bench_serve.json"
    out.write_text(json.dumps(result, indent=2))
    print("| path | clients | duration s | throughput img/s | p50 ms | p95 ms | p99 ms | errors |\n|---|---|---|---|---|---|---|---|")
    print(f"| in-process decode+decide | 1 | {local['seconds']:.1f} | {local['per_s']:.2f} | {local['p50_ms']:.0f} | – | – | 0 |")
    print(f"| REST POST /v1/predict | {args.clients} | {rest['seconds']:.1f} | {rest['per_s']:.2f} | {rest['p50_ms']:.0f} | {rest['p95_ms']:.0f} | {rest['p99_ms']:.0f} | {rest['errors']} |")
    print(f"\nREST / in-process throughput: {result['ratio']:.2f}; load average {load[0]:.1f} on {os.cpu_count()} CPUs; results: {out}")


if __name__ == "__main__":
    main()

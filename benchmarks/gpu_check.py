"""GPU check: the demo sequence (params.yaml + ``data.synth``) on CUDA with per-stage times.

Runs the pipeline's building blocks one by one (validate, masks, then train / evaluate / version per
step) with ``backbone.device=auto`` and reports the CUDA stack (torch's CUDA version, cuDNN, the GPU)
and the seconds of every stage, CUDA-synchronised. For a GPU node or the worker image; tests never
need it. Exits 2 when no GPU is visible (``--allow-cpu`` runs anyway, for comparison).

    .venv/bin/python -m benchmarks.gpu_check [--out runs/gpu_check] [--allow-cpu] [key=value ...]

Reads the test split's labels (the synthetic demo sequence's final image AUROC): a smoke figure only; not
used to choose defaults (issue 33: defaults come from the validation protocol,
``benchmarks/validation_levers.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[1]


def cuda_stack() -> dict[str, Any]:
    """What torch sees: its CUDA build, cuDNN, the devices."""
    info: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def timed(stages: list[dict[str, Any]], name: str, fn: Callable[[], T]) -> T:
    """Run ``fn``, synchronise CUDA, append ``{stage, seconds}`` to ``stages``."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stages.append({"stage": name, "seconds": round(time.perf_counter() - started, 3)})
    print(f"{name:40s} {stages[-1]['seconds']:8.2f} s", flush=True)
    return result


def run(out: Path, overrides: list[str]) -> dict[str, Any]:
    from components.backbones.common import resolve_device
    from components.config import load_config
    from components.data.protocol import ordered_products, task_name, task_of_product, task_sequence
    from components.methods.loading import load_backbone
    from components.methods.registry import uses_structure_masks
    from flows import pipeline
    from flows.demo import demo_config, ensure_synthetic_data

    cfg = demo_config(load_config(REPO_ROOT / "params.yaml", ["tracking.enabled=false", *overrides]), out)
    device = str(resolve_device(cfg.backbone.device))
    print(f"backbone {cfg.backbone.name} on {device}; method {cfg.method}; {cuda_stack()}", flush=True)
    stages: list[dict[str, Any]] = []
    timed(stages, "synthetic data", lambda: ensure_synthetic_data(cfg, Path(cfg.data.root)))
    manifest = timed(stages, "validate", lambda: pipeline.validate_dataset.fn(Path(cfg.data.root)))
    products = ordered_products(manifest, cfg)
    tasks = task_sequence(products, cfg.protocol.base_tasks, cfg.protocol.step_tasks)
    if uses_structure_masks(cfg):
        timed(stages, "masks", lambda: pipeline.cache_masks.fn(cfg, manifest, products))
    timed(stages, "backbone load", lambda: load_backbone(cfg))
    method_dir: Path | None = None
    for index, step in enumerate(tasks):
        name = task_name(step)
        target = out / "gpu_check_steps" / f"{index:02d}-{name}" / "method"
        method_dir = timed(stages, f"train {name}", lambda: pipeline.train_task.fn(cfg, method_dir, name, step, manifest, target))
        metrics = timed(stages, f"evaluate after {name}", lambda: pipeline.evaluate_all_tasks.fn(cfg, method_dir, manifest, task_of_product(tasks[: index + 1])))
        timed(stages, f"version {name}", lambda: pipeline.version_memory_bank.fn(cfg, method_dir, {"step": index, "task": name}))
    average = sum(m["image_auroc"] for m in metrics.values()) / len(metrics)
    return {"device": device, "cuda": cuda_stack(), "stages": stages, "total_seconds": round(sum(s["seconds"] for s in stages), 3),
            "final_average_image_auroc": average, "peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu_check", help="work directory (data, banks, mask cache, gpu_check.json)")
    parser.add_argument("--allow-cpu", action="store_true", help="run even without a GPU")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(f"gpu_check: no CUDA device visible to torch {torch.__version__} (CUDA build {torch.version.cuda}); use --allow-cpu to run on the CPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    result = run(out, args.overrides)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(f"total {result['total_seconds']:.1f} s on {result['device']}; final average image AUROC {result['final_average_image_auroc']:.3f}; {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

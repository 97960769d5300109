"""UCAD cost as the number of stored tasks grows, on CPU with EfficientNet-Lite0.

Run: ``.venv/bin/python -m benchmarks.bench_methods [--data DIR] [--out FILE]``.

What is measured (printed as a markdown table):
- training seconds per real task (keys + structure-contrastive prompt + knowledge, config epochs);
- for 1, 5, 15, 50 stored tasks: inference images/s of ``UCAD.predict`` (routing + prompted scoring
  + maps), routing compute alone (distances to every stored key, backbone excluded), the number of
  backbone calls per predict (one un-prompted pass routes against ALL stored tasks), the routing
  accuracy of the real test images, and state bytes per task (keys + knowledge + prompt).

How the extra tasks are made (stated again in the printout): the first tasks are real products
(``--data`` in MVTec layout, else freshly generated synthetic products) trained with the full
method. Tasks beyond those are *augmented copies* of the real products' training images (flips,
90-degree rotations, brightness/contrast jitter, seeded per task) fitted with ``UCAD.fit_task``
WITHOUT label maps, i.e. with the training-free prompt, so their keys and knowledge are real
backbone features of realistic images while their training is cheap. Keys/knowledge have the
configured sizes, so routing and memory costs are those of genuinely trained tasks.

Reads the test split's images with their labels and masks (loaded by ``test_batch``; only the product
enters the routing accuracy): reporting only; not used to choose defaults (issue 33: defaults come from
the validation protocol, ``benchmarks/validation_levers.py``).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from components.backbones.registry import build_backbone
from components.config import Config, load_config
from components.data.loading import task_data, task_image_paths, test_batch
from components.data.manifest import read_dataset
from components.data.protocol import ordered_products
from components.data.synth import generate_products
from components.methods.ucad import UCAD
from components.segment.cache import label_maps_for
from components.types import ImageBatch, TaskData

log = logging.getLogger("bench_methods")


def count_calls(backbone: torch.nn.Module) -> dict[str, int]:
    """Wrap the backbone's ``key_features``/``features`` to count calls and images; returns the live counters."""
    counters = {"key_features": 0, "features": 0, "key_images": 0, "feature_images": 0}

    def wrap(name: str, images_key: str) -> None:
        original: Callable[..., torch.Tensor] = getattr(backbone, name)

        def counted(images: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            counters[name] += 1
            counters[images_key] += int(images.shape[0])
            return original(images, *args, **kwargs)

        object.__setattr__(backbone, name, counted)

    wrap("key_features", "key_images")
    wrap("features", "feature_images")
    return counters


def augmented_task(source: TaskData, index: int, n_images: int) -> TaskData:
    """Task ``aug-<index>``: seeded flips/rotations/intensity jitter of ``n_images`` source training images (no label maps)."""
    generator = torch.Generator().manual_seed(10_000 + index)
    pick = torch.randperm(len(source.train), generator=generator)[:n_images]
    images = source.train.images[pick].clone()
    images = torch.rot90(images, k=index % 4, dims=(2, 3))
    if index % 2:
        images = images.flip(3)
    contrast = 0.7 + 0.6 * torch.rand(1, generator=generator)
    brightness = 0.6 * (torch.rand(1, generator=generator) - 0.5)
    images = images * contrast + brightness
    name = f"aug-{index}"
    batch = ImageBatch(images=images, products=[name] * len(images), paths=[f"{name}/{i}" for i in range(len(images))])
    empty = ImageBatch(images=images[:0], products=[], paths=[])
    return TaskData(name=name, products=[name], train=batch, heldout=empty)


def state_bytes(method: UCAD) -> dict[str, int]:
    """Bytes of keys, knowledge and prompts over all stored tasks."""
    out = {"key": 0, "knowledge": 0, "prompt": 0}
    for name, tensor in method.state_tensors().items():
        out[name.split("/")[0]] += tensor.numel() * tensor.element_size()
    return out


def prepare_data(args: argparse.Namespace, cfg: Config, workdir: Path) -> tuple[list[TaskData], list[ImageBatch]]:
    """Real tasks (with label maps) and a test batch per real product."""
    root = Path(args.data) if args.data else workdir / "synth"
    if not args.data:
        cfg.data.synth.train_per_product = args.train_images
        generate_products(root, args.real_tasks, seed=0, cfg=cfg.data.synth)
    manifest = read_dataset(root, products=args.products or None)
    products = ordered_products(manifest, cfg)[: args.real_tasks]
    tasks, tests = [], []
    for product in products:
        paths = task_image_paths(manifest, [product], cfg)
        maps = label_maps_for(paths, [product] * len(paths), cfg.masks, workdir / "masks", cfg.data.image_size)
        data = task_data(manifest, product, [product], cfg, maps)
        if len(data.train) > args.train_images:
            keep = slice(0, args.train_images)
            data.train = ImageBatch(data.train.images[keep], data.train.products[keep], data.train.paths[keep])
            data.label_maps = data.label_maps[keep]
        tasks.append(data)
        batch = test_batch(manifest, product, cfg.data.image_size)
        tests.append(ImageBatch(batch.images[: args.test_images], batch.products[: args.test_images], batch.paths[: args.test_images]))
    return tasks, tests


def measure(method: UCAD, counters: dict[str, int], test: ImageBatch, repeats: int) -> dict[str, float | str]:
    """Inference and routing cost of ``method`` with its current number of tasks."""
    for key in counters:
        counters[key] = 0
    started = time.perf_counter()
    for _ in range(repeats):
        pred = method.predict(test.images)
    predict_s = (time.perf_counter() - started) / repeats
    calls = {k: v / repeats for k, v in counters.items()}
    key_feats = torch.cat([method.backbone.key_features(test.images[i : i + 8]) for i in range(0, len(test), 8)])
    router = method.router()
    router.route(key_feats)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        router.route(key_feats)
    routing_s = (time.perf_counter() - started) / repeats
    correct = sum(r == p for r, p in zip(pred.routed_tasks, test.products, strict=True))
    sizes = state_bytes(method)
    return {
        "images_per_s": len(test) / predict_s,
        "routing_ms_per_image": 1000 * routing_s / len(test),
        "key_calls": calls["key_features"],
        "feature_calls": calls["features"],
        "key_passes_per_image": calls["key_images"] / len(test),
        "prompted_passes_per_image": calls["feature_images"] / len(test),
        "routing_accuracy": correct / len(test),
        "key_rows": f"{min(len(k) for k in method.keys)}-{max(len(k) for k in method.keys)}",
        "knowledge_rows": f"{min(len(k) for k in method.knowledge)}-{max(len(k) for k in method.knowledge)}",
        "bytes_per_task": sum(sizes.values()) / len(method.tasks),
        **{f"{k}_bytes_per_task": v / len(method.tasks) for k, v in sizes.items()},
    }


def markdown(rows: list[dict[str, float | str]], train_seconds: list[tuple[str, float]], header: str) -> str:
    lines = [header, "", "| task | training s |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in train_seconds]
    lines += [
        "",
        "| stored tasks | predict img/s | routing ms/img (distances only) | un-prompted passes/img | prompted passes/img | backbone calls (key, prompted) | reference routing passes/img | routing acc. (real test imgs) | key rows/task | knowledge rows/task | bytes/task (key + knowledge + prompt) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {int(r['tasks'])} | {r['images_per_s']:.2f} | {r['routing_ms_per_image']:.3f} | {r['key_passes_per_image']:.0f} | "
            f"{r['prompted_passes_per_image']:.0f} | {r['key_calls']:.0f}, {r['feature_calls']:.0f} | {int(r['tasks'])} | {r['routing_accuracy']:.3f} | {r['key_rows']} | {r['knowledge_rows']} | "
            f"{r['bytes_per_task'] / 1024:.0f} KiB ({r['key_bytes_per_task'] / 1024:.0f} + {r['knowledge_bytes_per_task'] / 1024:.0f} + {r['prompt_bytes_per_task'] / 1024:.0f}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default=None, help="MVTec-layout root of the real tasks (default: generate synthetic products)")
    parser.add_argument("--products", default=None, type=lambda s: s.split(","), help="comma-separated products of --data")
    parser.add_argument("--real-tasks", type=int, default=2, help="real products trained with the full method")
    parser.add_argument("--train-images", type=int, default=24, help="max training images per real task")
    parser.add_argument("--test-images", type=int, default=16, help="test images per real product")
    parser.add_argument("--aug-images", type=int, default=4, help="images per augmented extra task")
    parser.add_argument("--tasks", default="1,5,15,50", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.params, ["backbone.device=cpu", "method=ucad", *args.overrides])
    backbone = build_backbone(cfg.backbone, cfg.data.image_size)
    method = UCAD(cfg, backbone)
    counters = count_calls(backbone)
    with tempfile.TemporaryDirectory(prefix="bench_methods_") as tmp:
        real_tasks, tests = prepare_data(args, cfg, Path(tmp))
    test = ImageBatch(torch.cat([b.images for b in tests]), [p for b in tests for p in b.products], [p for b in tests for p in b.paths])
    train_seconds, rows = [], []
    targets = sorted(set(args.tasks))
    for i in range(max(targets)):
        data = real_tasks[i] if i < len(real_tasks) else augmented_task(real_tasks[i % len(real_tasks)], i, args.aug_images)
        fit_log = method.fit_task(data)
        if i < len(real_tasks):
            train_seconds.append((data.name, float(fit_log["seconds"])))
        if len(method.tasks) in targets:
            row = {"tasks": len(method.tasks), **measure(method, counters, test, args.repeats)}
            log.info("%d tasks: %s", len(method.tasks), row)
            rows.append(row)
    header = (
        f"## UCAD cost vs stored tasks (CPU, {torch.get_num_threads()} threads, {cfg.backbone.name}, {cfg.data.image_size} px, "
        f"key {cfg.ucad.key_size}, knowledge {cfg.ucad.knowledge_size}, {cfg.ucad.epochs} epochs, {len(test)} test images)\n\n"
        f"Tasks 1..{len(real_tasks)} are real products ({', '.join(t.name for t in real_tasks)}; {'from ' + args.data if args.data else 'freshly generated synthetic products'}) "
        f"trained with the full method. Tasks beyond are augmented copies (flip/rot90/intensity jitter, {args.aug_images} images each) "
        "fitted without label maps (training-free prompt): real backbone features, key/knowledge capped at the configured "
        "sizes (actual rows per task in the table), so routing and memory costs are those of trained tasks. Routing accuracy counts the real test images routed to their own product "
        "(augmented copies of a product can legitimately attract its images). 'reference routing passes/img' is what the "
        "UCAD reference code needs (one backbone pass per stored task); this implementation needs 1 un-prompted pass."
    )
    table = markdown(rows, train_seconds, header)
    print(table)
    if args.out:
        Path(args.out).write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

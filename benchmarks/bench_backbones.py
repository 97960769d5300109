"""CPU images per second of every prompted backbone: features (plain, prompted, with gradient) and keys.

EfficientNet-Lite0 runs with its real packaged ImageNet weights. A ViT runs with its cached timm
weights when present, otherwise with random weights (speed does not depend on the values; the
table says which). Timings are medians over repeats after one warm-up batch.

    .venv/bin/python -m benchmarks.bench_backbones [--backbones efficientnet_lite0,vit_base_patch16_224]
        [--image-size 224] [--batch-size 8] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from components.backbones.base import PromptedBackbone
from components.backbones.registry import build_backbone
from components.config import BackboneConfig
from components.errors import WeightsError


def _perturbed_prompt(backbone: PromptedBackbone) -> torch.nn.Module:
    """A prompt moved off its identity initialisation, so every prompted path does real work."""
    prompt = backbone.new_prompt()
    with torch.no_grad():
        for param in prompt.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return prompt


def images_per_second(run: Callable[[], object], batch: int, repeats: int) -> float:
    """Median throughput of ``run`` (one batch per call) after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def load(name: str, image_size: int) -> tuple[PromptedBackbone, str]:
    """The backbone on CPU and a word on its weights (real, or random when none are cached)."""
    try:
        return build_backbone(BackboneConfig(name=name, device="cpu"), image_size), "real"
    except WeightsError:
        return build_backbone(BackboneConfig(name=name, device="cpu", pretrained=False), image_size), "random"


def bench_backbone(name: str, image_size: int, batch: int, repeats: int) -> dict[str, object]:
    """One table row: shapes, prompt size and throughputs of ``name``."""
    backbone, weights = load(name, image_size)
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    prompt = _perturbed_prompt(backbone)

    def plain() -> object:
        with torch.inference_mode():
            return backbone.features(images)

    def prompted() -> object:
        with torch.inference_mode():
            return backbone.features(images, prompt)

    def prompted_train_step() -> object:
        prompt.zero_grad(set_to_none=True)
        backbone.features(images, prompt).pow(2).mean().backward()
        return None

    def keys() -> object:
        with torch.inference_mode():
            return backbone.key_features(images)

    with torch.inference_mode():
        key_shape = tuple(backbone.key_features(images[:1]).shape[1:])
    return {
        "backbone": name,
        "weights": weights,
        "features": f"{backbone.grid_size(image_size)} x {backbone.feature_dim}",
        "keys": f"{key_shape[0]} x {key_shape[1]}",
        "prompt params": sum(p.numel() for p in prompt.parameters()),
        "features img/s": images_per_second(plain, batch, repeats),
        "prompted img/s": images_per_second(prompted, batch, repeats),
        "fwd+bwd img/s": images_per_second(prompted_train_step, batch, repeats),
        "keys img/s": images_per_second(keys, batch, repeats),
    }


def format_table(rows: list[dict[str, object]]) -> str:
    """Plain-text table, one row per backbone."""
    headers = list(rows[0])
    cells = [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="efficientnet_lite0,vit_base_patch16_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [bench_backbone(n.strip(), args.image_size, args.batch_size, args.repeats) for n in args.backbones.split(",") if n.strip()]
    print(f"CPU backbone throughput, {args.image_size} px, batch {args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

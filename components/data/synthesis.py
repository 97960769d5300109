"""``contad data synth``: RGB products (``components.data.synth``) or RGB + xyz ones (``components.data.synth_depth``)."""

from __future__ import annotations

from pathlib import Path

from components.config import Config
from components.data.synth import generate_products
from components.data.synth_depth import generate_depth_products


def synth_command(cfg: Config, out: Path, products: int | None, seed: int | None) -> int:
    """CLI entry: generate products (defaults from ``cfg.data.synth``) and print a summary."""
    synth_cfg = cfg.data.synth
    n_products = synth_cfg.products if products is None else products
    use_seed = synth_cfg.seed if seed is None else seed
    if synth_cfg.depth:
        names = generate_depth_products(Path(out), n_products, use_seed, synth_cfg)
    else:
        names = generate_products(Path(out), n_products, use_seed, synth_cfg)
    print(f"wrote {len(names)} synthetic {'RGB + xyz ' if synth_cfg.depth else ''}products to {out}: {', '.join(names)}")
    return 0

"""The catalogue of synthetic product designs: renderer, palette, defect types, description."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from components.data.synthetic import objects, textures
from components.data.synthetic.scene import Scene, Style

Renderer = Callable[[np.random.Generator, int, Style], Scene]


@dataclass(frozen=True)
class Design:
    """One kind of product. ``kind`` is ``texture`` (whole-image surface) or ``object`` (part on a belt)."""

    name: str
    kind: str
    render: Renderer
    style: Style
    defects: tuple[str, ...]
    description: str


DESIGNS: tuple[Design, ...] = (
    Design("woven_fabric", "texture", textures.woven, Style(((0.86, 0.78, 0.62), (0.74, 0.66, 0.52), (0.25, 0.22, 0.18))),
           ("hole", "stain", "thread", "cut"), "beige plain-weave textile"),
    Design("washer", "object", objects.washer, Style(((0.80, 0.82, 0.85), (0.16, 0.17, 0.19))),
           ("scratch", "missing_part", "stain", "contamination"), "steel flat washer on a dark belt"),
    Design("wood_panel", "texture", textures.wood, Style(((0.78, 0.58, 0.36), (0.45, 0.27, 0.12))),
           ("crack", "stain", "hole", "scratch"), "plain-sawn wood veneer"),
    Design("screw", "object", objects.screw, Style(((0.72, 0.74, 0.76), (0.20, 0.24, 0.30))),
           ("scratch", "missing_part", "contamination", "crack"), "machine screw lying at any angle"),
    Design("bottle_cap", "object", objects.bottle_cap, Style(((0.10, 0.45, 0.75), (0.95, 0.95, 0.92), (0.12, 0.12, 0.12))),
           ("colour", "scratch", "missing_part", "dent"), "blue crown cap with a printed ring"),
    Design("metal_mesh", "texture", textures.mesh, Style(((0.78, 0.80, 0.82), (0.06, 0.06, 0.07))),
           ("bent", "broken", "contamination", "glue"), "woven steel wire mesh on a black backing"),
    Design("hex_nut", "object", objects.hex_nut, Style(((0.85, 0.78, 0.45), (0.22, 0.20, 0.22))),
           ("missing_part", "crack", "contamination", "scratch"), "zinc-yellow hex nut"),
    Design("brushed_metal", "texture", textures.brushed_metal, Style(((0.62, 0.66, 0.72),)),
           ("scratch", "dent", "stain", "contamination"), "brushed steel sheet"),
    Design("dowel_pin", "object", objects.dowel_pin, Style(((0.85, 0.65, 0.28), (0.18, 0.20, 0.20))),
           ("crack", "scratch", "extra_part", "colour"), "brass dowel pin"),
    Design("carpet", "texture", textures.carpet, Style(((0.62, 0.10, 0.12), (0.85, 0.75, 0.30), (0.80, 0.78, 0.70))),
           ("hole", "colour", "contamination", "thread"), "red tufted carpet with yellow flecks"),
)


@dataclass(frozen=True)
class ProductSpec:
    """A concrete product: a design, its (possibly varied) style and a unique name."""

    name: str
    design: Design
    style: Style
    variant: int


def product_specs(n_products: int, seed: int, designs: Sequence[Design] = DESIGNS, stream: int = 7919,
                  scale_range: tuple[float, float] = (0.8, 1.2)) -> list[ProductSpec]:
    """The first ``n_products`` products of ``designs``: every design once, then colour/scale variants
    named ``<design>_v<k>`` (drawn from the random ``stream`` of ``seed``)."""
    if n_products < 1:
        raise ValueError(f"n_products must be >= 1, got {n_products}")
    specs = []
    for index in range(n_products):
        design = designs[index % len(designs)]
        variant = index // len(designs)
        if variant == 0:
            specs.append(ProductSpec(design.name, design, design.style, 0))
            continue
        rng = np.random.default_rng([seed, stream, index])
        hue = rng.uniform(0.12, 0.88)
        style = design.style.shifted(hue=hue, value=rng.uniform(0.85, 1.1), scale=rng.uniform(*scale_range))
        specs.append(ProductSpec(f"{design.name}_v{variant + 1}", design, style, variant))
    return specs

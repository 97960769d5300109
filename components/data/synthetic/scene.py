"""What a product renderer returns, and the per-product style (palette, scale) variants apply."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, replace

import numpy as np

Colour = tuple[float, float, float]


@dataclass
class Scene:
    """One rendered normal image before lighting and sensor noise.

    image: (S, S, 3) float32 in [0, 1].
    foreground: (S, S) bool object mask; None for textures (the whole image is the product).
    backdrop: (S, S, 3) what shows where material is missing (conveyor behind an object, the
        backing behind a textile).
    material: typical colour of the product's material (for extra parts / debris).
    """

    image: np.ndarray
    foreground: np.ndarray | None
    backdrop: np.ndarray
    material: Colour


@dataclass(frozen=True)
class Style:
    """Product look: a palette (design-specific meaning of each colour) and a size/period scale."""

    colours: tuple[Colour, ...]
    scale: float = 1.0

    def shifted(self, hue: float, value: float, scale: float) -> "Style":
        """A variant: every colour hue-rotated by ``hue`` (turns) and brightness-scaled by ``value``."""
        out = []
        for r, g, b in self.colours:
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            rr, gg, bb = colorsys.hsv_to_rgb((h + hue) % 1.0, min(1.0, s * 1.1 + 0.05), min(1.0, v * value))
            out.append((rr, gg, bb))
        return replace(self, colours=tuple(out), scale=self.scale * scale)

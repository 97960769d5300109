"""Shared helpers of the segment tests: generated images and a call-counting provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from components.segment.provider import MaskProvider


def object_image(size: int = 160, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy dark textured background with a bright ellipse; returns (image, object mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size * (0.45 + 0.1 * rng.random()), size * (0.45 + 0.1 * rng.random())
    mask = ((yy - cy) / (size * 0.28)) ** 2 + ((xx - cx) / (size * 0.22)) ** 2 <= 1.0
    image = np.empty((size, size, 3), dtype=np.float64)
    image[:] = [50, 60, 70]
    image[mask] = [200, 170, 90]
    image += 6 * np.sin(xx / 5.0)[:, :, None]  # background/object texture
    image += rng.normal(0, 6, image.shape)
    return image.clip(0, 255).astype(np.uint8), mask


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


class CountingProvider(MaskProvider):
    """Wraps a provider and counts ``label_map`` calls; can raise on a given call."""

    def __init__(self, inner: MaskProvider, interrupt_on_call: int | None = None) -> None:
        super().__init__(inner.cfg)
        self.inner = inner
        self.name = inner.name
        self.calls = 0
        self.interrupt_on_call = interrupt_on_call

    def label_map(self, image: np.ndarray, product: str) -> np.ndarray:
        self.calls += 1
        if self.interrupt_on_call is not None and self.calls == self.interrupt_on_call:
            raise KeyboardInterrupt
        return self.inner.label_map(image, product)

    def _segment(self, image: np.ndarray, product: str) -> np.ndarray:
        return self.inner._segment(image, product)

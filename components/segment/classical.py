"""Classical CPU segmenters (scikit-image): the fast, deterministic offline default."""

from __future__ import annotations

import numpy as np
from skimage.segmentation import felzenszwalb, slic

from components.segment.provider import MaskProvider


class FelzenszwalbProvider(MaskProvider):
    """Felzenszwalb-Huttenlocher graph segmentation; every pixel gets a segment."""

    name = "felzenszwalb"

    def _segment(self, image: np.ndarray, product: str) -> np.ndarray:
        knobs = self.cfg.felzenszwalb
        segments = felzenszwalb(image, scale=knobs.scale, sigma=knobs.sigma, min_size=knobs.min_size, channel_axis=-1)
        return segments + 1


class SLICProvider(MaskProvider):
    """SLIC superpixels (k-means in Lab + position); every pixel gets a segment."""

    name = "slic"

    def _segment(self, image: np.ndarray, product: str) -> np.ndarray:
        knobs = self.cfg.slic
        return slic(
            image,
            n_segments=knobs.n_segments,
            compactness=knobs.compactness,
            sigma=knobs.sigma,
            start_label=1,
            channel_axis=-1,
        )

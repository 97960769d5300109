"""Operator overlays say what was decided: a red NG / green OK banner with score and threshold."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from components.eval.figures import heatmap_overlay_png


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_banner_colour_follows_the_decision_and_the_image_keeps_its_size() -> None:
    rgb = np.full((40, 40, 3), 90, dtype=np.uint8)
    amap = np.zeros((20, 20), dtype=np.float32)
    plain = _pixels(heatmap_overlay_png(rgb, amap, 1.0, size=128))
    ng = _pixels(heatmap_overlay_png(rgb, amap, 1.0, size=128, decision=("NG", 1.5, 1.2, "pcb")))
    ok = _pixels(heatmap_overlay_png(rgb, amap, 1.0, size=128, decision=("OK", 0.9, 1.2, "pcb")))
    assert plain.shape == ng.shape == ok.shape == (128, 128, 3)
    corner = (2, 126)  # inside the banner, right of the text
    assert tuple(ng[corner]) == (200, 30, 30) and tuple(ok[corner]) == (30, 140, 60)
    assert np.array_equal(ng[64:], plain[64:])  # below the banner the overlay is unchanged
    assert (ng[:12] > 180).all(axis=2).any(), "the banner carries (light) text"

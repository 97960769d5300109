"""``data.tile: auto``: tile high-resolution products at the backbone's input size.

A run has one input size (``data.image_size``: every product's images, maps and metrics use it).
With ``data.tile = auto`` a run of a method on the shared frozen backbone (UCAD, MTRMB, the PatchCore
family: methods declaring ``tiles_inputs``) whose products include a high-resolution one (median native short side of its training
images >= ``TILE_FACTOR`` x ``data.image_size``) is encoded at ``TILE_FACTOR`` x the input size in
tiles of ``data.image_size`` px (``TILE_FACTOR``² x the backbone cost), so defects a few pixels wide
survive the resize; otherwise it is one pass at ``data.image_size``. The decision is taken once per
run from the manifest, before training, and the resolved values are what the run records
(fingerprint, MLflow params, registered config). Methods with their own extractor (IUF, IB-IUMAD,
LeMO) keep one pass. Where no data is known (e.g. serving from a bank
with an unresolved config) ``auto`` means one pass: pass the run's recorded configuration instead.
"""

from __future__ import annotations

import logging
from statistics import median

import pandas as pd
from PIL import Image

from components.config import Config, DataConfig
from components.errors import DataError

log = logging.getLogger(__name__)

TILE_FACTOR = 2  # tiles per side when auto-tiling: 4 backbone passes per image
SIZE_SAMPLE = 50  # training images per product whose headers are read


def effective_tile(data: DataConfig) -> int | None:
    """The tile size in px a run of ``data`` uses (``auto`` not resolved against data = one pass)."""
    return data.tile if isinstance(data.tile, int) else None


def native_short_sides(manifest: pd.DataFrame, products: list[str]) -> dict[str, float]:
    """Per product: median native short side (px) of up to ``SIZE_SAMPLE`` training images (headers only)."""
    sides = {}
    for product in products:
        paths = sorted(manifest.loc[(manifest["product"] == product) & (manifest["split"] == "train"), "image_path"].astype(str))
        if not paths:
            continue
        step = max(1, len(paths) // SIZE_SAMPLE)
        shorts = []
        for path in paths[::step][:SIZE_SAMPLE]:
            try:
                with Image.open(path) as image:
                    shorts.append(min(image.size))
            except OSError as exc:
                raise DataError(f"{path}: cannot read the image size ({exc})") from exc
        sides[product] = float(median(shorts))
    return sides


def auto_tiling(image_size: int, short_sides: dict[str, float]) -> tuple[int, int | None]:
    """(image_size, tile) for ``data.tile = auto``: tiles of ``image_size`` at ``TILE_FACTOR`` x it when
    some product's native short side is at least that large, else one pass at ``image_size``."""
    if short_sides and max(short_sides.values()) >= TILE_FACTOR * image_size:
        return TILE_FACTOR * image_size, image_size
    return image_size, None


def resolve_tiling(cfg: Config, manifest: pd.DataFrame, products: list[str]) -> Config:
    """``cfg`` with ``data.tile = auto`` replaced by the concrete (image_size, tile) for this run's data."""
    if cfg.data.tile != "auto":
        return cfg
    image_size, tile = cfg.data.image_size, None
    from components.methods.registry import method_class  # the method's ``tiles_inputs`` capability

    if method_class(cfg.method).tiles_inputs:
        sides = native_short_sides(manifest, products)
        image_size, tile = auto_tiling(cfg.data.image_size, sides)
        log.info("data.tile=auto: native short sides %s px -> data.image_size=%d, data.tile=%s",
                 {p: round(s) for p, s in sides.items()}, image_size, tile)
    resolved = cfg.model_copy(deep=True)
    resolved.data.image_size = image_size
    resolved.data.tile = tile
    return resolved

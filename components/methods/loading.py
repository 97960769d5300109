"""A ``cfg.method`` instance on ``cfg``'s frozen backbone, fresh or restored from a saved method directory.

The backbone is built once per process and configuration (tiled when ``data.tile`` < image size).
"""

from __future__ import annotations

import functools
from pathlib import Path

from components.artifact import deployed_config, read_detector_config
from components.backbones.base import PromptedBackbone
from components.backbones.registry import build_backbone
from components.backbones.tiled import tiled_backbone
from components.config import BackboneConfig, Config
from components.data.tiling import effective_tile
from components.methods.base import ContinualMethod
from components.methods.registry import build_method


@functools.lru_cache(maxsize=2)
def _cached_backbone(backbone_json: str, image_size: int) -> PromptedBackbone:
    return build_backbone(BackboneConfig.model_validate_json(backbone_json), image_size)


@functools.lru_cache(maxsize=2)
def _cached_tiled_backbone(backbone_json: str, image_size: int, tile: int, overlap: int) -> PromptedBackbone:
    return tiled_backbone(_cached_backbone(backbone_json, tile), image_size, tile, overlap)


def load_backbone(cfg: Config) -> PromptedBackbone:
    """The frozen backbone of ``cfg`` (built once per process and configuration; tiled when ``data.tile`` < image size)."""
    tile = effective_tile(cfg.data)
    if tile is not None and tile < cfg.data.image_size:
        return _cached_tiled_backbone(cfg.backbone.model_dump_json(), cfg.data.image_size, tile, cfg.data.tile_overlap)
    return _cached_backbone(cfg.backbone.model_dump_json(), cfg.data.image_size)


def stored_config(cfg: Config, method_dir: Path) -> Config:
    """The configuration ``method_dir``'s state was trained with (``detector.json``) with ``cfg``'s deploy-time
    settings: every evaluation scores what the deployed detector scores; ``cfg`` for a state saved without one."""
    stored = read_detector_config(Path(method_dir))
    return deployed_config(stored, cfg, str(method_dir)) if stored is not None else cfg


def load_method(cfg: Config, method_dir: Path | None) -> ContinualMethod:
    """A ``cfg.method`` instance, restored from ``method_dir`` when given."""
    method = build_method(cfg, load_backbone(cfg))
    if method_dir is not None:
        method.load(method_dir)
    return method

"""The structure label maps a task trains on, as a pipeline step, the validation protocol and the timing benchmark
all make them: the run's provider (``structure_masks``: the method's own choice or ``masks.provider``), through the
mask cache, at the run's input size."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from components.config import Config
from components.data.loading import task_image_paths
from components.methods.registry import uses_structure_masks
from components.segment.cache import label_maps_for
from components.segment.fallback import structure_masks


def task_label_maps(cfg: Config, manifest: pd.DataFrame, products: list[str]) -> torch.Tensor | None:
    """Label maps of a task's train + held-out images (the order of ``task_image_paths``) from the mask cache
    ``masks.cache_dir``, at ``data.image_size``; None when the method trains on none."""
    if not uses_structure_masks(cfg):
        return None
    paths = task_image_paths(manifest, products, cfg)
    path_product = dict(zip(manifest["image_path"].astype(str), manifest["product"].astype(str)))
    return label_maps_for(paths, [path_product[p] for p in paths], structure_masks(cfg).config, Path(cfg.masks.cache_dir), cfg.data.image_size)

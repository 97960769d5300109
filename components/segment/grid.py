"""Label maps on a feature grid: mode pooling that never interpolates label ids."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def downsample_label_map(label_maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Downsample integer label maps (B, H, W) to ``grid`` (h, w) by per-cell mode.

    Each output cell takes the most frequent label id among the input pixels that fall in it
    (ties go to the smallest id). Ids are never averaged or interpolated.
    """
    if label_maps.ndim != 3:
        raise ValueError(f"label_maps must be (B, H, W), got shape {tuple(label_maps.shape)}")
    b, h, w = label_maps.shape
    gh, gw = grid
    labels = label_maps.long()
    if (h, w) == (gh, gw):
        return labels.clone()
    # Map every pixel to its grid cell (nearest-style partition, works for non-divisible sizes).
    rows = torch.div(torch.arange(h) * gh, h, rounding_mode="floor")
    cols = torch.div(torch.arange(w) * gw, w, rounding_mode="floor")
    cell = (rows[:, None] * gw + cols[None, :]).reshape(-1)  # (H*W,)
    uniq, inverse = torch.unique(labels, return_inverse=True)
    n_ids = len(uniq)
    counts = torch.zeros(b, gh * gw * n_ids, dtype=torch.int32)
    flat = inverse.reshape(b, -1)
    index = cell[None, :].expand(b, -1) * n_ids + flat  # (B, H*W) into (gh*gw*n_ids)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.int32))
    mode = counts.reshape(b, gh * gw, n_ids).argmax(dim=2)  # argmax returns first max -> smallest id
    return uniq[mode].reshape(b, gh, gw)


def nearest_resize_label_map(label_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize integer label maps (B, H, W) to ``size`` with nearest-neighbour sampling."""
    out = F.interpolate(label_maps[:, None].float(), size=size, mode="nearest-exact")
    return out[:, 0].round().long()

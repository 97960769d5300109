"""Task routing: send each test image to the task whose key set is nearest to its patches.

An image's distance to task ``t`` is the sum, over the image's patches, of the Euclidean distance
from the patch to its nearest key of ``t``. All tasks' keys are stacked into one matrix once, so
routing costs one distance computation against every stored key plus a per-task segment minimum;
it needs only the single un-prompted backbone pass that produced ``key_feats``.
"""

from __future__ import annotations

import torch

# Largest (patches x keys) distance block computed at once (float32 elements).
_MAX_BLOCK = 1 << 24


class KeyRouter:
    """All tasks' keys stacked once; routes images by summed nearest-key distance."""

    def __init__(self, keys: list[torch.Tensor]) -> None:
        if not keys:
            raise ValueError("no task keys to route between")
        dims = {int(k.shape[1]) for k in keys}
        if len(dims) != 1 or any(k.ndim != 2 or k.shape[0] == 0 for k in keys):
            raise ValueError(f"keys must be non-empty (K_t, C) tensors with one C, got {[tuple(k.shape) for k in keys]}")
        self.num_tasks = len(keys)
        self.stacked = torch.cat([k.detach().float() for k in keys]).contiguous()
        self.segment = torch.cat([torch.full((k.shape[0],), t, dtype=torch.long) for t, k in enumerate(keys)])

    def task_distances(self, key_feats: torch.Tensor) -> torch.Tensor:
        """(B, T): per image, the sum over its patches of the distance to each task's nearest key."""
        if key_feats.ndim != 3 or key_feats.shape[2] != self.stacked.shape[1]:
            raise ValueError(f"key_feats must be (B, N, {self.stacked.shape[1]}), got shape {tuple(key_feats.shape)}")
        b, n, c = key_feats.shape
        patches = key_feats.detach().float().reshape(b * n, c)
        per_patch = torch.empty(b * n, self.num_tasks)
        rows = max(1, _MAX_BLOCK // self.stacked.shape[0])
        for start in range(0, b * n, rows):
            block = torch.cdist(patches[start : start + rows], self.stacked)  # (q, K_total)
            nearest = torch.full((block.shape[0], self.num_tasks), float("inf"))
            nearest.scatter_reduce_(1, self.segment.expand(block.shape[0], -1), block, reduce="amin")
            per_patch[start : start + rows] = nearest
        return per_patch.reshape(b, n, self.num_tasks).sum(dim=1)

    def route(self, key_feats: torch.Tensor) -> torch.Tensor:
        """(B,) index of the nearest task for every image."""
        return self.task_distances(key_feats).argmin(dim=1)


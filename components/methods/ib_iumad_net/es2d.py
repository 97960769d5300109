"""ES2D (efficient 2-D scan, EfficientVMamba): four atrous sub-grids, each scanned in one direction.

The (H, W) map is split into the 4 sub-grids of every second row/column (offsets (0,0), (0,1),
(1,0), (1,1)); sub-grids (0,0) and (1,1) are read row-major, (0,1) and (1,0) column-major (no
reversed scans, as in the IB-IUMAD note). ``es2d_scatter`` is the exact inverse of ``es2d_split``.
Odd sides are padded by one replicated row/column and cropped back on scatter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OFFSETS = ((0, 0), (0, 1), (1, 0), (1, 1))
COLUMN_MAJOR = (False, True, True, False)
DIRECTIONS = len(OFFSETS)


def es2d_split(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, L) sequences, L = ceil(H/2) * ceil(W/2)."""
    height, width = x.shape[-2:]
    x = F.pad(x, (0, width % 2, 0, height % 2), mode="replicate") if (height % 2 or width % 2) else x
    sequences = []
    for (dy, dx), column_major in zip(OFFSETS, COLUMN_MAJOR):
        grid = x[:, :, dy::2, dx::2]
        if column_major:
            grid = grid.transpose(2, 3)
        sequences.append(grid.flatten(2))
    return torch.stack(sequences, dim=1)


def es2d_scatter(sequences: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 4, C, L) -> (B, C, H, W): every sequence written back to its sub-grid."""
    batch, _, channels, _ = sequences.shape
    half_h, half_w = (height + 1) // 2, (width + 1) // 2
    out = sequences.new_empty(batch, channels, 2 * half_h, 2 * half_w)
    for k, ((dy, dx), column_major) in enumerate(zip(OFFSETS, COLUMN_MAJOR)):
        seq = sequences[:, k]
        grid = seq.reshape(batch, channels, half_w, half_h).transpose(2, 3) if column_major else seq.reshape(batch, channels, half_h, half_w)
        out[:, :, dy::2, dx::2] = grid
    return out[:, :, :height, :width]

"""Organised point cloud (xyz) -> a normalised 3-channel image for the frozen RGB backbone.

Per image, with invalid points (all-zero xyz) masked: height h = -(z - median z) / spread (spread = 1-99 % range / 4)
(camera looks down, so larger z = lower surface), and its vertical and horizontal finite
differences (surface slope, which shows dents and bumps at any height). Every channel is 0 at
invalid points and where a difference touches one; channels are scaled to about unit spread, the
range of ImageNet-normalised images the backbone expects.
"""

from __future__ import annotations

import torch

SLOPE_GAIN = 4.0
MIN_SPREAD = 1e-6


def valid_points(xyz: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: points whose three coordinates are not all zero and are finite."""
    return (xyz != 0).any(dim=1) & torch.isfinite(xyz).all(dim=1)


def xyz_to_image(xyz: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float32 xyz -> (B, 3, H, W) [height, d/dy height, d/dx height], per-image normalised."""
    valid = valid_points(xyz)
    z = torch.nan_to_num(xyz[:, 2].float())
    out = torch.zeros_like(xyz, dtype=torch.float32)
    for i in range(xyz.shape[0]):
        zs = z[i][valid[i]]
        if zs.numel() < 2:
            continue  # no geometry: an all-zero image
        low, median, high = torch.quantile(zs, torch.tensor([0.01, 0.5, 0.99], device=zs.device))
        spread = ((high - low) / 4).clamp_min(MIN_SPREAD)
        height = torch.where(valid[i], -(z[i] - median) / spread, torch.zeros_like(z[i]))
        slope_y = torch.zeros_like(height)
        slope_x = torch.zeros_like(height)
        both_y = valid[i, 1:, :] & valid[i, :-1, :]
        both_x = valid[i, :, 1:] & valid[i, :, :-1]
        slope_y[1:, :] = torch.where(both_y, height[1:, :] - height[:-1, :], torch.zeros_like(height[1:, :]))
        slope_x[:, 1:] = torch.where(both_x, height[:, 1:] - height[:, :-1], torch.zeros_like(height[:, 1:]))
        out[i] = torch.stack([height.clamp(-6, 6) / 2, (SLOPE_GAIN * slope_y).clamp(-3, 3), (SLOPE_GAIN * slope_x).clamp(-3, 3)])
    return out

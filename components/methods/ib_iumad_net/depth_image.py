"""Organised point cloud (xyz) -> a normalised 3-channel image for the frozen RGB backbone.

Per image, on the valid points (invalid = all-zero xyz):
1. background plane removal: a plane z = a u + b v + c over the pixel grid is fitted by least
   squares and refitted on the points within ``PLANE_MAD`` median absolute residuals (the belt /
   table, the largest flat surface), so a tilted support is flat and height = -(z - plane) is the
   height above it (the camera looks down: larger z = lower);
2. invalid points are filled by normalised convolution from their valid neighbours (sensor dropouts
   are not defects), and pixels with no valid point nearby stay 0;
3. channels [height, d/dy height, d/dx height]: height in units of its per-image spread (1-99 %
   range / 4), slopes (finite differences of the lightly smoothed height, which show dents and bumps
   at any height) times ``SLOPE_GAIN``; both clipped to about the range of ImageNet-normalised images.
"""

from __future__ import annotations

import torch

from components.methods.scoring import gaussian_blur

SLOPE_GAIN = 4.0
MIN_SPREAD = 1e-6
PLANE_MAD = 3.0  # points within this many median absolute residuals belong to the background plane
PLANE_ITERATIONS = 3
FILL_SIGMA = 1.5  # px: normalised-convolution radius that fills invalid points
SMOOTH_SIGMA = 0.7  # px: smoothing of the height before the slopes (sensor noise)
MIN_SUPPORT = 0.05  # a pixel is filled only where at least this (Gaussian-weighted) share of its neighbourhood is valid


def valid_points(xyz: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: points whose three coordinates are not all zero and are finite."""
    return (xyz != 0).any(dim=1) & torch.isfinite(xyz).all(dim=1)


def background_plane(z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(H, W) robust least-squares plane over the pixel grid fitted to the valid z of one image."""
    h, w = z.shape
    v, u = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64), torch.linspace(-1, 1, w, dtype=torch.float64), indexing="ij")
    design = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # (H, W, 3)
    z64 = z.double()
    chosen = valid
    for _ in range(PLANE_ITERATIONS):
        coef = torch.linalg.lstsq(design[chosen], z64[chosen][:, None]).solution[:, 0]
        residual = z64 - design @ coef
        spread = residual[chosen].abs().median()
        inliers = valid & (residual.abs() <= PLANE_MAD * spread + 1e-12)
        if int(inliers.sum()) < 3:
            break
        chosen = inliers
    return (design @ coef).float()


def fill_invalid(height: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W) height with invalid points filled from valid neighbours, and where a value exists at all."""
    weight = valid.float()
    blurred = gaussian_blur(torch.stack([height * weight, weight]), FILL_SIGMA)
    support = blurred[1] >= MIN_SUPPORT
    filled = torch.where(valid, height, torch.where(support, blurred[0] / blurred[1].clamp_min(1e-6), torch.zeros_like(height)))
    return filled, valid | support


def xyz_to_image(xyz: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float32 xyz -> (B, 3, H, W) [height, d/dy height, d/dx height] above the background plane."""
    valid = valid_points(xyz)
    z = torch.nan_to_num(xyz[:, 2].float())
    out = torch.zeros_like(xyz, dtype=torch.float32)
    for i in range(xyz.shape[0]):
        if int(valid[i].sum()) < 3:
            continue  # no geometry: an all-zero image
        height = torch.where(valid[i], -(z[i] - background_plane(z[i], valid[i])), torch.zeros_like(z[i]))
        low, high = torch.quantile(height[valid[i]], torch.tensor([0.01, 0.99]))
        spread = ((high - low) / 4).clamp_min(MIN_SPREAD)
        filled, known = fill_invalid(height / spread, valid[i])
        smooth = gaussian_blur(filled[None], SMOOTH_SIGMA)[0]
        slope_y = torch.zeros_like(smooth)
        slope_x = torch.zeros_like(smooth)
        slope_y[1:-1] = (smooth[2:] - smooth[:-2]) / 2
        slope_x[:, 1:-1] = (smooth[:, 2:] - smooth[:, :-2]) / 2
        channels = torch.stack([filled.clamp(-6, 6) / 2, (SLOPE_GAIN * slope_y).clamp(-3, 3), (SLOPE_GAIN * slope_x).clamp(-3, 3)])
        out[i] = torch.where(known, channels, torch.zeros_like(channels))
    return out

"""From patch features and a memory bank to image scores and anomaly maps (shared by all methods)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from components.methods.knn import NearestNeighbours

# Memory rows around the nearest neighbour used by PatchCore's image-score re-weighting.
REWEIGHT_SUPPORT = 9


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Smooth (B, H, W) maps with a separable Gaussian of ``sigma`` px (truncated at 4 sigma, reflect pad)."""
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(4.0 * sigma)))
    radius = min(radius, maps.shape[-1] - 1, maps.shape[-2] - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = maps[:, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x[:, 0]


def anomaly_maps(patch_scores: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int], sigma: float) -> torch.Tensor:
    """(B, H, W) maps: the (B, h*w) patch-score grid upsampled bilinearly to ``image_size``, then smoothed."""
    b = patch_scores.shape[0]
    grid_maps = patch_scores.reshape(b, 1, grid[0], grid[1]).float()
    upsampled = F.interpolate(grid_maps, size=image_size, mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(upsampled, sigma)


def reweighted_image_scores(features: torch.Tensor, patch_scores: torch.Tensor, nn_index: torch.Tensor, memory: NearestNeighbours, memory_rows: torch.Tensor) -> torch.Tensor:
    """PatchCore image scores: the max patch score scaled by ``1 - softmax`` weight of its neighbourhood.

    For each image, the most anomalous patch ``m_test`` has nearest memory row ``m*``; with
    ``N_b(m*)`` the ``REWEIGHT_SUPPORT`` nearest memory rows of ``m*`` (``m*`` first), the weight is
    ``1 - exp(|m_test - m*|) / sum_{m in N_b(m*)} exp(|m_test - m|)``.
    """
    best_patch = patch_scores.argmax(dim=1)  # (B,)
    rows = torch.arange(features.shape[0])
    test_patch = features[rows, best_patch]  # (B, C)
    nearest_row = nn_index[rows, best_patch]  # (B,)
    _, support = memory.search(memory_rows[nearest_row], REWEIGHT_SUPPORT)  # (B, b), m* itself first
    support_feats = memory_rows[support]  # (B, b, C)
    dists = torch.linalg.vector_norm(support_feats - test_patch[:, None], dim=2)
    weight = 1.0 - torch.softmax(dists, dim=1)[:, 0]
    return weight * patch_scores[rows, best_patch]


def top_k_mean(patch_scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """(B,) image scores: the mean of each image's ``top_k`` highest patch scores (1 = the maximum, bit-identical)."""
    if top_k < 1:
        raise ValueError(f"image score top_k must be >= 1, got {top_k}")
    if top_k == 1:
        return patch_scores.max(dim=1).values
    return patch_scores.topk(min(top_k, patch_scores.shape[1]), dim=1).values.mean(dim=1)


def score_patches(
    features: torch.Tensor,
    memory: NearestNeighbours,
    memory_rows: torch.Tensor,
    reweight: bool,
    num_neighbors: int = 1,
    top_k: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(patch_scores (B, N), image_scores (B,), nearest memory row (B, N)) of patch features (B, N, C).

    A patch score is the mean distance to the ``num_neighbors`` nearest memory rows (1 = nearest only).
    The image score is the mean of the ``top_k`` highest patch scores (1 = the maximum, the default),
    or with ``reweight`` PatchCore's re-weighted maximum (``top_k`` must then be 1).
    """
    if reweight and top_k != 1:
        raise ValueError(f"image score: PatchCore re-weighting (reweight=true) scores the maximum patch only; set the image top_k to 1, got {top_k}")
    b, n, c = features.shape
    dists, index = memory.search(features.reshape(b * n, c), max(1, num_neighbors))
    patch_scores = dists.mean(dim=1).reshape(b, n)
    nn_index = index[:, 0].reshape(b, n)
    if reweight:
        image_scores = reweighted_image_scores(features.float(), patch_scores, nn_index, memory, memory_rows)
    else:
        image_scores = top_k_mean(patch_scores, top_k)
    return patch_scores, image_scores, nn_index


def heldout_score_stats(image_scores: torch.Tensor) -> dict[str, float]:
    """Statistics of one task's held-out training-normal image scores (stored in the method state)."""
    if image_scores.numel() == 0:
        return {"count": 0}
    return {
        "count": int(image_scores.numel()),
        "mean": float(image_scores.mean()),
        "std": float(image_scores.std()) if image_scores.numel() > 1 else 0.0,
        "max": float(image_scores.max()),
    }


def normalisation_scale(stats: dict[str, float]) -> float:
    """Per-task score scale: the mean held-out normal image score (1.0 without held-out normals).

    Dividing a task's image scores and maps by it puts every product's normals near 1, so scores
    are comparable across products; it is monotone per task, so per-product AUROCs are unchanged.
    Computed from held-out TRAINING normals only, never from test data.
    """
    mean = float(stats.get("mean", 0.0)) if stats.get("count", 0) else 0.0
    return mean if mean > 0 else 1.0

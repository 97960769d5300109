"""UCAD's structure-based contrastive loss on patch features and segment label grids.

Within one image, patches of the same structure segment are positives and patches of other
segments negatives (supervised contrastive / InfoNCE over L2-normalised features). Label ids are
image-local, so pairs never cross images. Label 0 means "unassigned" and is never sampled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Logit given to excluded pairs: exp() underflows to 0 but stays finite (no NaN gradients).
_EXCLUDED = -1e9


def sample_patches(labels: torch.Tensor, per_image: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (B, P), valid (B, P)): up to ``per_image`` random labelled patches of each image.

    ``labels`` is (B, N) int64. ``P = min(per_image, N)``; ``valid`` is False where an image has
    fewer labelled patches than ``P`` (those slots point at unlabelled patches and must be ignored).
    """
    b, n = labels.shape
    p = min(per_image, n)
    noise = torch.rand(b, n, generator=generator)
    noise[labels == 0] = -1.0  # labelled patches first, in random order
    index = noise.topk(p, dim=1).indices
    valid = labels.gather(1, index) != 0
    return index, valid


def sampled_unit_patches(
    features: torch.Tensor, labels: torch.Tensor, per_image: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to ``per_image`` labelled patches per image: (z (B, M, C) L2-normalised features, their labels
    (B, M), valid (B, M) bool), all on ``features``' device; gradients flow through ``z``."""
    if features.shape[:2] != labels.shape:
        raise ValueError(f"features {tuple(features.shape)} and labels {tuple(labels.shape)} disagree on (B, N)")
    labels = labels.cpu()
    index, valid = sample_patches(labels, per_image, generator)
    picked_labels = labels.gather(1, index).to(features.device)
    valid = valid.to(features.device)
    index = index.to(features.device)
    picked = features.gather(1, index[:, :, None].expand(-1, -1, features.shape[2]))
    z = F.normalize(picked.float(), dim=2)
    return z, picked_labels, valid


def structure_contrastive_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    per_image: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean supervised-contrastive loss over anchors that have at least one positive.

    features: (B, N, C) patch features (any device; gradients flow through them).
    labels: (B, N) int64 segment id of every patch (0 = unassigned).
    Returns a scalar; 0 (still attached to the graph) when no anchor has a positive.
    """
    z, picked_labels, valid = sampled_unit_patches(features, labels, per_image, generator)
    logits = z @ z.transpose(1, 2) / temperature  # (B, P, P)
    p = logits.shape[1]
    not_self = ~torch.eye(p, dtype=torch.bool, device=features.device)[None]
    pair_valid = valid[:, :, None] & valid[:, None, :] & not_self
    positive = pair_valid & (picked_labels[:, :, None] == picked_labels[:, None, :])
    logits = logits.masked_fill(~pair_valid, _EXCLUDED)  # finite: rows without pairs stay NaN-free
    log_prob = logits - torch.logsumexp(logits, dim=2, keepdim=True)
    pos_count = positive.sum(dim=2)
    anchors = pos_count > 0
    if not bool(anchors.any()):
        return features.sum() * 0.0
    pos_log_prob = log_prob.masked_fill(~positive, 0.0).sum(dim=2)
    per_anchor = -pos_log_prob[anchors] / pos_count[anchors]
    return per_anchor.mean()

"""MTRMB's network and losses, apart from its continual logic (``components/methods/mtrmb.py``).

- ``TextImageFusion``: KPMK's cross-modal fusion of one task (paper Eqs. 3-4) on prompted patch
  tokens ``I`` (B, N, C) and frozen text tokens ``T`` (L_t, D_t):
  ``T_c = W_up W_down T`` (text projected to C through rank ``dim``: the per-task fusion stays
  small, so it takes little of the task's ``memory.budget_mb``),
  ``I' = I + W_o^I Attn(Q = LN(I) W_Q, K = T_c W_K, V = T_c W_V)``   (text-to-image),
  ``T' = T_c + W_o^T Attn(Q = LN(T_c) W_Q', K = I W_K', V = I W_V')`` (image-to-text),
  with softmax(QK^T / sqrt(d)) V (the paper drops V) and pre-norm residuals. Both output
  projections start at zero, so an untrained fusion is the identity on ``I``: MTRMB starts from
  exactly UCAD's features and only moves away as far as its losses push it. (A post-norm
  ``LN(I + ...)`` would re-scale every frozen patch feature the knowledge distances rely on.)
- ``refined_contrastive_loss``: RSCL's L_contra (Eqs. 5-6).
- ``cross_alignment_loss``: L_cross (Eq. 7) on fused patch and text features.
- ``key_pull_loss``: L_kp, the L2P pull term ``1 - cos(q(x), K_t)`` (the paper's argmin form is ill-posed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from components.methods.contrastive import sampled_unit_patches


class CrossAttention(nn.Module):
    """Multi-head attention of ``query`` tokens over ``context`` tokens; output in the query's width."""

    def __init__(self, query_dim: int, context_dim: int, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm = nn.LayerNorm(query_dim)
        self.to_q = nn.Linear(query_dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, query_dim)
        nn.init.zeros_(self.to_out.weight)  # identity residual at initialisation
        nn.init.zeros_(self.to_out.bias)

    def forward(self, query: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, Nq, Cq), context (B, Nc, Cc), mask (B, Nc) bool True = attend -> (B, Nq, Cq) update."""
        b, nq, _ = query.shape
        nc = context.shape[1]
        q = self.to_q(self.norm(query)).view(b, nq, self.heads, -1).transpose(1, 2)
        k = self.to_k(context).view(b, nc, self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(b, nc, self.heads, -1).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, h, Nq, Nc)
        if context_mask is not None:
            logits = logits.masked_fill(~context_mask[:, None, None, :], float("-inf"))
        attended = torch.softmax(logits, dim=-1) @ v  # (B, h, Nq, d/h)
        return self.to_out(attended.transpose(1, 2).reshape(b, nq, -1))


class TextImageFusion(nn.Module):
    """One task's KPMK fusion (see module docstring); its task text is stored as buffers.

    ``text`` (L_t, D_t) and ``text_mask`` (L_t,) are fixed-length (padded) token features of the
    task's sentence, so every task's fusion has the same tensor shapes (state round trips).
    """

    def __init__(self, image_dim: int, text_dim: int, text_length: int, dim: int, heads: int) -> None:
        super().__init__()
        # low-rank W_in = W_up W_down (rank ``dim``): a full (D_t x C) projection per task would take
        # ~0.25 MB of a 2 MB task budget at C = 160
        self.text_in = nn.Sequential(nn.Linear(text_dim, dim, bias=False), nn.Linear(dim, image_dim))
        self.text_to_image = CrossAttention(image_dim, image_dim, dim, heads)
        self.image_to_text = CrossAttention(image_dim, image_dim, dim, heads)
        self.register_buffer("text", torch.zeros(text_length, text_dim))
        self.register_buffer("text_mask", torch.zeros(text_length, dtype=torch.bool))

    def set_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        """Store the task's text tokens (L_t, D_t) and mask (L_t,) (at least one real token)."""
        if tokens.shape != self.text.shape or mask.shape != self.text_mask.shape:
            raise ValueError(f"text tokens {tuple(tokens.shape)} / mask {tuple(mask.shape)} do not match {tuple(self.text.shape)}")
        if not bool(mask.any()):
            raise ValueError("text mask has no real token")
        self.text.copy_(tokens)
        self.text_mask.copy_(mask)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, N, C) -> (fused image tokens I' (B, N, C), fused pooled text T' (B, C))."""
        b = image.shape[0]
        text = self.text_in(self.text.to(image.dtype))[None].expand(b, -1, -1)  # T_c (B, L_t, C)
        mask = self.text_mask[None].expand(b, -1)
        fused_image = image + self.text_to_image(image, text, mask)  # Eq. 3 (+ residual)
        fused_text = text + self.image_to_text(text, image)  # Eq. 4 (+ residual)
        weights = mask[:, :, None].to(image.dtype)
        pooled_text = (fused_text * weights).sum(dim=1) / weights.sum(dim=1)
        return fused_image, pooled_text


def refined_contrastive_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    per_image: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RSCL's L_contra (Eqs. 5-6), averaged over images, on up to ``per_image`` labelled patches each.

    Per image with sampled patches f_1..f_M: S_ij = cos(f_i, f_j) / tau, M_ij = [Y_i = Y_j] and
    L = (1 / M^2) sum_ij [ -S_ij M_ij + (1 - M_ij) exp(S_ij) ]  (unlabelled patches, id 0, excluded).
    """
    z, picked_labels, valid = sampled_unit_patches(features, labels, per_image, generator)
    similarity = z @ z.transpose(1, 2) / temperature  # S (B, M, M)
    same = (picked_labels[:, :, None] == picked_labels[:, None, :]).float()  # M_ij
    pair_valid = (valid[:, :, None] & valid[:, None, :]).float()
    per_pair = -similarity * same + (1.0 - same) * torch.exp(similarity)
    counts = valid.sum(dim=1).float()  # M per image
    per_image_loss = (per_pair * pair_valid).sum(dim=(1, 2)) / counts.clamp(min=1.0) ** 2
    has_patches = counts > 0
    if not bool(has_patches.any()):
        return features.sum() * 0.0
    return per_image_loss[has_patches].mean()


def cross_alignment_loss(image: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """L_cross (Eq. 7): -(1 / (N M)) sum_i sum_j log softmax_j( cos(f_ij, T_i) / tau ).

    image (B, M, C) fused patch tokens, text (B, C) fused pooled text of each image.
    With one sentence per task this is minimised by equal patch-text similarity (log M).
    """
    similarity = F.cosine_similarity(image.float(), text.float()[:, None, :], dim=2) / temperature  # (B, M)
    return -torch.log_softmax(similarity, dim=1).mean()


def key_pull_loss(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """L_kp: mean over images of 1 - cos(q(x), K_t); query (B, C) frozen, key (C,) learnable."""
    return (1.0 - F.cosine_similarity(query.float(), key.float()[None], dim=1)).mean()

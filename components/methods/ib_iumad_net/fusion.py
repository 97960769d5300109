"""Information-bottleneck fusion (IB-IUMAD Eqs. 4-5) and the training losses (Eqs. 8-10).

F1 / F2 are the decoder latents of the middle / last reconstruction-decoder layer ("rec-2" /
"rec-4" with 4 layers) of every modality. Fusion of (F1, F2):
- ``cross_attention`` [paper]: modalities concatenated per layer, F_fu = LN(F1 + CrossAttention(F1, F2))
  (the residual + LayerNorm is ours: a bare attention output trains poorly from scratch);
- ``add``: F_fu = sum of all four latents;  ``concat``: F_fu = Linear(concat of all four).
Bottleneck (Eq. 5): z = Dropout(ReLU(Linear(F_fu))); F^g = Linear(z) at the target feature width
(no final ReLU: backbone features can be negative). Product heads on F_fu and F^g give the
distributions of the IB loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.methods.iuf_network import GrowingHead

FUSIONS = ("cross_attention", "add", "concat")


def fused_width(fusion: str, hidden: int, n_modalities: int) -> int:
    """Channel width of F_fu."""
    return hidden if fusion == "add" else hidden * n_modalities


class IBFusion(nn.Module):
    """(F1, F2) -> (F_fu, F^g) plus product logits on both (for Eq. 8)."""

    def __init__(self, fusion: str, hidden: int, n_modalities: int, heads: int, bottleneck: int, dropout: float, out_channels: int) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r} (choose from {FUSIONS})")
        self.fusion = fusion
        width = fused_width(fusion, hidden, n_modalities)
        if fusion == "cross_attention":
            self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
            self.norm = nn.LayerNorm(width)
        elif fusion == "concat":
            self.merge = nn.Linear(4 * hidden if n_modalities == 2 else 2 * hidden, width)
        self.squeeze = nn.Linear(width, bottleneck)
        self.dropout = nn.Dropout(dropout)
        self.expand = nn.Linear(bottleneck, out_channels)
        self.head_fused = GrowingHead(width)
        self.head_bottleneck = GrowingHead(out_channels)

    def grow(self, new_products: int, generator: torch.Generator | None = None) -> None:
        self.head_fused.grow(new_products, generator)
        self.head_bottleneck.grow(new_products, generator)

    def fuse(self, first: list[torch.Tensor], last: list[torch.Tensor]) -> torch.Tensor:
        """F_fu (B, N, width) from the per-modality middle (``first``) and last (``last``) decoder latents."""
        if self.fusion == "add":
            return torch.stack([*first, *last]).sum(dim=0)
        if self.fusion == "concat":
            return self.merge(torch.cat([*first, *last], dim=-1))
        f1, f2 = torch.cat(first, dim=-1), torch.cat(last, dim=-1)  # Eq. 4: modalities concatenated per layer
        attended, _ = self.attention(f1, f2, f2, need_weights=False)
        return self.norm(f1 + attended)

    def forward(self, first: list[torch.Tensor], last: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(F_fu, F^g (B, N, out_channels), logits on F_fu, logits on F^g)."""
        fused = self.fuse(first, last)
        z = self.dropout(F.relu(self.squeeze(fused)))  # Eq. 5 bottleneck
        guided = self.expand(z)
        return fused, guided, self.head_fused(fused.mean(dim=1)), self.head_bottleneck(guided.mean(dim=1))


def ib_loss(logits_fused: torch.Tensor, logits_bottleneck: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8: KL[P(Y|F_fu) || P(Y|F^g)], and the anchoring CE on P(Y|F_fu) (an unanchored KL is
    minimised by two constant heads)."""
    log_p = F.log_softmax(logits_fused, dim=-1)
    log_q = F.log_softmax(logits_bottleneck, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()
    return kl, F.cross_entropy(logits_fused, labels)


def fusion_loss(guided: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 9: mean squared distance between F^g and the original target-modality features."""
    return F.mse_loss(guided, target)

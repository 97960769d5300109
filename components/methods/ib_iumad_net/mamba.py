"""Mamba decoder blocks (IB-IUMAD Eq. 2) built on the ES2D selective-scan module (ESSM).

ESSM(X): Linear -> (x, z); x -> depthwise 3x3 conv -> SiLU -> ES2D split into 4 directions ->
per-direction selective scan (own dt/B/C projections, A, D) -> scatter -> LayerNorm -> * SiLU(z)
-> Linear. Block (Eq. 2): X^ = DwConv(X); X~ = ESSM(LN(X)); X_next = Attention(LN(X~)) + X^.
Tensors are channels-last token grids (B, H, W, C).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from components.methods.iuf_network import GrowingHead
from components.methods.ib_iumad_net.es2d import DIRECTIONS, es2d_scatter, es2d_split
from components.methods.ib_iumad_net.scan import selective_scan

DT_MIN, DT_MAX = 1e-3, 1e-1


class ESSM(nn.Module):
    """Selective state-space mixing over the four ES2D directions (separate parameters per direction)."""

    def __init__(self, dim: int, state: int = 16, expand: int = 2) -> None:
        super().__init__()
        inner = dim * expand
        self.inner, self.state = inner, state
        self.dt_rank = math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)
        self.x_proj = nn.Parameter(torch.randn(DIRECTIONS, self.dt_rank + 2 * state, inner) * inner**-0.5)
        self.dt_proj = nn.Parameter(torch.randn(DIRECTIONS, inner, self.dt_rank) * self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(DIRECTIONS, inner) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus (mamba init)
        self.a_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(DIRECTIONS * inner, 1))
        self.d = nn.Parameter(torch.ones(DIRECTIONS * inner))
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        batch, height, width, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = nn.functional.silu(self.conv(x.permute(0, 3, 1, 2)))
        seqs = es2d_split(x)  # (B, K, E, L)
        proj = torch.einsum("bkel,kre->bkrl", seqs, self.x_proj)
        dt_low, b_mat, c_mat = proj.split([self.dt_rank, self.state, self.state], dim=2)
        delta = torch.einsum("bkrl,ker->bkel", dt_low, self.dt_proj)
        length = seqs.shape[-1]
        y = selective_scan(
            seqs.reshape(batch, -1, length), delta.reshape(batch, -1, length), -torch.exp(self.a_log),
            b_mat, c_mat, self.d, self.dt_bias.reshape(-1), delta_softplus=True,
        )
        y = es2d_scatter(y.reshape(batch, DIRECTIONS, self.inner, length), height, width).permute(0, 2, 3, 1)
        return self.out_proj(self.out_norm(y) * nn.functional.silu(z))


class MambaDecoderBlock(nn.Module):
    """One block of Eq. 2: depthwise-conv shortcut plus ESSM followed by multi-head self-attention."""

    def __init__(self, dim: int, heads: int, state: int = 16, expand: int = 2) -> None:
        super().__init__()
        self.shortcut = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm_in = nn.LayerNorm(dim)
        self.essm = ESSM(dim, state, expand)
        self.norm_attn = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        batch, height, width, dim = x.shape
        x_hat = self.shortcut(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # X^ = DwConv(X)
        x_tilde = self.essm(self.norm_in(x))  # X~ = ESSM(LN(X))
        tokens = self.norm_attn(x_tilde).reshape(batch, height * width, dim)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return attended.reshape(batch, height, width, dim) + x_hat


class ProductHead(nn.Module):
    """GAP -> Linear -> ReLU -> Linear(K) product classifier; K grows with the products (``GrowingHead``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(dim, hidden)
        self.out = GrowingHead(hidden)

    def grow(self, new_products: int, generator: torch.Generator | None = None) -> None:
        """Add output rows for ``new_products``; the logits of known products are unchanged."""
        self.out.grow(new_products, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) or (B, N, C) -> (B, K) logits."""
        return self.out(torch.relu(self.hidden(x.flatten(1, -2).mean(dim=1))))

"""The IB-IUMAD network: one branch per modality (Mamba decoder + reconstruction transformer) and IB fusion.

Branch m (features F_org^m as (B, N, C) tokens on an (h, w) grid):
  x_0 = Linear(C -> hidden)(F_org^m); x_i = MambaBlock_i(x_{i-1}) (Eq. 2), one block per encoder layer;
  logits_m = ProductHead(x_last) (CE_m of Eq. 10);
  MRN_m (``ReconstructionTransformer``) reconstructs jittered tokens, encoder layer i with queries
  (x + pos) * x_i (the conditioning of the reconstruction encoder, IUF's OASA form).
Fusion: ``IBFusion`` on the branches' middle and last decoder latents -> F_fu, F^g.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from components.config import IBIUMADConfig, ReconstructionConfig
from components.methods.ib_iumad_net.fusion import IBFusion
from components.methods.ib_iumad_net.mamba import MambaDecoderBlock, ProductHead
from components.methods.reconstruction import ReconstructionTransformer


@dataclass
class BranchOutput:
    """Outputs of one modality branch."""

    reconstruction: torch.Tensor  # (B, N, C)
    latents: list[torch.Tensor]  # decoder latents [(B, N, hidden)]
    logits: torch.Tensor  # (B, K)


@dataclass
class NetworkOutput:
    branches: dict[str, BranchOutput]
    fused: torch.Tensor  # F_fu (B, N, width)
    guided: torch.Tensor  # F^g (B, N, C)
    logits_fused: torch.Tensor
    logits_guided: torch.Tensor


class ModalityBranch(nn.Module):
    """Mamba decoder (conditioning + product head) and reconstruction transformer of one modality."""

    def __init__(self, channels: int, grid: tuple[int, int], rcfg: ReconstructionConfig, cfg: IBIUMADConfig) -> None:
        super().__init__()
        self.grid = grid
        self.embed = nn.Linear(channels, rcfg.hidden)
        self.mamba = nn.ModuleList(MambaDecoderBlock(rcfg.hidden, rcfg.heads, cfg.mamba_state, cfg.mamba_expand) for _ in range(rcfg.encoder_layers))
        self.head = ProductHead(rcfg.hidden, cfg.head_hidden)
        self.recon = ReconstructionTransformer(channels, grid, rcfg)

    def forward(self, clean: torch.Tensor, noisy: torch.Tensor) -> BranchOutput:
        """``clean`` tokens condition the encoder (the Mamba path sees the real input); ``noisy`` are reconstructed."""
        b, n, _ = clean.shape
        x = self.embed(clean).reshape(b, *self.grid, -1)
        conditions = []
        for block in self.mamba:
            x = block(x)
            conditions.append(x.reshape(b, n, -1))
        reconstruction, latents = self.recon(noisy, conditions)
        return BranchOutput(reconstruction, latents, self.head(x))


class IBIUMADNetwork(nn.Module):
    """Branches for ``modalities`` ("rgb", "depth") and the IB fusion onto the target modality's features."""

    def __init__(self, modalities: list[str], channels: int, grid: tuple[int, int], rcfg: ReconstructionConfig, cfg: IBIUMADConfig) -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.branches = nn.ModuleDict({m: ModalityBranch(channels, grid, rcfg, cfg) for m in modalities})
        self.fusion = IBFusion(cfg.fusion, rcfg.hidden, len(modalities), cfg.fusion_heads, cfg.bottleneck, cfg.bottleneck_dropout, channels)
        layers = rcfg.decoder_layers
        self.first_layer, self.last_layer = max(0, layers // 2 - 1), layers - 1  # "rec-2" and "rec-4" of 4 layers

    def grow(self, new_products: int, generator: torch.Generator | None = None) -> None:
        for branch in self.branches.values():
            branch.head.grow(new_products, generator)
        self.fusion.grow(new_products, generator)

    def forward(self, clean: dict[str, torch.Tensor], noisy: dict[str, torch.Tensor]) -> NetworkOutput:
        branches = {m: self.branches[m](clean[m], noisy[m]) for m in self.modalities}
        first = [branches[m].latents[self.first_layer] for m in self.modalities]
        last = [branches[m].latents[self.last_layer] for m in self.modalities]
        fused, guided, logits_fused, logits_guided = self.fusion(first, last)
        return NetworkOutput(branches, fused, guided, logits_fused, logits_guided)

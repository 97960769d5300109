"""Feature reconstruction core shared by the reconstruction-based methods (IUF, IB-IUMAD).

UniAD-style pipeline (You et al. 2022), nothing method-specific:

- ``MultiStageFeatures``: a FROZEN ImageNet CNN whose pyramid levels ``reconstruction.stages`` are
  bilinearly resized (anti-aliased when shrinking) onto one grid of stride ``reconstruction.stride``
  and concatenated. Default EfficientNet-Lite0 levels 0-3 (16+24+40+112 = 192 channels, 14 x 14 at
  224 px), the Lite0 recipe of the authors' B4 levels 1-4; any timm CNN with ``reconstruction.checkpoint``.
- ``cached_features``: the extractor is frozen, so its features of an image are computed once and
  reused by every epoch and step (``components.methods.feature_cache``, keyed by image content).
- ``feature_jitter``: training-time noise on the input tokens, ``f + N(0, 1) * ||f|| / C * scale``.
- ``ReconstructionTransformer``: Linear C -> hidden, learned row/column positional embedding,
  post-norm transformer encoder, learned-query decoder with cross-attention, Linear hidden -> C.
  Encoder layers accept an optional multiplicative modulation of their query input (a generic hook;
  IUF's object-aware attention plugs in there).
- ``error_maps`` / ``pooled_max_scores``: per-token L2 reconstruction error, upsampled; image score =
  max of the average-pooled map. ``position_profile`` / ``calibrate_positions``: divide the error map by
  the relative error of every grid position on normal images (scale-free, so profiles of several
  products can be averaged).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from components.backbones.base import PromptedBackbone
from components.backbones.common import check_images, freeze, renormalise
from components.config import BackboneConfig, ReconstructionConfig
from components.errors import WeightsError
from components.methods.extract import module_device
from components.methods.feature_cache import feature_cache
from components.methods.scoring import gaussian_blur

log = logging.getLogger(__name__)

LITE0_NAMES = ("efficientnet_lite0", "tf_efficientnet_lite0")


class MultiStageFeatures(nn.Module):
    """Frozen CNN pyramid levels resized to one grid and concatenated: (B, sum C_l, H/stride, W/stride)."""

    def __init__(self, net: nn.Module, stages: Sequence[int], stride: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = freeze(net)
        self.stages = list(stages)
        self.stride = stride
        self.mean, self.std = tuple(mean), tuple(std)
        channels = [int(c) for c in self.net.feature_info.channels()]
        self.level_channels = [channels[s] for s in self.stages]
        self.channels = sum(self.level_channels)

    def train(self, mode: bool = True) -> MultiStageFeatures:
        """The frozen network always stays in eval mode."""
        super().train(mode)
        self.net.eval()
        return self

    def grid_size(self, image_size: int) -> tuple[int, int]:
        side = math.ceil(image_size / self.stride)
        return side, side

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        x = renormalise(images.to(module_device(self.net)), self.mean, self.std)
        levels = self.net(x)
        grid = self.grid_size(images.shape[-1])
        maps = [F.interpolate(levels[s], size=grid, mode="bilinear", align_corners=False, antialias=levels[s].shape[-1] > grid[1]) for s in self.stages]
        return torch.cat(maps, dim=1)


def _timm_features_net(name: str, stages: Sequence[int], state: dict[str, torch.Tensor] | None, source: str) -> nn.Module:
    """timm ``name`` as a ``features_only`` pyramid, loaded from ``state`` (every weight must be present)."""
    try:
        net = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(range(max(stages) + 1)))
    except (RuntimeError, ValueError) as exc:
        raise WeightsError(f"reconstruction.backbone={name!r}: not a timm CNN with a feature pyramid ({exc})") from exc
    if state is not None:
        missing, _ = net.load_state_dict(state, strict=False)
        if missing:
            raise WeightsError(f"reconstruction.checkpoint={source}: {len(missing)} weights of {name} missing (e.g. {missing[0]})")
    return net


def _lite0_features_net(stages: Sequence[int], pretrained: bool, checkpoint: str | None) -> nn.Module:
    """EfficientNet-Lite0 pyramid carrying the packaged ImageNet weights (or ``checkpoint``)."""
    from components.backbones.efficientnet import efficientnet_lite0_network

    full = efficientnet_lite0_network(pretrained=pretrained, checkpoint=checkpoint)
    return _timm_features_net("tf_efficientnet_lite0", stages, full.state_dict(), checkpoint or "packaged Lite0 weights")


def build_feature_extractor(cfg: ReconstructionConfig, backbone_cfg: BackboneConfig, backbone: PromptedBackbone | None = None) -> MultiStageFeatures:
    """The frozen multi-stage extractor of ``cfg`` on the backbone's device.

    EfficientNet-Lite0 reuses the packaged weights (``backbone.pretrained=false``: random, tests only);
    any other timm CNN needs ``reconstruction.checkpoint`` (no download ever).
    """
    device = module_device(backbone) if backbone is not None else torch.device("cpu")
    if cfg.backbone in LITE0_NAMES:
        net = _lite0_features_net(cfg.stages, backbone_cfg.pretrained, cfg.checkpoint)
    else:
        if cfg.checkpoint is None and backbone_cfg.pretrained:
            raise WeightsError(f"reconstruction.checkpoint is required for reconstruction.backbone={cfg.backbone!r} (no weights are downloaded)")
        state = None
        if cfg.checkpoint is not None:
            from components.backbones.weights import read_state_dict

            state = read_state_dict(Path(cfg.checkpoint))
        net = _timm_features_net(cfg.backbone, cfg.stages, state, str(cfg.checkpoint))
    n_levels = len(net.feature_info.channels())
    bad = [s for s in cfg.stages if not 0 <= s < n_levels]
    if bad:
        raise WeightsError(f"reconstruction.stages={cfg.stages}: levels {bad} do not exist in {cfg.backbone} (0..{n_levels - 1})")
    pretrained_cfg = getattr(net, "pretrained_cfg", {}) or {}
    mean = tuple(pretrained_cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(pretrained_cfg.get("std", (0.229, 0.224, 0.225)))
    return MultiStageFeatures(net, cfg.stages, cfg.stride, mean, std).to(device).eval()


def cached_features(extractor: MultiStageFeatures, images: torch.Tensor, batch_size: int, desc: str | None = None) -> torch.Tensor:
    """(B, C, h, w) features of ``images`` in batches of ``batch_size``: the extractor is frozen, so each
    image's are computed once (the extractor's ``feature_cache``, by image content) and then reused."""
    return feature_cache(extractor).features("features", extractor, images, batch_size, module_device(extractor.net), desc)


def feature_jitter(tokens: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """UniAD feature jitter on (B, N, C) tokens: ``f + N(0, 1) * ||f|| / C * scale`` (per token)."""
    if scale <= 0:
        return tokens
    norm = torch.linalg.vector_norm(tokens, dim=-1, keepdim=True) / tokens.shape[-1]
    noise = torch.randn(tokens.shape, generator=generator, dtype=tokens.dtype, device=tokens.device)
    return tokens + noise * norm * scale


class Attention(nn.Module):
    """Multi-head attention with explicit q/k/v/out ``nn.Linear`` layers (hookable for projections)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` (Nq, Nk): bool (True = may attend) or an additive float bias (``attention_bias``); None = full attention."""
        b, n, c = query.shape

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, x.shape[1], self.heads, c // self.heads).transpose(1, 2)

        # No dropout on the attention weights (it tripled the CPU cost); dropout stays on the residual branches.
        attended = F.scaled_dot_product_attention(split(self.q(query)), split(self.k(key)), split(self.v(value)), attn_mask=mask)
        return self.out(attended.transpose(1, 2).reshape(b, n, c))


class IntegerMaskDropout(nn.Module):
    """Inverted dropout (as ``nn.Dropout``) whose keep mask compares 15-bit random integers with ``p``.

    Same distribution as ``nn.Dropout`` up to p's rounding to a multiple of 2^-15, but on the CPU
    ``bernoulli_`` (behind ``nn.Dropout``) cost ~20 % of an IUF training step and integer bits half as much.
    """

    BITS = 15

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * 2**self.BITS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        bits = torch.empty(x.shape, dtype=torch.int16, device=x.device).random_(0, 2**self.BITS)
        keep = (bits >= self.threshold).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FeedForward(nn.Module):
    """Linear -> ReLU -> dropout -> Linear."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dropout = IntegerMaskDropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Post-norm self-attention layer; query input ``(x + pos) * modulation`` when a modulation is given."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.attn = Attention(dim, heads)
        self.ffn = FeedForward(dim, ffn, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = IntegerMaskDropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, modulation: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        query = x + pos if modulation is None else (x + pos) * modulation
        x = self.norm1(x + self.drop(self.attn(query, x + pos, x, mask)))
        return self.norm2(x + self.drop(self.ffn(x)))


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention on the queries, cross-attention to the encoder output, FFN."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads)
        self.ffn = FeedForward(dim, ffn, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = IntegerMaskDropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        tgt = self.norm1(tgt + self.drop(self.self_attn(tgt + pos, tgt + pos, tgt)))
        tgt = self.norm2(tgt + self.drop(self.cross_attn(tgt + pos, memory + pos, memory)))
        return self.norm3(tgt + self.drop(self.ffn(tgt)))


class LayerwiseQueryDecoderLayer(nn.Module):
    """UniAD decoder layer: this layer's own learned queries attend to the encoder output, then to the
    previous decoder layer's output (the encoder output for the first layer), then FFN; post-norm.

    The layer's input reaches its output only through attention (no residual path from it), which
    with a neighbour mask removes the identity shortcut.
    """

    def __init__(self, dim: int, tokens: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(tokens, dim) * 0.02)
        self.memory_attn = Attention(dim, heads)
        self.previous_attn = Attention(dim, heads)
        self.ffn = FeedForward(dim, ffn, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = IntegerMaskDropout(dropout)

    def forward(self, previous: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        tgt = self.queries[None].expand(memory.shape[0], -1, -1)
        tgt = self.norm1(tgt + self.drop(self.memory_attn(tgt + pos, memory + pos, memory, mask)))
        tgt = self.norm2(tgt + self.drop(self.previous_attn(tgt + pos, previous + pos, previous, mask)))
        return self.norm3(tgt + self.drop(self.ffn(tgt)))


def neighbour_mask(grid: tuple[int, int], size: int) -> torch.Tensor | None:
    """(N, N) bool attention mask, True = may attend: every token is barred from the ``size`` x ``size``
    window centred on itself (itself included), UniAD's neighbour-masked attention; ``size`` 0 = None.

    On a grid too small for ``size`` (some token would see nothing) the window shrinks to the largest
    odd size that leaves every token something to attend to (tiny test grids); 1 x 1 = only itself barred.
    """
    if size <= 0:
        return None
    h, w = grid
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    dr, dc = (rows[:, None] - rows[None, :]).abs(), (cols[:, None] - cols[None, :]).abs()
    for k in range(size if size % 2 else size + 1, 0, -2):
        allowed = ~((dr <= k // 2) & (dc <= k // 2))
        if bool(allowed.any(dim=1).all()):
            if k != size:
                log.info("neighbour mask %d x %d too large for the %d x %d grid: using %d x %d", size, size, h, w, k, k)
            return allowed
    raise ValueError(f"a {h} x {w} grid has a single token: nothing to attend to under a neighbour mask")


def attention_bias(allowed: torch.Tensor) -> torch.Tensor:
    """(Nq, Nk) float attention bias of a bool mask (True = may attend): 0 where allowed, -inf where barred."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


class ReconstructionTransformer(nn.Module):
    """UniAD-style reconstruction of (B, N, C) feature tokens on an ``h x w`` grid.

    ``forward`` returns the reconstruction (B, N, C) and the decoder layers' latents
    [(B, N, hidden)] (for latent-space losses).
    """

    def __init__(self, channels: int, grid: tuple[int, int], cfg: ReconstructionConfig, neighbor_mask: int = 0, layerwise_queries: bool = False) -> None:
        super().__init__()
        self.grid = grid
        self.layerwise_queries = layerwise_queries
        mask = neighbour_mask(grid, neighbor_mask)
        # additive form: CPU attention runs ~10 % faster with a float bias than with the bool mask
        self.register_buffer("mask", attention_bias(mask) if mask is not None else torch.ones(0), persistent=False)
        dim = cfg.hidden
        self.input_proj = nn.Linear(channels, dim)
        self.output_proj = nn.Linear(dim, channels)
        self.row_embed = nn.Parameter(torch.randn(grid[0], dim // 2) * 0.02)
        self.col_embed = nn.Parameter(torch.randn(grid[1], dim - dim // 2) * 0.02)
        self.encoder = nn.ModuleList(EncoderLayer(dim, cfg.heads, cfg.ffn, cfg.dropout) for _ in range(cfg.encoder_layers))
        self.decoder: nn.ModuleList
        if layerwise_queries:
            tokens = grid[0] * grid[1]
            self.decoder = nn.ModuleList(LayerwiseQueryDecoderLayer(dim, tokens, cfg.heads, cfg.ffn, cfg.dropout) for _ in range(cfg.decoder_layers))
            self.decoder_norm = nn.LayerNorm(dim)
        else:
            self.queries = nn.Parameter(torch.randn(grid[0] * grid[1], dim) * 0.02)
            self.decoder = nn.ModuleList(DecoderLayer(dim, cfg.heads, cfg.ffn, cfg.dropout) for _ in range(cfg.decoder_layers))

    def positions(self) -> torch.Tensor:
        """(1, h*w, hidden) learned row/column positional embedding."""
        h, w = self.grid
        rows = self.row_embed[:, None, :].expand(h, w, -1)
        cols = self.col_embed[None, :, :].expand(h, w, -1)
        return torch.cat([rows, cols], dim=-1).reshape(1, h * w, -1)

    def forward(self, tokens: torch.Tensor, modulations: Sequence[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pos = self.positions()
        mask = self.mask if self.mask.numel() else None
        x = self.input_proj(tokens)
        for i, layer in enumerate(self.encoder):
            x = layer(x, pos, modulations[i] if modulations is not None else None, mask)
        latents = []
        if self.layerwise_queries:
            out = x
            for layer in self.decoder:
                out = layer(out, x, pos, mask)
                latents.append(out)
            return self.output_proj(self.decoder_norm(out)), latents
        tgt = self.queries[None].expand(tokens.shape[0], -1, -1)
        for layer in self.decoder:
            tgt = layer(tgt, x, pos)
            latents.append(tgt)
        return self.output_proj(tgt), latents


def to_tokens(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C)."""
    return features.flatten(2).transpose(1, 2)


STD_FLOOR = 1e-3  # smallest channel std used for standardisation (dead channels)


def channel_stats(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std floored at ``STD_FLOOR``) of (..., C) tokens, accumulated in float64."""
    flat = tokens.reshape(-1, tokens.shape[-1]).double()
    return flat.mean(0).float(), flat.std(0).float().clamp_min(STD_FLOOR)


def standardise(tokens: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(..., C) tokens standardised per channel with ``channel_stats`` (mean, std), on the tokens' device."""
    mean, std = stats
    return (tokens - mean.to(tokens.device)) / std.to(tokens.device)


def level_normalise(tokens: torch.Tensor, level_channels: Sequence[int]) -> torch.Tensor:
    """(..., C) tokens with every pyramid level's slice scaled to unit L2 norm, times ``sqrt(C / levels)``.

    Product-independent (no statistics): every level weighs the same in the reconstruction loss and
    error map whatever the product, and the channels keep an RMS of about 1 (so the loss scale and the
    feature jitter are those of standardised features).
    """
    if sum(level_channels) != tokens.shape[-1]:
        raise ValueError(f"level channels {list(level_channels)} do not add up to the tokens' {tokens.shape[-1]} channels")
    scale = math.sqrt(tokens.shape[-1] / len(level_channels))
    parts = [F.normalize(part, dim=-1, eps=1e-6) * scale for part in tokens.split(list(level_channels), dim=-1)]
    return torch.cat(parts, dim=-1)


def error_maps(reconstruction: torch.Tensor, target: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) channel L2 norm of ``reconstruction - target`` (both (B, N, C))."""
    err = torch.linalg.vector_norm(reconstruction - target, dim=-1)
    return err.reshape(err.shape[0], *grid)


PROFILE_FLOOR = 0.1  # smallest relative position error used for calibration (a position 10x quieter than average)


def position_profile(maps: torch.Tensor) -> torch.Tensor:
    """(h, w) relative error of every grid position in (B, h, w) error maps of normal images: the mean
    map divided by its own mean (unit mean, so a product's error scale drops out)."""
    mean = maps.double().mean(0)
    return (mean / mean.mean().clamp_min(1e-12)).float()


def calibrate_positions(maps: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
    """(B, h, w) error maps divided by a ``position_profile`` (floored at ``PROFILE_FLOOR``): positions that
    are always hard to reconstruct (the border ring, where padding shapes the features) no longer
    decide the image score."""
    return maps / profile.to(maps.device).clamp_min(PROFILE_FLOOR)


def upsample_maps(grid_maps: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """(B, H, W): bilinear upsampling of (B, h, w) maps to ``size``, then Gaussian smoothing (sigma px, 0 = off)."""
    up = F.interpolate(grid_maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(up, sigma)


def pooled_max_scores(maps: torch.Tensor, pool: int) -> torch.Tensor:
    """(B,) image scores: max of the ``pool`` x ``pool`` average-pooled (B, H, W) maps (UniAD)."""
    pool = max(1, min(pool, maps.shape[-1], maps.shape[-2]))
    return F.avg_pool2d(maps[:, None], kernel_size=pool, stride=1).flatten(1).max(dim=1).values

